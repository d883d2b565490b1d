# p2l — common tasks. Every target creates/uses the virtual environment .venv first.
#   make demo                       main job on the embedded default (no download, no GPU):
#                                   Patch2Loc and the DAE, fused, one table
#   make test                       the test suite (CPU)
#   make train CONFIG=experiments/brats.py ARGS="--config.data_root=... --config.splits_dir=..."
#   make gpu-check                  on a lent GPU machine: tests, speed and memory in one JSON line
# GPU machines: make venv JAX_EXTRA=cuda12   (installs jax[cuda12] with the same pins)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
JAX_EXTRA ?=
CONFIG ?= experiments/demo.py
# Named after config.name (+ _variant), so configs of one model share its run: brats.py and
# mslub.py are both the T2 run, runs/t2 (p2l.tools.workdir).
WORKDIR ?= $(shell $(PY) -m p2l.tools.workdir $(CONFIG))
ARGS ?=
export PYTHONPATH := $(CURDIR)
export TF_CPP_MIN_LOG_LEVEL ?= 3
export PYTHONUNBUFFERED := 1

.PHONY: venv demo test test-slow test-long real-check lint format train eval prepare sweep tables bench bench-compare bench-layers scale-check gpu-check clean-demo

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	if [ -n "$(JAX_EXTRA)" ]; then $(PY) -m pip install --quiet "jax[$(JAX_EXTRA)]==$$(grep '^jax==' requirements.txt | cut -d= -f3)"; fi
	touch $@

venv: $(VENV)/.installed

# Both detectors on the embedded data: the DAE (runs/demo_dae), then Patch2Loc (runs/demo),
# evaluated side by side with their fusion (one row per detector).
demo: venv
	$(PY) -m data_prep.demo_data --out runs/demo/data
	$(PY) -m p2l.main --config=experiments/dae_demo.py --workdir=runs/demo_dae --mode=train $(DAE_ARGS)
	$(PY) -m p2l.main --config=experiments/demo.py --workdir=runs/demo --mode=train_eval --config.eval.pixel_workdir=runs/demo_dae $(ARGS)

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: venv
	$(PY) -m pytest -q -m "slow and not long" --durations=25 $(PYTEST_ARGS)

# The model-quality check on one real subject (lesions above normal brain after 400 steps at 1 mm,
# data_prep/real_check.py): ~10 min on 2 cores, so CI leaves it out; `make real-check` runs it too.
test-long: venv
	$(PY) -m pytest -q -m long $(PYTEST_ARGS)

# The real-data checks on ../shared/data: the one-subject T2 check (data_prep/real_check.py) and
# the 2 mm T1 check from 138 real healthy IXI heads (data_prep/real_check_t1.py); per-case tables.
# Preparation is cached (runs/real_check_t1/input); a finished run is not retrained.
SHARED ?= ../shared
REAL_T1_ARGS ?=
real-check: venv
	$(PY) -m data_prep.real_check --shared $(SHARED) --workdir runs/real_check
	$(PY) -m data_prep.real_check_t1 --shared $(SHARED) --workdir runs/real_check_t1 $(REAL_T1_ARGS)

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

# Full-size synthetic data (192x192x100): build reuse, evaluation memory for N and 5N volumes,
# host/device seconds per volume, input pipeline vs step; one JSON line (benchmarks/scale_check.py).
scale-check: venv
	$(PY) -m benchmarks.scale_check $(ARGS)

# A bare GPU machine (the repository alone): its own venv with only what benchmarks.gpu_check
# imports, at requirements.txt's pins; no TensorFlow, no data. GPU_JAX=jax checks it on a CPU.
GPU_VENV ?= .venv-gpu
GPU_JAX ?= jax[cuda12]
GPU_PACKAGES := flax optax orbax-checkpoint etils ml_collections numpy scipy pytest
$(GPU_VENV)/.installed: requirements.txt
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install --quiet "$(GPU_JAX)==$$(grep '^jax==' requirements.txt | cut -d= -f3)" \
		$$(for p in $(GPU_PACKAGES); do grep -i "^$$p==" requirements.txt; done)
	touch $@

gpu-check: $(GPU_VENV)/.installed
	$(GPU_VENV)/bin/python -m benchmarks.gpu_check $(ARGS)

RUNS ?= runs
tables: venv
	$(PY) -m p2l.tools.tables --runs $(RUNS)

clean-demo:
	rm -rf runs/demo runs/demo_dae
