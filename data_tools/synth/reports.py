"""Sample the findings of a synthetic study and write its MIMIC-style free-text report.

`sample_findings` draws the 14 CheXpert labels (1 positive, 0 negative, -1 uncertain, None not
mentioned) with the attributes the image renderer needs (side, size, zone, devices, ...).
`write_report` turns them into a report in the MIMIC-CXR shape (FINAL REPORT, EXAMINATION,
INDICATION with ``___``, TECHNIQUE, COMPARISON, FINDINGS, IMPRESSION), where:

- every positive finding is stated without negation or hedging ("Moderate left pleural effusion."),
- every uncertain one is hedged ("Possible small right pleural effusion.", "... cannot be excluded."),
- every negative one is negated ("No pneumothorax."), and
- a label left blank is never named in FINDINGS or IMPRESSION.

So the CheXpert CSV and the report text agree, and both agree with the image.
"""

from __future__ import annotations

import textwrap
from typing import Any

import numpy as np

from data_tools.shard_format import CHEXPERT_LABELS

Findings = dict[str, dict[str, Any]]

#: Labels whose presence makes "No Finding" blank (Support Devices are not a pathology).
PATHOLOGIES = tuple(name for name in CHEXPERT_LABELS if name not in ("No Finding", "Support Devices"))

# name: (P(positive), P(uncertain), default P(negated | not positive or uncertain))
_RATES: dict[str, tuple[float, float, float]] = {
    "Atelectasis": (0.14, 0.04, 0.1),
    "Cardiomegaly": (0.20, 0.04, 0.45),
    "Consolidation": (0.10, 0.03, 0.55),
    "Edema": (0.12, 0.04, 0.4),
    "Enlarged Cardiomediastinum": (0.07, 0.02, 0.25),
    "Fracture": (0.07, 0.0, 0.1),
    "Lung Lesion": (0.08, 0.02, 0.05),
    "Lung Opacity": (0.12, 0.03, 0.1),
    "Pleural Effusion": (0.20, 0.05, 0.65),
    "Pleural Other": (0.07, 0.0, 0.04),
    "Pneumonia": (0.08, 0.03, 0.25),
    "Pneumothorax": (0.07, 0.02, 0.65),
    "Support Devices": (0.18, 0.0, 0.05),
}
DEFAULT_NORMAL_RATE = 0.3
"""Default share of studies with no pathology at all ("No Finding"; support devices may still be present)."""

DEFAULT_NEGATION_RATES: dict[str, float] = {name: rates[2] for name, rates in _RATES.items()}
"""Default probability that a report rules a finding out in words ("No pneumothorax.") when the study does not
have it; otherwise the report does not name it and its CheXpert label is blank. Roughly MIMIC-CXR's: effusion,
pneumothorax, consolidation and heart size are ruled out often, rarer findings seldom."""

_SIDES = ("right", "left")
_DEVICES = ("ett", "ngt", "ij_line", "picc", "pacemaker")
_LOBES = {
    ("right", "upper"): "right upper lobe",
    ("right", "mid"): "right middle lobe",
    ("right", "lower"): "right lower lobe",
    ("left", "upper"): "left upper lobe",
    ("left", "mid"): "lingula",
    ("left", "lower"): "left lower lobe",
}


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def check_rates(normal_rate: float, negation_rates: dict[str, float] | None) -> dict[str, float]:
    """The full negation-rate table (defaults updated by ``negation_rates``), after checking every value.

    Raises:
        ValueError: a rate outside [0, 1] or a name that is not a finding the reports can rule out.
    """
    if not 0.0 <= normal_rate <= 1.0:
        raise ValueError(f"normal_rate must be in [0, 1], got {normal_rate}")
    table = dict(DEFAULT_NEGATION_RATES)
    for name, rate in (negation_rates or {}).items():
        if name not in table:
            raise ValueError(f"negation rate for {name!r}: not one of {', '.join(table)}")
        if not 0.0 <= float(rate) <= 1.0:
            raise ValueError(f"negation rate for {name!r} must be in [0, 1], got {rate}")
        table[name] = float(rate)
    return table


