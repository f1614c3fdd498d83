"""The MIMIC-CXR report section parser on the report shapes seen in MIMIC-CXR and Open-I."""

from __future__ import annotations

import pytest

from data_tools.sources.report_text import (
    count_words,
    extract_report_text,
    has_section_headers,
    last_paragraph,
    normalize_whitespace,
    parse_sections,
    section_name,
)

MIMIC_STANDARD = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough and fever  // ?pna

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  ___

 FINDINGS:

 The lungs are clear without focal consolidation.  No pleural effusion or
 pneumothorax is seen.  The cardiac and mediastinal silhouettes are stable.
 Calcification at 10:30 o'clock position.

 IMPRESSION:

 No acute cardiopulmonary process.
"""


def test_standard_mimic_report_sections_and_text():
    sections = parse_sections(MIMIC_STANDARD)
    assert sections["preamble"] == "FINAL REPORT"
    assert sections["examination"] == "CHEST (PA AND LAT)"
    assert sections["indication"] == "___F with cough and fever // ?pna"
    assert sections["comparison"] == "___"
    # A time like 10:30 inside a sentence is not a header; newlines inside a section become spaces.
    assert sections["findings"] == (
        "The lungs are clear without focal consolidation. No pleural effusion or pneumothorax is seen. "
        "The cardiac and mediastinal silhouettes are stable. Calcification at 10:30 o'clock position."
    )
    assert sections["impression"] == "No acute cardiopulmonary process."
    text = extract_report_text(MIMIC_STANDARD)
    assert text == sections["findings"] + " " + sections["impression"]
    assert extract_report_text(MIMIC_STANDARD, ["impression"]) == "No acute cardiopulmonary process."
    assert extract_report_text(MIMIC_STANDARD, ["impression", "findings"]).startswith("No acute")


def test_header_with_text_on_the_same_line_and_misspellings():
    report = "FINDINGS: Heart size is top normal.\nIMPRESSOIN: Mild vascular congestion.\n"
    assert parse_sections(report) == {
        "findings": "Heart size is top normal.",
        "impression": "Mild vascular congestion.",
    }
    assert extract_report_text("FINIDNGS: Small left effusion.\n") == "Small left effusion."


@pytest.mark.parametrize(
    "header", ["FINDINGS AND IMPRESSION", "CONCLUSION", "IMPRESSIONS", "Findings and impression".upper()]
)
def test_combined_and_conclusion_headers_count_as_impression(header):
    report = f"INDICATION: ___ with chest pain.\n\n{header}:\n Right lower lobe pneumonia.\n"
    assert parse_sections(report)["impression"] == "Right lower lobe pneumonia."
    assert extract_report_text(report) == "Right lower lobe pneumonia."


def test_no_wanted_section_falls_back_to_the_last_paragraph():
    report = (
        "                 FINAL REPORT\n CHEST RADIOGRAPH PERFORMED ON ___\n\n"
        " HISTORY: Line placement.\n\n"
        " The tip of the right internal jugular line projects over the mid SVC.\n"
        " No pneumothorax.\n"
    )
    assert extract_report_text(report) == (
        "The tip of the right internal jugular line projects over the mid SVC. No pneumothorax."
    )
    # MIMIC's last_paragraph: the text after the first paragraph of the last section, none when that
    # section is one paragraph; a report without any header is its own text.
    assert last_paragraph("A.\n\nNOTIFICATION:  Discussed with Dr. ___ at 9:00.") == ""
    assert last_paragraph("NOTIFICATION: Called.\n\nLeft effusion.\n\nNo change.") == "Left effusion. No change."
    assert last_paragraph("Small left effusion.") == "Small left effusion."


def test_empty_reports_and_empty_sections():
    assert extract_report_text("") == ""
    assert extract_report_text("   \n\n  ") == ""
    # The wanted headers exist but say nothing: an empty text, not some other section's text.
    assert extract_report_text("INDICATION: cough.\n\nFINDINGS:\n\nIMPRESSION:\n") == ""


def test_deid_marks_kept_whole_and_whitespace_normalised():
    report = "FINDINGS:\tThere are no XXXX of a pleural effusion.\r\n  Seen by ___ on ___ .\n"
    text = extract_report_text(report)
    assert text == "There are no XXXX of a pleural effusion. Seen by ___ on ___ ."
    assert "XXXX" in text.split() and text.split().count("___") == 2
    assert normalize_whitespace(" a \n\n b\tc ") == "a b c"


def test_repeated_section_keeps_the_last_and_unknown_headers_get_names():
    report = "FINDINGS: Left effusion.\nPA AND LATERAL VIEWS OF THE CHEST: done.\nFINDINGS: Right effusion.\n"
    sections = parse_sections(report)
    assert sections["findings"] == "Right effusion."  # the view header is findings too; the last one wins
    assert parse_sections("TUBES AND LINES: none.\n")["tubes_and_lines"] == "none."
    assert section_name("Wet Read") == "wet_read"
    assert has_section_headers(report) and not has_section_headers("A plain caption: no header here.")
    assert count_words(" one two  three ") == 3


# Reports in MIMIC-CXR's own layout (lines indented by one space, blank lines holding one space), written
# for these tests; the expected texts follow the rules of MIMIC-CXR's parser (MIT-LCP/mimic-cxr
# txt/section_parser.py + create_section_files.py), as report_text's docstring states them.
MIMIC_VIEW_HEADER = """                                 FINAL REPORT
 INDICATION:  ___ year old man with hypoxia.
 \n PORTABLE AP CHEST RADIOGRAPH:
 \n Endotracheal tube terminates 4 cm above the carina.  Lungs are clear.
 \n IMPRESSION:
 \n ET tube in standard position.
"""

MIMIC_PA_LAT_NO_IMPRESSION = """                                 FINAL REPORT
 HISTORY:  Cough.
 \n PA AND LATERAL VIEWS OF THE CHEST:  Heart size is normal.  No effusion.
 \n COMPARISON:  None.
"""

MIMIC_TITLE_AND_REPEATS = """                                 FINAL REPORT
 CHEST, PA LATERAL:
 \n INDICATION:   Fever.
 \n FINDINGS:  Old text, replaced by the addendum below.
 \n IMPRESSION:  Possible pneumonia.
 \n FINDINGS:
 \n FINAL IMPRESSION:  Right lower lobe pneumonia.
 \n HISTORY OF PRESENT ILLNESS:  Fever for 3 days.
"""

MIMIC_NO_FINDINGS = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PORTABLE AP)
 \n INDICATION:  Line placement.  Check at 10:30.
 \n The tip of the right PICC projects over the cavoatrial junction.
 \n No pneumothorax.
"""


def test_mimic_view_headers_open_a_findings_section():
    sections = parse_sections(MIMIC_VIEW_HEADER)
    assert sections["findings"] == "Endotracheal tube terminates 4 cm above the carina. Lungs are clear."
    assert extract_report_text(MIMIC_VIEW_HEADER) == (
        "Endotracheal tube terminates 4 cm above the carina. Lungs are clear. ET tube in standard position."
    )
    assert extract_report_text(MIMIC_PA_LAT_NO_IMPRESSION) == "Heart size is normal. No effusion."
    for header in ("PORTABLE AP CHEST RADIOGRAPH", "PA AND LATERAL VIEWS OF THE CHEST", "CHEST, TWO VIEWS",
                   "FRONTAL AND LATERAL VIEWS", "AP VIEW", "RIBS, LEFT"):  # fmt: skip
        assert section_name(header) == "findings", header


def test_mimic_empty_findings_dropped_last_occurrence_wins_and_names_contained():
    sections = parse_sections(MIMIC_TITLE_AND_REPEATS)
    # the empty title header and the second, empty FINDINGS are dropped: the earlier findings stand
    assert sections["findings"] == "Old text, replaced by the addendum below."
    assert sections["impression"] == "Right lower lobe pneumonia."  # FINAL IMPRESSION, the last one
    assert sections["history"] == "Fever for 3 days."  # HISTORY OF PRESENT ILLNESS contains "history"
    assert sections["indication"] == "Fever."
    assert extract_report_text(MIMIC_TITLE_AND_REPEATS) == (
        "Old text, replaced by the addendum below. Right lower lobe pneumonia."
    )


def test_mimic_last_paragraph_is_the_last_section_after_its_first_paragraph():
    # no findings / impression: the last section (indication) after its first paragraph, both paragraphs
    assert extract_report_text(MIMIC_NO_FINDINGS) == (
        "The tip of the right PICC projects over the cavoatrial junction. No pneumothorax."
    )
    assert parse_sections(MIMIC_NO_FINDINGS)["examination"] == "CHEST (PORTABLE AP)"  # 10:30 is no header
