# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv and installs on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# torch and torchvision must be a matching pair or `import timm` fails; 2.14.1/0.29.1 is the newest pair
# this project's machines carry (pip takes both from local disk), so they are pinned here, not in pyproject.
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-slow fuzz memory bench bench-quick bench-parts parity-report train clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PAIR)
	$(PY) -m pip install -q -e '.[test]' $(TORCH_PAIR)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m vit_flax_cli.demo

# Two worker processes (pytest-xdist), a test file each at a time: module fixtures are built once per file.
TEST_JOBS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -ra -n $(TEST_JOBS) --dist loadfile tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -ra -m slow tests

# Hypothesis at 25x the examples of `make test` (random seeds; failures replay from .hypothesis/), more kills
# (of writers, of the CLI, and 20 of a training run at random points before it is resumed).
fuzz: $(STAMP)
	rm -f fuzz-counts.json
	VIT_FLAX_FUZZ=long VIT_FLAX_KILLS=200 VIT_FLAX_CLI_KILLS=10 VIT_FLAX_TRAIN_KILLS=20 VIT_FLAX_FUZZ_COUNTS=fuzz-counts.json \
		$(PY) -m pytest -q -ra -m 'slow or not slow' tests/durability/test_fuzz.py tests/durability/test_durable.py tests/training/test_train_faults.py
	@cat fuzz-counts.json

# Peak RSS of converting ViT-L/16 and ViT-H/14 (files in /tmp, up to ~10 GB of disk), as a ratio to the file size.
memory: $(STAMP)
	$(PY) benchmarks/convert_memory.py

# Flax against timm, each in its own process, alternated over rounds (~1 hour here); see benchmarks/README.md.
bench: $(STAMP)
	$(PY) benchmarks/bench_vs_timm.py $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(PY) benchmarks/bench_vs_timm.py --quick $(BENCH_ARGS)

# The training step part by part (block, attention, MLP, matmuls, LayerNorm), Flax against torch (~3 min).
bench-parts: $(STAMP)
	$(PY) benchmarks/parts_vs_torch.py $(BENCH_ARGS)

parity-report: $(STAMP)
	$(PY) benchmarks/parity_report.py

train: $(STAMP)
	$(PY) train_flax.py

clean:
	rm -rf $(VENV) demo_out build *.egg-info .hypothesis fuzz-counts.json
