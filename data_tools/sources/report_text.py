"""Radiology report section parser following the MIMIC-CXR convention (SPEC §4.1).

The reference is MIMIC-CXR's own parser (MIT-LCP/mimic-cxr `txt/section_parser.py` and the selection in
`txt/create_section_files.py`); on a report in MIMIC's layout this module decides as it does:

- a header is an upper-case phrase at the start of a line (letters, spaces and `()/,-`) followed by `:`
  and white space; the text up to the next header is that section, the text before the first header the
  `preamble`;
- header names are normalised: synonyms and misspellings map to the standard names (`FINDINGS AND
  IMPRESSION` and `CONCLUSION` count as the impression); a name that *contains* impression, findings,
  history, comparison or addendum is that section; a header that names the view or the study (`PORTABLE AP
  CHEST RADIOGRAPH`, `PA AND LATERAL VIEWS OF THE CHEST`, `CHEST, TWO VIEWS`, ...) opens a findings section;
- empty findings / impression sections are dropped, and when a section occurs more than once, its last
  occurrence wins;
- when neither findings nor impression exists, the text after the first paragraph of the last section
  (MIMIC's `last_paragraph`) is used.

One rule is not copied: after a header, the official parser starts looking for the next one only on the
following line, so a header line directly under an empty header (`FINDINGS:` then `IMPRESSION: ...`) is
swallowed into the first section; here each header line counts. Headers may also hold digits and `&`
(Open-I's reports, read through the same parser).

De-identification marks (`___` in MIMIC, `XXXX` in Indiana) are kept exactly as they are, so a tokenizer
can keep them whole; all runs of whitespace become one space.
"""

from __future__ import annotations

import re

# A header: upper-case words (digits, spaces, `/&(),-` allowed) at the start of a line, a colon, then white
# space or the end. The colon must not be part of a time ("10:30"): headers start with a letter and end in a
# letter or `)`.
_HEADER_RE = re.compile(r"^[ \t]*([A-Z][A-Z0-9 ,/&()\-]*[A-Z)])[ \t]*:(?=\s|$)", re.MULTILINE)
_WS_RE = re.compile(r"\s+")
_PARAGRAPH_RE = re.compile(r"\n[ \t]*\n")

# Header spellings seen in MIMIC-CXR / Open-I reports -> standard section name (MIMIC's frequent names,
# their typos, and Open-I's).
SECTION_SYNONYMS: dict[str, str] = {
    "FINDINGS": "findings",
    "FINDING": "findings",
    "FINDNGS": "findings",
    "FINIDNGS": "findings",
    "FIDNINGS": "findings",
    "FINDINS": "findings",
    "FINDINDGS": "findings",
    "FINDGINGS": "findings",
    "FINDNINGS": "findings",
    "FINDINGS/COMMENTS": "findings",
    "REFERENCE FINDINGS": "findings",
    "CHEST, TWO VIEWS": "findings",
    "IMPRESSION": "impression",
    "IMPRESSIONS": "impression",
    "IMPRESION": "impression",
    "IMPRESSON": "impression",
    "IMPRESSOIN": "impression",
    "IMPRERSSION": "impression",
    "IMPRRESSION": "impression",
    "IMORESSION": "impression",
    "IMPRSSION": "impression",
    "IMPERSSION": "impression",
    "MPRESSION": "impression",
    "IMPESSION": "impression",
    "IMPRESSIONS/RECOMMENDATIONS": "impression",
    "FINDINGS AND IMPRESSION": "impression",
    "FINDINGS AND IMPRESSIONS": "impression",
    "FINDINGS/IMPRESSION": "impression",
    "FINDINGS / IMPRESSION": "impression",
    "FINDINGS/ IMPRESSION": "impression",
    "IMPRESSION AND FINDINGS": "impression",
    "CONCLUSION": "impression",
    "CONCLUSIONS": "impression",
    "SUMMARY": "impression",
    "INDICATION": "indication",
    "INDICATIONS": "indication",
    "IDICATION": "indication",
    "CLINICAL INDICATION": "indication",
    "REASON FOR EXAM": "indication",
    "REASON FOR EXAMINATION": "indication",
    "HISTORY": "history",
    "CLINICAL HISTORY": "history",
    "CLINICAL INFORMATION": "history",
    "PATIENT HISTORY": "history",
    "PFI": "history",
    "COMPARISON": "comparison",
    "COMPARISONS": "comparison",
    "COMPARISION": "comparison",
    "COMPARSION": "comparison",
    "COMPARRISON": "comparison",
    "COMPARISIONS": "comparison",
    "REFERENCE EXAM": "comparison",
    "TECHNIQUE": "technique",
    "EXAMINATION": "examination",
    "EXAM": "examination",
    "TYPE OF EXAMINATION": "examination",
    "NOTIFICATION": "notification",
    "RECOMMENDATION": "recommendation",
    "RECOMMENDATIONS": "recommendation",
    "RECOMMENDATION(S)": "recommendation",
    "WET READ": "wet_read",
    "WETREAD": "wet_read",
}

# MIMIC's rule for other names: one that contains a main section's name is that section ...
_MAIN_SECTIONS: tuple[str, ...] = ("impression", "findings", "history", "comparison", "addendum")
# ... and one that names the view or the study describes the whole film: findings.
_VIEW_HEADER_RE = re.compile(
    r"chest|portable|pa and lateral|lateral and pa|ap and lateral|lateral and ap|frontal and|two views"
    r"|frontal view|pa view|ap view|one view|lateral view|bone window|frontal upright|frontal semi-upright"
    r"|ribs|pa and lat"
)

DEFAULT_SECTIONS: tuple[str, ...] = ("findings", "impression")


class NotText(ValueError):
    """A report file whose bytes are not text (an image, an archive, random bytes): never stored as a report."""


def _utf16_without_bom(raw: bytes) -> str | None:
    """`utf-16-le` / `utf-16-be` when the bytes look like UTF-16 text without a byte-order mark (ASCII-range
    text leaves every other byte zero), else None."""
    head = raw[:4096]
    if len(head) < 4 or len(head) % 2:
        return None
    even, odd = head[0::2], head[1::2]
    for zeros, codec in ((odd, "utf-16-le"), (even, "utf-16-be")):
        if zeros.count(0) >= 0.9 * len(zeros):
            try:
                raw.decode(codec)
            except UnicodeDecodeError:
                return None
            return codec
    return None


_CONTROL = set(range(0, 32)) - {9, 10, 12, 13}


def decode_report(raw: bytes) -> tuple[str, str | None]:
    """A report file's bytes -> `(text, encoding used when it was not UTF-8)`; never a U+FFFD.

    UTF-8 (with or without a BOM) and UTF-16 (with a BOM, or without one when every other byte is zero) are
    read as such; other bytes are decoded as cp1252 (the Windows superset of Latin-1 that old report exports
    use), else as Latin-1, which decodes any byte. The caller warns about the second value.

    Raises:
        NotText: bytes that are not text in any of these (NUL bytes, many control bytes): a binary file.
    """
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return raw.decode("utf-16"), "utf-16"
        except UnicodeDecodeError:
            pass
    if codec := _utf16_without_bom(raw):
        return raw.decode(codec), codec
    head = raw[:4096]
    control = sum(b in _CONTROL for b in head)
    if b"\0" in head or control > max(2, len(head) // 100):
        raise NotText(f"binary data, not text ({control} control bytes in the first {len(head)})")
    try:
        return raw.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        pass
    try:
        return raw.decode("cp1252"), "cp1252"
    except UnicodeDecodeError:  # bytes cp1252 leaves undefined (0x81, 0x8d, 0x8f, 0x90, 0x9d)
        return raw.decode("latin-1"), "latin-1"


def normalize_whitespace(text: str) -> str:
    """Collapse every run of whitespace (newlines included) to one space and strip the ends."""
    return _WS_RE.sub(" ", text).strip()


def section_name(header: str) -> str:
    """Map a raw header (`"IMPRESSOIN"`, `"PORTABLE AP CHEST RADIOGRAPH"`) to a standard lower-case name.

    Synonyms first, then MIMIC's rules (module docstring): a name containing a main section's name is that
    section, a view or study header is `findings`; other headers become their own lower-case,
    underscore-joined name (`"TUBES AND LINES"` -> `"tubes_and_lines"`).
    """
    key = normalize_whitespace(header).upper()
    if key in SECTION_SYNONYMS:
        return SECTION_SYNONYMS[key]
    lower = key.lower()
    for main in _MAIN_SECTIONS:
        if main in lower:
            return main
    if _VIEW_HEADER_RE.search(lower):
        return "findings"
    return re.sub(r"[^a-z0-9]+", "_", lower).strip("_")


def split_sections(text: str) -> list[tuple[str, str]]:
    """The report as `[(standard name, raw body), ...]` in order, MIMIC's way.

    Text before the first header is `preamble`; a report without any header is one `full_report` section.
    Empty findings / impression sections are left out (a title line such as `CHEST, PA LATERAL:` right
    above the real sections, or a second, empty FINDINGS header).
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    matches = list(_HEADER_RE.finditer(text))
    if not matches:
        return [("full_report", text)]
    out = [("preamble", text[: matches[0].start()])]
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        out.append((section_name(match.group(1)), text[match.end() : end]))
    return [(name, body) for name, body in out if name not in ("findings", "impression") or body.strip()]


def parse_sections(text: str) -> dict[str, str]:
    """Split a report into `{standard section name: whitespace-normalised text}`.

    The `preamble` (MIMIC's `FINAL REPORT` line and friends) is returned when non-empty. A section that
    occurs more than once keeps its last occurrence, as MIMIC-CXR's parser does.
    """
    sections = split_sections(text)
    if sections[0][0] == "full_report":
        return {}
    parsed: dict[str, str] = {}
    for name, body in sections:
        parsed[name] = normalize_whitespace(body)
    if not parsed.get("preamble"):
        parsed.pop("preamble", None)
    return parsed


def last_paragraph(text: str) -> str:
    """MIMIC's `last_paragraph`: the text after the first paragraph of the report's last section.

    Paragraphs are separated by blank lines; a last section of one paragraph gives `""`, except in a report
    without any header, which is its own text (a caption, a one-paragraph note).
    """
    sections = split_sections(text)
    body = sections[-1][1]
    paragraphs = [p for p in _PARAGRAPH_RE.split(body) if p.strip()]
    if len(paragraphs) > 1:
        return normalize_whitespace(" ".join(paragraphs[1:]))
    if sections[0][0] == "full_report":
        return normalize_whitespace(body)
    return ""


def extract_report_text(text: str, sections: tuple[str, ...] | list[str] = DEFAULT_SECTIONS) -> str:
    """The report text stored in a shard: the wanted sections, in the order asked, joined by one space.

    Args:
        text: the raw report (a MIMIC `sNNN.txt` file, or sections already joined with headers).
        sections: standard section names (see `SECTION_SYNONYMS`), default FINDINGS then IMPRESSION.

    Returns:
        The normalised text; when none of the wanted sections exists (empty ones are dropped) and none of
        them is findings / impression, MIMIC's `last_paragraph` when a standard section was wanted;
        `""` for an empty report.
    """
    parsed = parse_sections(text)
    wanted = [parsed[name] for name in sections if parsed.get(name)]
    if wanted:
        return " ".join(wanted)
    if any(name in parsed for name in sections) or not text.strip():
        return ""
    if any(name in ("findings", "impression") for name in sections):
        return last_paragraph(text)
    return ""


def count_words(text: str) -> int:
    """Whitespace-separated words."""
    return len(text.split())


_DEID = re.compile(r"_{2,}|\bX{2,}\b")
_HAS_WORD = re.compile(r"\w", re.UNICODE)


def count_content_words(text: str) -> int:
    """Words that carry content, the unit of `--min-words`: de-identification marks (`___` in MIMIC, `XXXX` in
    Indiana) and tokens without a letter or digit (`-`, `.`) do not count."""
    return sum(1 for word in _DEID.sub(" ", text).split() if _HAS_WORD.search(word.replace("_", "")))


def has_section_headers(text: str) -> bool:
    """True when the text holds at least one MIMIC-style `HEADER:` line."""
    return _HEADER_RE.search(text) is not None
