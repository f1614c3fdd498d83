"""``--output s3://bucket/prefix`` (or ``gs://``): build into a local staging folder and upload as it goes.

- Each shard's ``.tar`` and ``.idx`` are uploaded as soon as the shard is finished. An object store shows an
  object under its name only once its upload is complete (one PUT, or a completed multipart upload), so no
  reader ever sees half a shard under its final name.
- ``rejects.jsonl`` and then ``manifest.json`` are uploaded last: a prefix holding ``manifest.json`` is a
  finished build, as on disk. A shard already on the store with the manifest's size is not uploaded again.
- The staging folder (``$TMPDIR/mpma-build-stage-<hash of the URL>``) is the build's resume state: a killed
  build rerun on the same machine skips what it had finished (and uploads what it had not); it is removed
  once ``manifest.json`` is on the store.
- A prefix that holds a finished build of other input or options is refused, as a local folder is.

- **Split builds** (``--num-nodes N --node-rank R``, SLURM arrays): each part stages and uploads its own shards
  and shares each shard's record as ``PREFIX/.build/<record>.json`` (`StoreRecords`), stamped with the build's
  fingerprint. The part that then finds every record on the store writes ``rejects.jsonl`` and
  ``manifest.json`` from them — byte-identical to a one-machine build, whichever part and in whatever order —
  after checking that every other part's shard is on the store at its recorded size, and deletes
  ``.build/``. A record of other input or options under the same prefix is refused with one line.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from data_tools import remote
from data_tools.shard_build import BuildError
from data_tools.shard_build.plan import PlannedShard
from data_tools.shard_build.resume import STATE_DIR


def staging_folder(url: str, num_nodes: int = 1, node_rank: int = 0) -> Path:
    """The local folder a build (or one part of a split build) for ``url`` is staged in (the same one on every
    rerun on this machine)."""
    key = url.rstrip("/") + (f" part {node_rank} of {num_nodes}" if num_nodes > 1 else "")
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"mpma-build-stage-{digest}"


class StoreRecords:
    """The records of a split build's parts under ``PREFIX/.build/`` on the store (`parts.SharedRecords`)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.folder = remote.join(url, STATE_DIR)

    def put(self, name: str, record: dict, fingerprint: str, *, again: bool = True) -> None:
        target = remote.join(self.folder, name)
        if again or not remote.exists(target):
            body = json.dumps(
                {**record, "fingerprint": fingerprint}
            )  # key order kept: the manifest is built from it
            remote.put_bytes(body.encode("utf-8"), target)

    def all(self, plan: list[PlannedShard], fingerprint: str) -> dict[str, dict] | None:
        names = {remote.basename(u): u for u in self._listed("*.json")}
        if any(shard.record_name not in names for shard in plan):
            return None
        records = {}
        for shard in plan:
            record = json.loads(remote.read_bytes(names[shard.record_name]).decode("utf-8"))
            if record.pop("fingerprint", None) != fingerprint:
                raise BuildError(
                    f"{names[shard.record_name]} was built from other input or options than this part: give every "
                    f"part the same command, or another --output than {self.url}"
                )
            records[shard.record_name] = record
        return records

    def remove(self) -> None:
        for url in self._listed("*"):
            remote.delete(url)

    def _listed(self, pattern: str) -> list[str]:
        try:
            return list(remote.list_folder(self.folder, pattern))
        except remote.RemoteError as err:
            if "does not exist" in str(err):  # no part has shared a record yet (or the build removed them)
                return []
            raise


def uploader(url: str, staging: Path) -> Callable[[dict], None]:
    """``on_shard(info)``: upload a finished shard's tar, then its idx."""

    def upload(info: dict) -> None:
        for rel in (info["name"], info["index"]):
            remote.upload(staging / rel, remote.join(url, rel))

    return upload


def build_to_store(url: str, build: Callable[..., dict], num_nodes: int = 1, node_rank: int = 0) -> dict:
    """Run ``build(output=staging, on_shard=..., shared=...)`` and publish the result under ``url``.

    Raises:
        BuildError: ``url`` holding another finished build, or another build's part records; a store error
            as one line.
    """
    url = url.rstrip("/")
    staging = staging_folder(url, num_nodes, node_rank)
    shared = StoreRecords(url) if num_nodes > 1 else None
    try:
        old = _remote_manifest(url)
        if old is not None or (staging / "manifest.json").exists():
            # a staged build whose manifest never reached the store is built again; the store's manifest is
            # judged like a local folder's: the same build is nothing to do, another is refused
            shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            staging.mkdir(parents=True)
            (staging / "manifest.json").write_text(json.dumps(old), encoding="utf-8")
        try:
            summary = build(output=staging, on_shard=uploader(url, staging), shared=shared, num_nodes=num_nodes,
                            node_rank=node_rank)  # fmt: skip
        except BuildError as err:
            if old is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise BuildError(str(err).replace(str(staging), url)) from None
        if old is not None:
            shutil.rmtree(staging, ignore_errors=True)
            summary["output"] = url
            return summary
        if summary["status"] == "part_done":  # another part finishes the build; this one's shards are up
            shutil.rmtree(staging, ignore_errors=True)
            summary["output"] = url
            return summary
        manifest = json.loads((staging / "manifest.json").read_text(encoding="utf-8"))
        publish_shards(url, staging, manifest)
        remote.upload(staging / "rejects.jsonl", remote.join(url, "rejects.jsonl"))
        remote.upload(staging / "manifest.json", remote.join(url, "manifest.json"))  # last: the build is done
        if shared is not None:
            shared.remove()
    except remote.RemoteError as err:
        raise BuildError(f"{err} (finished shards stay staged in {staging}: rerun the same command)") from None
    shutil.rmtree(staging, ignore_errors=True)
    summary["output"] = url
    return summary


def publish_shards(url: str, staging: Path, manifest: dict) -> None:
    """Upload the manifest's shards staged here that the store lacks (finished by an earlier, killed run); a
    shard another part built must already be on the store at its recorded size.

    Raises:
        BuildError: another part's shard missing from the store or of another size.
    """
    for info in manifest["shards"]:
        for rel, size in ((info["name"], info["bytes"]), (info["index"], None)):
            target = remote.join(url, rel)
            local = staging / rel
            on_store = remote.object_info(target).size if remote.exists(target) else None
            if local.exists():
                if on_store != local.stat().st_size:
                    remote.upload(local, target)
            elif on_store is None or (size is not None and on_store != size):
                raise BuildError(
                    f"{target}, built by another part, is {'missing' if on_store is None else f'{on_store} bytes'} "
                    f"on the store (its record says {size} bytes): rerun that part"
                )


def _remote_manifest(url: str) -> dict | None:
    target = remote.join(url, "manifest.json")
    if not remote.exists(target):
        return None
    try:
        return json.loads(remote.read_bytes(target).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BuildError(f"--output {url} holds an unreadable manifest.json; choose another prefix") from None
