"""The corpus formats `build_shards` reads (SPEC §4.1), one reader module each, registered in `SOURCES`.

- `mimic-cxr`: `data_tools.sources.mimic.scan_mimic_cxr`
- `iu-xray`: `data_tools.sources.iu.scan_iu_xray`
- `manifest`: `data_tools.sources.manifest.scan_manifest`
- `vqa-rad`, `slake`: `data_tools.sources.vqa.scan_vqa` (one sample per question)

`common` holds what the readers share (`SourceItem`, `Reject`, `ScanOptions`, keys, splits, labels),
`report_text` the report section parser, `images` / `dicom` the per-image decode + encode that the
build's workers run.
"""

from __future__ import annotations

from pathlib import Path

from data_tools.registry import RegistryError
from data_tools.sources.common import SOURCES, ScanOptions, SourceError, SourceScan

__all__ = ["SOURCES", "formats", "scan_source", "source_kind"]


def formats(kind: str | None = None) -> list[str]:
    """The registered ``--format`` names (of one ``kind``: ``report`` or ``vqa``), plugins included."""
    return [e.name for e in SOURCES if kind is None or e.meta.get("kind") == kind]


def source_kind(fmt: str) -> str:
    """``report`` or ``vqa``: what the samples of format ``fmt`` are.

    Raises:
        SourceError: ``fmt`` is not a registered format (the message lists those that are).
    """
    try:
        return SOURCES.get(fmt).meta.get("kind", "report")
    except RegistryError as err:
        raise SourceError(f"unknown --format: {err}") from None


def scan_source(fmt: str, input_path: Path, scan_opts: ScanOptions, *, vqa_lang: str = "en") -> SourceScan:
    """Scan `input_path` as format `fmt` into planned samples and the rejects known before decoding.

    `scan_opts` applies to the image-report formats, `vqa_lang` (a `q_lang` code or `all`) to the VQA ones.

    Raises:
        SourceError: an unknown format or an input that cannot be read at all.
    """
    source_kind(fmt)  # an unknown name: one line listing the registered ones
    return SOURCES[fmt](input_path, scan_opts, vqa_lang)
