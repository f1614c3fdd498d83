"""`iu-xray` reader: the Indiana University / Open-I chest X-ray collection (SPEC §4.1).

    INPUT/ecgen-radiology/<n>.xml     (or the XML files directly in INPUT)
    IMAGES/<parentImage id>.{png,jpg,jpeg,dcm}     IMAGES = --image-dir, else INPUT/images, else INPUT

Each XML is one report of one patient (`uId`, e.g. `CXR1`): `AbstractText Label=...` sections
(FINDINGS, IMPRESSION, INDICATION, COMPARISON) and one `parentImage id=...` per image. The collection
states no view per image, so images are kept with `view: null` whatever `--views` says.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from data_tools.sources.common import (
    IMAGE_SUFFIXES,
    SOURCES,
    Reject,
    ScanOptions,
    SourceError,
    SourceItem,
    SourceScan,
    check_report,
    dedupe_keys,
    empty_labels,
    hash_split,
    make_key,
    outside_link,
)
from data_tools.sources.report_text import NotText, decode_report, extract_report_text, section_name

_XML_DECLARATION = re.compile(r"^\s*<\?xml[^>]*\?>")


@dataclass
class IUReport:
    """One parsed Open-I report XML."""

    path: Path
    uid: str
    """The patient / report id (`uId`), e.g. `CXR1`."""
    sections: dict[str, str]
    """Standard section name -> raw text, in XML order (`findings`, `impression`, ...)."""
    image_ids: list[str]
    mesh: list[str]
    encoding: str | None = None
    """The encoding the file was decoded with when it was not the declared / UTF-8 one."""

    def raw_text(self) -> str:
        """The sections as a MIMIC-style report (`HEADER:` lines), for the section parser."""
        return "\n\n".join(f"{name.upper()}:\n{text}" for name, text in self.sections.items())


def parse_iu_xml(path: str | Path) -> IUReport:
    """Parse one Open-I report XML.

    Raises:
        SourceError: the file is not well-formed XML.
    """
    path = Path(path)
    raw = path.read_bytes()
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as exc:
        try:
            text, encoding = decode_report(raw)
        except NotText as exc2:
            raise SourceError(f"{path}: not an XML report: {exc2}") from None
        if encoding is None:  # UTF-8 all right: the XML itself is broken
            raise SourceError(f"{path}: not well-formed XML ({exc})") from None
        # Bytes in another encoding than the declared (or default UTF-8) one: decoded as such, the
        # declaration dropped so that the parser takes the text as it is.
        try:
            root = ET.fromstring(_XML_DECLARATION.sub("", text, count=1))
        except ET.ParseError as exc2:
            raise SourceError(f"{path}: not well-formed XML ({exc2})") from None
    else:
        encoding = None
    uid_el = root.find("uId")
    uid = uid_el.get("id") if uid_el is not None and uid_el.get("id") else path.stem
    sections: dict[str, str] = {}
    for el in root.iter("AbstractText"):
        label = el.get("Label") or ""
        text = "".join(el.itertext()).strip()
        name = section_name(label) if label else "text"
        sections[name] = f"{sections[name]} {text}".strip() if name in sections else text
    image_ids = [el.get("id") for el in root.iter("parentImage") if el.get("id")]
    mesh = [(el.text or "").strip() for el in root.iter() if el.tag in ("major", "automatic") and el.text]
    return IUReport(path=path, uid=uid, sections=sections, image_ids=image_ids, mesh=mesh, encoding=encoding)


def _xml_files(root: Path) -> list[Path]:
    folder = root / "ecgen-radiology" if (root / "ecgen-radiology").is_dir() else root
    xmls = sorted(folder.glob("*.xml"), key=lambda p: (len(p.stem), p.stem))
    if not xmls:
        raise SourceError(f"{root}: no report XML files (expected ecgen-radiology/*.xml)")
    return xmls


def _image_index(image_dir: Path, notes: list[str] | None = None) -> dict[str, Path]:
    """`{image id: file}` for the images of a folder (first suffix in IMAGE_SUFFIXES order wins; `notes` gets
    one line naming how many ids have more than one file, and which file was used for one of them)."""
    found: dict[str, Path] = {}
    others: dict[str, list[str]] = {}
    rank = {s: i for i, s in enumerate(IMAGE_SUFFIXES)}
    for p in sorted(image_dir.iterdir(), key=lambda p: (p.stem, rank.get(p.suffix.lower(), 99))):
        if p.is_file() and p.suffix.lower() in rank:
            if p.stem in found:
                others.setdefault(p.stem, []).append(p.name)
            else:
                found[p.stem] = p
    if others and notes is not None:
        stem = sorted(others)[0]
        notes.append(
            f"{len(others)} image id(s) have more than one file in {image_dir}; the first of "
            f"{', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES)} is used, e.g. {found[stem].name} "
            f"(not {', '.join(others[stem])})"
        )
    return found


@SOURCES.register("iu-xray", kind="report")
def scan_iu_xray(root: str | Path, opts: ScanOptions, vqa_lang: str = "en") -> SourceScan:
    """Plan every referenced image of the collection with its report text and a patient-hash split."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root} is not a folder")
    if opts.image_dir:
        image_dir = Path(opts.image_dir)
    else:
        image_dir = root / "images" if (root / "images").is_dir() else root
    if not image_dir.is_dir():
        raise SourceError(f"image folder {image_dir} does not exist; pass --image-dir")
    scan = SourceScan()
    images = _image_index(image_dir, scan.notes)
    for xml_path in _xml_files(root):
        rel_xml = str(xml_path.relative_to(root))
        if (link := outside_link(xml_path, root)) and not opts.follow_outside_links:
            scan.rejects.append(Reject(rel_xml, "symlink_outside_input", f"report is {link}", "report"))
            continue
        report = parse_iu_xml(xml_path)
        if report.encoding:
            scan.decoded.setdefault(report.encoding, []).append(rel_xml)
        if not report.image_ids:
            scan.rejects.append(Reject(rel_xml, "report_without_images", "no parentImage in the XML", "report"))
            continue
        text = extract_report_text(report.raw_text(), opts.sections)
        problem = check_report(text, opts.min_words)
        split = hash_split(report.uid, opts.val_fraction, opts.test_fraction)
        for image_id in report.image_ids:
            key = make_key(image_id)
            image = images.get(image_id)
            rel = (
                str(image.relative_to(root)) if image and image.is_relative_to(root) else f"{image_id} ({rel_xml})"
            )
            if image is None:
                scan.rejects.append(
                    Reject(rel, "missing_image", f"no {image_id}.png/.jpg in {image_dir}", key=key, split=split)
                )
                continue
            if problem:
                scan.rejects.append(Reject(rel, problem[0], problem[1], key=key, split=split))
                continue
            if (link := outside_link(image, image_dir)) and not opts.follow_outside_links:
                scan.rejects.append(Reject(rel, "symlink_outside_input", f"image is {link}", key=key, split=split))
                continue
            meta = {
                "source": "iu-xray",
                "subject_id": report.uid,
                "study_id": report.uid,
                "image_id": image_id,
                "view": None,
                "split": split,
                "labels": empty_labels(),
            }
            scan.items.append(
                SourceItem(key=key, image_path=str(image.resolve()), input=rel, text=text, meta=meta)
            )
    scan.items = dedupe_keys(scan.items, scan.rejects)
    scan.note_decoded()
    return scan