def sample_findings(
    rng: np.random.Generator,
    *,
    portable: bool,
    normal_rate: float = DEFAULT_NORMAL_RATE,
    negation_rates: dict[str, float] | None = None,
) -> Findings:
    """Draw the labels and attributes of one study.

    Args:
        rng: the random generator (the caller seeds it per study).
        portable: an AP portable study (more support devices, as on an ICU film).
        normal_rate: probability that the study has no pathology at all.
        negation_rates: per finding, the probability that the report rules it out in words when the study does
            not have it (default `DEFAULT_NEGATION_RATES`; names missing here keep their default).
    """
    negate = DEFAULT_NEGATION_RATES if negation_rates is None else {**DEFAULT_NEGATION_RATES, **negation_rates}
    f: Findings = {}
    normal = rng.random() < normal_rate
    for name, (p_pos, p_unc, _) in _RATES.items():
        p_neg = negate[name]
        if name == "Support Devices" and portable:
            p_pos = 0.55
        r = rng.random()
        if not normal or name == "Support Devices":
            if r < p_pos:
                f[name] = {"state": 1}
            elif r < p_pos + p_unc:
                f[name] = {"state": -1}
        if name not in f and rng.random() < p_neg:
            f[name] = {"state": 0}
    for name, entry in f.items():
        if entry["state"] == 0:
            continue
        side = _pick(rng, _SIDES)
        if name == "Cardiomegaly":
            entry["severity"] = _pick(rng, ("mild", "moderate", "severe"))
        elif name == "Pleural Effusion":
            entry["side"] = _pick(rng, ("right", "left", "bilateral"))
            entry["size"] = _pick(rng, ("small", "moderate", "large")) if entry["state"] == 1 else "small"
        elif name == "Pneumothorax":
            entry["side"] = side
            entry["size"] = _pick(rng, ("small", "moderate", "large")) if entry["state"] == 1 else "small"
        elif name == "Edema":
            entry["severity"] = _pick(rng, ("mild", "moderate", "severe")) if entry["state"] == 1 else "mild"
        elif name in ("Consolidation", "Lung Opacity", "Pneumonia"):
            entry["side"] = side
            entry["zone"] = _pick(rng, ("upper", "mid", "lower", "lower"))
        elif name == "Lung Lesion":
            entry["side"] = side
            entry["zone"] = _pick(rng, ("upper", "mid", "lower"))
            entry["size_cm"] = round(float(rng.uniform(0.9, 5.5)), 1)
        elif name == "Atelectasis":
            entry["side"] = _pick(rng, ("right", "left", "bilateral"))
        elif name in ("Fracture", "Pleural Other"):
            entry["side"] = side
            entry["rib"] = int(rng.integers(4, 9))
        elif name == "Support Devices":
            k = 1 + int(rng.integers(3 if portable else 2))
            entry["devices"] = sorted(rng.choice(len(_DEVICES), size=k, replace=False).tolist())
            entry["devices"] = [_DEVICES[i] for i in entry["devices"]]
            entry["ett_cm"] = round(float(rng.uniform(2.5, 6.0)), 1)
    if not any(f.get(name, {}).get("state") in (1, -1) for name in PATHOLOGIES):
        f["No Finding"] = {"state": 1}
    return f


def labels_of(f: Findings) -> dict[str, int | None]:
    """The 14 CheXpert labels of a study, in CSV column order (None = blank)."""
    return {name: f[name]["state"] if name in f else None for name in CHEXPERT_LABELS}


def _ordinal(n: int) -> str:
    return {4: "fourth", 5: "fifth", 6: "sixth", 7: "seventh", 8: "eighth"}.get(n, f"{n}th")


def _side_words(side: str, noun: str) -> str:
    return f"bilateral {noun}s" if side == "bilateral" else f"{side} {noun}"


