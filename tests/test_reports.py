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
    # A last paragraph that starts with a header loses the header.
    assert (
        last_paragraph("A.\n\nNOTIFICATION:  Discussed with Dr. ___ at 9:00.") == "Discussed with Dr. ___ at 9:00."
    )


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


def test_repeated_section_is_joined_and_unknown_headers_get_names():
    report = "FINDINGS: Left effusion.\nPA AND LATERAL VIEWS OF THE CHEST: done.\nFINDINGS: Right effusion.\n"
    sections = parse_sections(report)
    assert sections["findings"] == "Left effusion. Right effusion."
    assert sections["pa_and_lateral_views_of_the_chest"] == "done."
    assert section_name("Wet Read") == "wet_read"
    assert has_section_headers(report) and not has_section_headers("A plain caption: no header here.")
    assert count_words(" one two  three ") == 3
