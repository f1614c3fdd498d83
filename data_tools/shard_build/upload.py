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

Split builds (``--num-nodes``) need a shared folder for their records: they are refused with a remote
``--output`` (build the parts into a shared folder, then upload it).
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


def staging_folder(url: str) -> Path:
    """The local folder a build for ``url`` is staged in (the same one on every rerun on this machine)."""
    digest = hashlib.sha256(url.rstrip("/").encode("utf-8")).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"mpma-build-stage-{digest}"


def uploader(url: str, staging: Path) -> Callable[[dict], None]:
    """``on_shard(info)``: upload a finished shard's tar, then its idx."""

    def upload(info: dict) -> None:
        for rel in (info["name"], info["index"]):
            remote.upload(staging / rel, remote.join(url, rel))

    return upload


def build_to_store(url: str, build: Callable[..., dict], num_nodes: int | None) -> dict:
    """Run ``build(output=staging, on_shard=...)`` and publish the result under ``url``.

    Raises:
        BuildError: a split build, or ``url`` holding another finished build; a store error as one line.
    """
    if (num_nodes or 1) > 1:
        raise BuildError(
            f"--num-nodes with a remote --output ({url}) is not supported: build the parts into a shared folder, "
            "then upload it"
        )
    url = url.rstrip("/")
    staging = staging_folder(url)
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
            summary = build(output=staging, on_shard=uploader(url, staging))
        except BuildError as err:
            if old is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise BuildError(str(err).replace(str(staging), url)) from None
        if old is not None:
            shutil.rmtree(staging, ignore_errors=True)
            summary["output"] = url
            return summary
        manifest = json.loads((staging / "manifest.json").read_text(encoding="utf-8"))
        for info in manifest["shards"]:  # shards finished by an earlier, killed run of this build
            for rel in (info["name"], info["index"]):
                target = remote.join(url, rel)
                local = staging / rel
                if not remote.exists(target) or remote.object_info(target).size != local.stat().st_size:
                    remote.upload(local, target)
        remote.upload(staging / "rejects.jsonl", remote.join(url, "rejects.jsonl"))
        remote.upload(staging / "manifest.json", remote.join(url, "manifest.json"))  # last: the build is done
    except remote.RemoteError as err:
        raise BuildError(f"{err} (finished shards stay staged in {staging}: rerun the same command)") from None
    shutil.rmtree(staging, ignore_errors=True)
    summary["output"] = url
    return summary


def _remote_manifest(url: str) -> dict | None:
    target = remote.join(url, "manifest.json")
    if not remote.exists(target):
        return None
    try:
        return json.loads(remote.read_bytes(target).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BuildError(f"--output {url} holds an unreadable manifest.json; choose another prefix") from None
