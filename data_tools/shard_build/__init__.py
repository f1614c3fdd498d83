"""The steps of a shard build, used by `data_tools.build_shards.build_shards`:

- `plan`: cut the scanned samples into shards and fingerprint everything that decides the bytes;
- `resume`: the `OUT/.build/` state that lets an interrupted build finish where it stopped;
- `encode`: the per-sample work (decode, resize, encode, JSON) run in worker processes;
- `writer`: one deterministic tar + `.idx`, written atomically;
- `finish`: `rejects.jsonl`, `manifest.json` and the summary.
"""


class BuildError(Exception):
    """A build that must not start or go on; the message is one line for the user."""
