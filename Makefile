# Two commands do all the set-up on a fresh machine:
#   make test   creates .venv if missing, installs the pinned requirements and the package, runs ruff, mypy and pytest
#   make demo   the same set-up, then the main job
#   make bench  the same set-up, then every benchmark; regenerates benchmarks/RESULTS.md
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
export HF_EVALUATE_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false
export MPLBACKEND = Agg

.PHONY: install test test-fast bench bench-quick clean demo

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e '.[test,demo]'
	touch $(STAMP)

install: $(STAMP)

# ruff; mypy on the package (what and how: pyproject.toml [tool.mypy]; seconds with its cache, under a minute
# without); then two pytest workers, one per core; a file's tests stay on one worker, so its module fixtures are
# built once.
test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -n 2 --dist loadfile tests

demo: $(STAMP)
	sh scripts/install_corpora.sh || true
	$(PY) -m tikmix_hf.cli demo

# Every benchmark, then its tables pasted into benchmarks/RESULTS.md (about 45 minutes on 2 CPU cores, up to 80 on a busy day; quality alone 17-29).
bench: $(STAMP)
	$(PY) benchmarks/run_all.py

# Every benchmark's --quick into /tmp/tikmix-bench-quick (a few minutes; RESULTS.md left alone).
bench-quick: $(STAMP)
	$(PY) benchmarks/run_all.py --quick --out /tmp/tikmix-bench-quick

test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow and not distributed" tests

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache
