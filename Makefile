# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv and installs on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# torch and torchvision must be a matching pair or `import timm` fails; 2.14.1/0.29.1 is the newest pair
# this project's machines carry (pip takes both from local disk), so they are pinned here, not in pyproject.
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-lean test-tpu names test-slow fuzz memory bench bench-quick bench-gpu bench-parts bench-data parity-report train clean

# --no-compile: pip would byte-compile every module of torch, transformers and jax (~30 s of a fresh clone's
# set-up here); Python compiles the few it imports on first use instead.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile $(TORCH_PAIR)
	$(PY) -m pip install -q --no-compile -e '.[test]' $(TORCH_PAIR)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m vit_flax_cli.demo

# Two worker processes (pytest-xdist), a test file each at a time: module fixtures are built once per file.
# --no-loadscope-reorder: files go out in tests/conftest.py's order (the longest first), not xdist's (most tests first,
# which left the one-test training files, 20-40 s each, for the end of the run while the other worker idled).
TEST_JOBS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=10 -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder tests

# The lean install: a second venv on Python 3.12 with the project and no extras (+ pytest, pytest-xdist,
# hypothesis), the newest jax the index has (LEAN_JAX); torch must be absent. It runs what needs no torch
# (tests/conftest.py leaves out the files and tests that import torch/timm and says what ran).
LEAN := .venv-lean
LEAN_PY := $(LEAN)/bin/python
LEAN_JAX ?= jax>=0.12
PYTHON312 ?= $(firstword $(wildcard $(shell pyenv root 2>/dev/null)/versions/3.12*/bin/python) $(shell command -v python3.12))
$(LEAN)/.installed-stamp: pyproject.toml Makefile
	@test -n "$(PYTHON312)" || { echo 'make test-lean: no Python 3.12 found (pyenv versions); set PYTHON312=...'; exit 1; }
	test -x $(LEAN_PY) || $(PYTHON312) -m venv $(LEAN)
	$(LEAN_PY) -m pip install -q -e . '$(LEAN_JAX)' pytest 'pytest-xdist>=3.8' hypothesis
	touch $@

test-lean: $(LEAN)/.installed-stamp
	$(LEAN_PY) -c "import importlib.util as u, sys; sys.exit('torch is installed in $(LEAN)' if u.find_spec('torch') else 0)"
	$(LEAN_PY) -c "import sys, jax, flax; print(f'lean venv: Python {sys.version.split()[0]}, jax {jax.__version__}, flax {flax.__version__}, torch absent')"
	VIT_FLAX_LEAN=1 $(LEAN_PY) -m pytest -q -ra -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder tests

# Deviceless TPU compiles (`vit-flax xla`, `train_flax.py --plan`, splash attention): libtpu needs jax >= 0.11, so
# a third venv on Python 3.12 with the [tpu] extra. JAX_PLATFORMS=cpu: nothing runs on a TPU, libtpu only compiles.
# Each TPU compile takes 10-40 s here; the files below take a few minutes.
TPU := .venv-tpu
# the versions docs/XLA.md's rows were compiled with (a newer libtpu compiles another program); TPU_PINS= for the newest
TPU_PINS ?= 'jax[tpu]==0.12.0.1' 'libtpu==0.0.50.1'
TPU_PY := $(TPU)/bin/python
$(TPU)/.installed-stamp: pyproject.toml Makefile
	@test -n "$(PYTHON312)" || { echo 'make test-tpu: no Python 3.12 found (pyenv versions); set PYTHON312=...'; exit 1; }
	test -x $(TPU_PY) || $(PYTHON312) -m venv $(TPU)
	$(TPU_PY) -m pip install -q -e '.[tpu]' $(TPU_PINS) optax orbax-checkpoint pytest hypothesis matplotlib
	touch $@

test-tpu: $(TPU)/.installed-stamp
	JAX_PLATFORMS=cpu $(TPU_PY) -m pytest -q -ra -p no:cacheprovider tests/xla tests/models/test_splash.py