def _positive(name: str, e: dict, rng: np.random.Generator) -> str:
    side = e.get("side", "right")
    if name == "Cardiomegaly":
        sev = e["severity"]
        return _pick(rng, (f"{sev.capitalize()} cardiomegaly.", f"The heart is {sev}ly enlarged.",
                           f"The cardiac silhouette is {sev}ly enlarged.",
                           f"{sev.capitalize()} enlargement of the cardiac silhouette."))  # fmt: skip
    if name == "Enlarged Cardiomediastinum":
        return _pick(rng, ("The superior mediastinum is widened.", "Widening of the mediastinum."))
    if name == "Pleural Effusion":
        size = e["size"]
        if side == "bilateral":
            return _pick(rng, (f"{size.capitalize()} bilateral pleural effusions.",
                               f"There are {size} bilateral pleural effusions."))  # fmt: skip
        return _pick(rng, (f"{size.capitalize()} {side} pleural effusion.",
                           f"There is a {size} {side} pleural effusion with a meniscus.",
                           f"A {size} {side}-sided pleural effusion is present.",
                           f"Blunting of the {side} costophrenic angle due to a {size} pleural effusion."))  # fmt: skip
    if name == "Pneumothorax":
        where = "apical " if e["size"] == "small" else ""
        return _pick(rng, (f"{e['size'].capitalize()} {side} {where}pneumothorax.",
                           f"There is a {e['size']} {side} {where}pneumothorax.",
                           f"A {e['size']} {side} {where}pneumothorax is present."))  # fmt: skip
    if name == "Lung Lesion":
        lobe = _LOBES[(side, e["zone"])]
        kind = "mass" if e["size_cm"] >= 3.0 else "nodule"
        return _pick(rng, (f"A {e['size_cm']} cm {kind} is seen in the {lobe}.",
                           f"{e['size_cm']} cm {kind} in the {lobe}."))  # fmt: skip
    if name == "Consolidation":
        lobe = _LOBES[(side, e["zone"])]
        return _pick(rng, (f"Focal consolidation in the {lobe}.", f"There is consolidation of the {lobe}.",
                           f"Dense consolidation is present in the {lobe}."))  # fmt: skip
    if name == "Lung Opacity":
        lobe = _LOBES[(side, e["zone"])]
        return _pick(rng, (f"Patchy opacity in the {lobe}.", f"Patchy opacities are seen in the {lobe}."))
    if name == "Pneumonia":
        lobe = _LOBES[(side, e["zone"])]
        return _pick(rng, (f"{lobe[0].upper() + lobe[1:]} pneumonia.",
                           f"Airspace disease in the {lobe}, consistent with pneumonia.",
                           f"Findings are consistent with pneumonia in the {lobe}."))  # fmt: skip
    if name == "Edema":
        return _pick(rng, (f"{e['severity'].capitalize()} pulmonary edema with perihilar haziness.",
                           f"There is {e['severity']} pulmonary edema."))  # fmt: skip
    if name == "Atelectasis":
        if side == "bilateral":
            return _pick(rng, ("Bibasilar atelectasis.", "Plate-like atelectasis at both lung bases."))
        return _pick(
            rng, (f"Linear atelectasis at the {side} lung base.", f"{side.capitalize()} basilar atelectasis.")
        )
    if name == "Fracture":
        rib = _ordinal(e["rib"])
        return _pick(rng, (f"Fracture of the {side} {rib} posterior rib.",
                           f"There is a displaced fracture of the {side} {rib} rib."))  # fmt: skip
    if name == "Pleural Other":
        return _pick(rng, (f"{side.capitalize()} apical pleural thickening.", f"There is a {side} apical cap."))
    raise KeyError(name)


def _devices(e: dict) -> list[str]:
    text = {
        "ett": f"Endotracheal tube terminates {e['ett_cm']} cm above the carina.",
        "ngt": "Enteric tube courses below the diaphragm into the stomach.",
        "ij_line": "Right internal jugular central venous catheter ends in the superior vena cava.",
        "picc": "Left PICC line terminates in the low superior vena cava.",
        "pacemaker": "Left chest wall pacemaker with leads in the right atrium and right ventricle.",
    }
    return [text[d] for d in e["devices"]]


def _uncertain(name: str, e: dict, rng: np.random.Generator) -> str:
    side = e.get("side", "right")

    def lobe(default_zone: str) -> str:
        return _LOBES[(side, e.get("zone", default_zone))]

    if name == "Pleural Effusion":
        what = "small " + ("bilateral pleural effusions" if side == "bilateral" else f"{side} pleural effusion")
    elif name == "Atelectasis":
        what = "bibasilar atelectasis" if side == "bilateral" else f"{side} basilar atelectasis"
    elif name == "Pneumothorax":
        what = f"small {side} apical pneumothorax"
    elif name == "Lung Lesion":
        what = f"nodule in the {lobe('upper')}"
    elif name == "Consolidation":
        what = f"consolidation in the {lobe('lower')}"
    elif name == "Lung Opacity":
        what = f"faint opacity in the {lobe('lower')}"
    elif name == "Pneumonia":
        what = f"pneumonia in the {lobe('lower')}"
    else:
        what = {"Cardiomegaly": "mild cardiomegaly", "Enlarged Cardiomediastinum": "mediastinal widening",
                "Edema": "mild pulmonary edema"}[name]  # fmt: skip
    return _pick(rng, (f"Possible {what}.", f"{what[0].upper() + what[1:]} cannot be excluded.",
                       f"Questionable {what}.", f"Cannot exclude {what}."))  # fmt: skip


def _negative(names: list[str], rng: np.random.Generator) -> list[str]:
    words = {
        "Cardiomegaly": _pick(rng, ("Heart size is normal.", "No cardiomegaly.")),
        "Enlarged Cardiomediastinum": "The mediastinal contours are normal.",
        "Fracture": "No displaced rib fracture.",
        "Support Devices": "No lines or tubes.",
        "Pneumonia": "No evidence of pneumonia.",
    }
    short = {"Pleural Effusion": "pleural effusion", "Pneumothorax": "pneumothorax", "Consolidation": "focal consolidation",
             "Edema": "pulmonary edema", "Atelectasis": "atelectasis", "Lung Lesion": "suspicious nodule",
             "Lung Opacity": "focal opacity", "Pleural Other": "pleural thickening"}  # fmt: skip
    out = [words[n] for n in names if n in words]
    listed = [short[n] for n in names if n in short]
    if listed:
        joined = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " or " + listed[-1]
        out.append(_pick(rng, (f"No {joined}.", f"There is no {joined}.", f"No {joined} is seen.",
                               f"The lungs are clear without {joined}.")))  # fmt: skip
    return out


