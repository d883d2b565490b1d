# p2l — common tasks. Every target creates/uses the virtual environment .venv first.
#   make demo                       main job on the embedded default (no download, no GPU)
#   make test                       the test suite (CPU)
#   make train CONFIG=experiments/brats.py ARGS="--config.data_root=... --config.splits_dir=..."
# GPU machines: make venv JAX_EXTRA=cuda12   (installs jax[cuda12] with the same pins)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
JAX_EXTRA ?=
CONFIG ?= experiments/demo.py
WORKDIR ?= runs/$(basename $(notdir $(subst :,_,$(CONFIG))))
ARGS ?=
export PYTHONPATH := $(CURDIR)
export TF_CPP_MIN_LOG_LEVEL ?= 3
export PYTHONUNBUFFERED := 1

.PHONY: venv demo test test-slow lint format train eval prepare sweep tables bench bench-compare bench-layers clean-demo

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	if [ -n "$(JAX_EXTRA)" ]; then $(PY) -m pip install --quiet "jax[$(JAX_EXTRA)]==$$(grep '^jax==' requirements.txt | cut -d= -f3)"; fi
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m data_prep.demo_data --out runs/demo/data
	$(PY) -m p2l.main --config=experiments/demo.py --workdir=runs/demo --mode=train_eval $(ARGS)

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: venv
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

train: venv
	$(PY) -m p2l.main --config=$(CONFIG) --workdir=$(WORKDIR) $(ARGS)

eval: venv
	$(PY) -m p2l.main --config=$(CONFIG) --workdir=$(WORKDIR) --mode=eval $(ARGS)

WORKERS ?= 1
ATLAS ?=
PREPARE_ARGS ?=
prepare: venv
	$(PY) -m data_prep.prepare --dataset $(DATASET) --raw $(RAW) --out $(OUT) $(if $(ATLAS),--atlas $(ATLAS)) --workers $(WORKERS) $(PREPARE_ARGS)
	$(PY) -m data_prep.validate $(OUT)

LAUNCH ?= local
SWEEP_ARGS ?=
sweep: venv
	$(PY) -m p2l.tools.sweep --config=$(CONFIG) --launch=$(LAUNCH) $(SWEEP_ARGS) -- $(ARGS)

bench: venv
	$(PY) -m benchmarks.bench $(ARGS)

# p2l vs ../shared/bench/reference_torch.py, interleaved A B A B (creates .venv-ref with torch).
bench-compare: venv
	$(PY) -m benchmarks.side_by_side $(ARGS)

bench-layers: venv
	$(PY) -m benchmarks.layer_probe $(ARGS)

RUNS ?= runs
tables: venv
	$(PY) -m p2l.tools.tables --runs $(RUNS)

clean-demo:
	rm -rf runs/demo