# vit_flax_cli/model_names.txt (what `vit-flax list` reads without importing jax), after a registry change
names: $(STAMP)
	$(PY) -m vit_flax_cli.names

test-slow: $(STAMP)
	$(PY) -m pytest -q -ra -m slow tests

# Fuzzing at scale, in two phases on $(TEST_JOBS) workers: hypothesis' random mutants, 10,000 per file reader
# (FUZZ_TARGET) and 1,000 per directory reader (FUZZ_DIR_TARGET: orbax, training checkpoints), failures kept
# in .hypothesis/ to replay; then the kills (of writers, of the CLI, 20 of a training run at random points).
# Prints the counts per reader (examples, failures) as a table and the wall time; fails on any failure or a
# reader short of its target. About an hour on 2 cores (the figures: docs/FUZZING.md).
FUZZ_TARGET ?= 10000
FUZZ_DIR_TARGET ?= 1000
FUZZ_ENV = VIT_FLAX_FUZZ=long VIT_FLAX_FUZZ_TARGET=$(FUZZ_TARGET) VIT_FLAX_FUZZ_DIR_TARGET=$(FUZZ_DIR_TARGET) \
	VIT_FLAX_FUZZ_COUNTS=fuzz-counts.json VIT_FLAX_KILLS=200 VIT_FLAX_CLI_KILLS=10 VIT_FLAX_TRAIN_KILLS=20
fuzz: $(STAMP)
	rm -f fuzz-counts.json
	@start=$$(date +%s); \
	$(FUZZ_ENV) $(PY) -m pytest -q -ra -n $(TEST_JOBS) --dist load -m 'slow or not slow' \
		tests/durability/test_fuzz.py tests/durability/test_bounded_reads.py; a=$$?; \
	$(FUZZ_ENV) $(PY) -m pytest -q -ra -n $(TEST_JOBS) --dist loadfile -m 'slow or not slow' \
		tests/durability/test_durable.py tests/training/test_train_faults.py; b=$$?; \
	$(PY) tests/durability/fuzz_table.py fuzz-counts.json --target $(FUZZ_TARGET) --dir-target $(FUZZ_DIR_TARGET) \
		--seconds $$(( $$(date +%s) - start )); c=$$?; \
	test $$a = 0 -a $$b = 0 -a $$c = 0

# Peak RSS of converting ViT-L/16 and ViT-H/14 (files in /tmp, up to ~10 GB of disk), as a ratio to the file size.
memory: $(STAMP)
	$(PY) benchmarks/convert_memory.py

# Flax against timm, each in its own process, alternated over rounds (~1 hour here); see benchmarks/README.md.
bench: $(STAMP)
	$(PY) benchmarks/bench_vs_timm.py $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(PY) benchmarks/bench_vs_timm.py --quick $(BENCH_ARGS)

# One GPU (or TPU), < 8 minutes: bf16 inference and AdamW training per attention implementation, scan, remat,
# compile time, peak memory, MFU, timm under torch.compile as a ratio (benchmarks/gpu.py; table to $$OUT when
# set). On a GPU machine without this venv: `pip install --no-deps -e .` then `python benchmarks/gpu.py`.
# BENCH_ARGS=--dry-run: tiny shapes on CPU.
bench-gpu:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) benchmarks/gpu.py $(BENCH_ARGS)

# The training step part by part (block, attention, MLP, matmuls, LayerNorm), Flax against torch (~3 min).
bench-parts: $(STAMP)
	$(PY) benchmarks/parts_vs_torch.py $(BENCH_ARGS)

# The training input pipeline's images/s (ours from a folder and from packed shards, timm's create_loader), on a
# synthetic ImageNet-like JPEG set made once in $$TMPDIR; each in its own process, alternated (~3 min here).
bench-data: $(STAMP)
	$(PY) benchmarks/bench_data.py $(BENCH_ARGS)

parity-report: $(STAMP)
	$(PY) benchmarks/parity_report.py

train: $(STAMP)
	$(PY) train_flax.py

clean:
	rm -rf $(VENV) $(LEAN) demo_out build *.egg-info .hypothesis fuzz-counts.json
