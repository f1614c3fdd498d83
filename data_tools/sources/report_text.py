"""Radiology report section parser following the MIMIC-CXR convention (SPEC §4.1).

MIMIC-CXR's own `section_parser.py` (MIT-LCP/mimic-cxr) treats an upper-case phrase at the start of a
line, ending in `:`, as a section header; the text up to the next header is that section. Synonyms and
common misspellings map to the standard names (`FINDINGS AND IMPRESSION` and `CONCLUSION` count as the
impression). When none of the wanted sections exists, the report's last paragraph is used.

De-identification marks (`___` in MIMIC, `XXXX` in Indiana) are kept exactly as they are, so a tokenizer
can keep them whole; all runs of whitespace become one space.
"""

from __future__ import annotations

import re

# A header: upper-case words (digits, spaces, `/&(),-` allowed) at the start of a line, then a colon.
# The colon must not be part of a time ("10:30") — headers start with a letter and end in a letter or `)`.
_HEADER_RE = re.compile(r"^[ \t]*([A-Z][A-Z0-9 ,/&()\-]*[A-Z)])[ \t]*:", re.MULTILINE)
_WS_RE = re.compile(r"\s+")
_PARAGRAPH_RE = re.compile(r"\n[ \t]*\n")

# Header spellings seen in MIMIC-CXR / Open-I reports -> standard section name.
SECTION_SYNONYMS: dict[str, str] = {
    "FINDINGS": "findings",
    "FINDING": "findings",
    "FINDNGS": "findings",
    "FINIDNGS": "findings",
    "FIDNINGS": "findings",
    "FINDINS": "findings",
    "FINDINGS/COMMENTS": "findings",
    "IMPRESSION": "impression",
    "IMPRESSIONS": "impression",
    "IMPRESION": "impression",
    "IMPRESSON": "impression",
    "IMPRESSOIN": "impression",
    "IMPRERSSION": "impression",
    "IMPRESSIONS/RECOMMENDATIONS": "impression",
    "FINDINGS AND IMPRESSION": "impression",
    "FINDINGS AND IMPRESSIONS": "impression",
    "FINDINGS/IMPRESSION": "impression",
    "FINDINGS / IMPRESSION": "impression",
    "IMPRESSION AND FINDINGS": "impression",
    "CONCLUSION": "impression",
    "CONCLUSIONS": "impression",
    "SUMMARY": "impression",
    "INDICATION": "indication",
    "INDICATIONS": "indication",
    "CLINICAL INDICATION": "indication",
    "REASON FOR EXAM": "indication",
    "REASON FOR EXAMINATION": "indication",
    "HISTORY": "history",
    "CLINICAL HISTORY": "history",
    "COMPARISON": "comparison",
    "COMPARISONS": "comparison",
    "TECHNIQUE": "technique",
    "EXAMINATION": "examination",
    "EXAM": "examination",
    "NOTIFICATION": "notification",
    "RECOMMENDATION": "recommendation",
    "RECOMMENDATIONS": "recommendation",
    "WET READ": "wet_read",
}

DEFAULT_SECTIONS: tuple[str, ...] = ("findings", "impression")


def decode_report(raw: bytes) -> tuple[str, str | None]:
    """A report file's bytes -> `(text, encoding used when it was not UTF-8)`; never a U+FFFD.

    UTF-8 (with or without a BOM) and BOM-marked UTF-16 are read as such; other bytes are decoded as
    cp1252 (the Windows superset of Latin-1 that old report exports use), else as Latin-1, which
    decodes any byte. The caller warns about the second value.
    """
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return raw.decode("utf-16"), "utf-16"
        except UnicodeDecodeError:
            pass
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
    """Map a raw header (`"IMPRESSOIN"`, `"Findings and impression"`) to a standard lower-case name.

    Unknown headers become their own lower-case, underscore-joined name (`"PA AND LATERAL"` ->
    `"pa_and_lateral"`).
    """
    key = normalize_whitespace(header).upper()
    if key in SECTION_SYNONYMS:
        return SECTION_SYNONYMS[key]
    return re.sub(r"[^a-z0-9]+", "_", key.lower()).strip("_")


def parse_sections(text: str) -> dict[str, str]:
    """Split a report into `{standard section name: whitespace-normalised text}`.

    The text before the first header (MIMIC's `FINAL REPORT` line and friends) is returned under
    `"preamble"` when non-empty. A section that appears twice keeps both texts, joined by one space.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    sections: dict[str, str] = {}
    matches = list(_HEADER_RE.finditer(text))
    preamble = normalize_whitespace(text[: matches[0].start()] if matches else text)
    if preamble:
        sections["preamble"] = preamble
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        body = normalize_whitespace(text[match.end() : end])
        name = section_name(match.group(1))
        if name in sections and body:
            sections[name] = f"{sections[name]} {body}".strip()
        elif body or name not in sections:
            sections[name] = body
    return sections


def last_paragraph(text: str) -> str:
    """The last non-empty paragraph (blank-line separated), with a leading `HEADER:` removed."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    paragraphs = [p for p in _PARAGRAPH_RE.split(text) if p.strip()]
    if not paragraphs:
        return ""
    para = paragraphs[-1]
    match = _HEADER_RE.match(para)
    if match:
        para = para[match.end() :]
    return normalize_whitespace(para)


def extract_report_text(text: str, sections: tuple[str, ...] | list[str] = DEFAULT_SECTIONS) -> str:
    """The report text stored in a shard: the wanted sections, in the order asked, joined by one space.

    Args:
        text: the raw report (a MIMIC `sNNN.txt` file, or sections already joined with headers).
        sections: standard section names (see `SECTION_SYNONYMS`), default FINDINGS then IMPRESSION.

    Returns:
        The normalised text, or the last paragraph when none of the wanted sections exists, or `""`
        for an empty report.
    """
    parsed = parse_sections(text)
    wanted = [parsed[name] for name in sections if parsed.get(name)]
    if wanted:
        return " ".join(wanted)
    if any(name in parsed for name in sections):
        # The wanted headers exist but are empty: the report says nothing there.
        return ""
    return last_paragraph(text)


def count_words(text: str) -> int:
    """Whitespace-separated words, the unit of `--min-words`."""
    return len(text.split())


def has_section_headers(text: str) -> bool:
    """True when the text holds at least one MIMIC-style `HEADER:` line."""
    return _HEADER_RE.search(text) is not None
