"""The benchmark suite: a model against the field's standard evaluations, on the datasets as users download them
(``mpma-benchmark``). Suites (``suites/*.yaml``) name (dataset, protocol) entries; ``data_tools.benchmarks``
reads each dataset; `runner.run_benchmark` computes every metric with its bootstrap interval, pairs models per
sample, writes ``results.json``, MLflow runs and the report page, with the published reference numbers
(``references.yaml``) beside ours, never mixed in."""
