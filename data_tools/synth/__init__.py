"""Synthetic data to develop, test and demo on without the credentialed corpora.

- `corpus`: a MIMIC-CXR-JPG-shaped corpus (`generate_corpus`) with its ground truth `synth_truth.jsonl`;
- `images`: the film renderer (findings drawn where the report puts them, and where: `render_with_regions`);
- `reports`: the findings of a study and its MIMIC-style report;
- `vqa`: a VQA-RAD-layout question set about the corpus's films (`generate_vqa`).

The command lines are `data_tools.synth_corpus` and `data_tools.synth_vqa`.
"""
