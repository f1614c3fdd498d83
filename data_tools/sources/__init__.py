"""The corpus formats `build_shards` reads (SPEC §4.1), one reader module each, behind `scan_source`.

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

from data_tools.sources.common import ScanOptions, SourceError, SourceScan

VQA_FORMATS: tuple[str, ...] = ("vqa-rad", "slake")
"""Formats of VQA sets: samples are questions, `<key>.json` holds `shard_format.VQA_FIELDS`."""
FORMATS: tuple[str, ...] = ("mimic-cxr", "iu-xray", "manifest", *VQA_FORMATS)
"""The `--format` values, in the order `--help` lists them."""


def scan_source(fmt: str, input_path: Path, scan_opts: ScanOptions, *, vqa_lang: str = "en") -> SourceScan:
    """Scan `input_path` as format `fmt` into planned samples and the rejects known before decoding.

    `scan_opts` applies to the image-report formats, `vqa_lang` (a `q_lang` code or `all`) to the VQA ones.

    Raises:
        SourceError: an unknown format or an input that cannot be read at all.
    """
    # Readers are imported on demand: a build of one format never imports the others' dependencies.
    if fmt == "mimic-cxr":
        from data_tools.sources.mimic import scan_mimic_cxr

        return scan_mimic_cxr(input_path, scan_opts)
    if fmt == "iu-xray":
        from data_tools.sources.iu import scan_iu_xray

        return scan_iu_xray(input_path, scan_opts)
    if fmt == "manifest":
        from data_tools.sources.manifest import scan_manifest

        return scan_manifest(input_path, scan_opts)
    if fmt in VQA_FORMATS:
        from data_tools.sources.vqa import scan_vqa

        return scan_vqa(fmt, input_path, vqa_lang, scan_opts.follow_outside_links)
    raise SourceError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