_INDICATIONS = (
    "___ year old {sex} with shortness of breath.", "___ year old {sex} with cough and fever // ? pneumonia",
    "___{s} with chest pain, evaluate for acute process.", "History: ___{s} with hypoxia",
    "___ year old {sex} status post fall, evaluate for fracture.", "___{s} with new line placement.",
    "___ year old {sex} with dyspnea on exertion.", "___ year old {sex} with fever and leukocytosis.",
    "Evaluate for interval change since ___.", "___{s} intubated, evaluate tube position.",
    "Preoperative evaluation for ___.",
)  # fmt: skip


def write_report(f: Findings, views: list[str], rng: np.random.Generator, sex: str) -> str:
    """The MIMIC-style report of a study with findings ``f`` and films ``views``."""
    shape = _pick(rng, ("standard",) * 6 + ("no_impression", "impression_only", "combined"))
    detail: list[str] = []
    summary: list[str] = []
    order = ("Support Devices", "Lung Lesion", "Consolidation", "Lung Opacity", "Pneumonia", "Atelectasis", "Edema",
             "Pleural Effusion", "Pneumothorax", "Pleural Other", "Cardiomegaly", "Enlarged Cardiomediastinum", "Fracture")  # fmt: skip
    for name in order:
        e = f.get(name)
        if not e or e["state"] == 0:
            continue
        if name == "Support Devices":
            detail += _devices(e)
        elif e["state"] == 1:
            detail.append(_positive(name, e, rng))
        else:
            detail.append(_uncertain(name, e, rng))
        if name != "Support Devices":
            summary.append(detail[-1])
    negatives = [n for n in order if f.get(n, {}).get("state") == 0]
    neg_sentences = _negative(negatives, rng)
    findings = detail + neg_sentences
    if "No Finding" in f:
        findings = findings or ["The lungs are clear."]
        impression = ["No acute cardiopulmonary process."]
        if shape != "standard":  # the only section must still carry the overall statement
            findings = findings + impression
    else:
        impression = summary[:3]

    sex_word = "man" if sex == "M" else "woman"
    indication = _pick(rng, _INDICATIONS).format(sex=sex_word, s=sex)
    frontal = [v for v in views if v != "LATERAL"]
    if frontal and frontal[0] == "AP":
        exam, technique = "CHEST (PORTABLE AP)", "Portable AP radiograph of the chest."
    elif "LATERAL" in views and frontal:
        exam, technique = (
            "CHEST (PA AND LAT)",
            _pick(rng, ("Chest PA and lateral.", "PA and lateral views of the chest.")),
        )
    else:
        exam, technique = "CHEST (SINGLE VIEW)", "Single frontal view of the chest."
    comparison = _pick(rng, ("None.", "___.", "Chest radiograph from ___.", "Prior study from ___ at ___."))

    lines = ["                                 FINAL REPORT", f" EXAMINATION:  {exam}", " "]
    lines += [f" INDICATION:  {indication}", " ", f" TECHNIQUE:  {technique}", " "]
    if rng.random() < 0.85:
        lines += [f" COMPARISON:  {comparison}", " "]

    def para(sentences: list[str]) -> list[str]:
        return [" " + ln for ln in textwrap.wrap("  ".join(sentences), width=76)] or [" "]

    if shape == "standard":
        lines += [" FINDINGS: ", " "] + para(findings) + [" ", " IMPRESSION: ", " "]
        if len(impression) > 1 and rng.random() < 0.35:  # numbered impression items, one paragraph each
            for k, sentence in enumerate(impression, start=1):
                lines += para([f"{k}.  {sentence}"])
        else:
            lines += para(impression or findings[:1])
    elif shape == "no_impression":
        lines += [" FINDINGS: ", " "] + para(findings)
    elif shape == "impression_only":
        lines += [" IMPRESSION: ", " "] + para(findings)
    else:
        lines += [" FINDINGS AND IMPRESSION: ", " "] + para(findings)
    if f.get("Pneumothorax", {}).get("state") == 1 and rng.random() < 0.5:
        lines += [" ", " NOTIFICATION:  The findings were discussed with Dr. ___ by telephone on ___ at ___,"]
        lines += [" at the time of discovery."]
    if f.get("Lung Lesion", {}).get("state") == 1 and rng.random() < 0.5:
        lines += [" ", " RECOMMENDATION(S):  Non-urgent chest CT for further characterization."]
    return "\n".join(lines) + "\n"
