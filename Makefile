# Set-up is two commands: `make run` and `make test`. Both install into .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SCALE ?= full
SEEDS ?= 1
# reproduce-table1 reads CIFAR-100 from DATA_ROOT (the folder holding cifar-100-python/); empty: $CLRUN_DATA, else ~/.cache/clrun/data
DATA_ROOT ?=

.PHONY: run test lint bench reproduce-table1 reproduce-table2 reproduce-table3 reproduce-fig2 reproduce-table4 reproduce-pah reproduce-pah-ablation scenarios-mnist gpu-check clean-outputs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,slurm,ray,optuna,trackers]'
	touch $(STAMP)

run: $(STAMP)  ## finetune on the embedded synthetic stream (under a minute on 2 CPU cores)
	$(BIN)/clrun $(ARGS)

test: $(STAMP)  ## the whole test suite, in parallel workers (pytest-xdist; at most 4)
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4

lint: $(STAMP)
	$(BIN)/ruff check clrun tests benchmarks

bench: $(STAMP)  ## throughput, masking overhead, image files (cache, 224 epoch), start-up (--help, first step), per-step cost over 50 tasks, many small runs (parallel launcher splits), clrun vs the reference-style path; JSON into benchmarks/results/
	cd benchmarks && ../$(BIN)/python throughput.py && ../$(BIN)/python masking.py && ../$(BIN)/python images.py \
		&& ../$(BIN)/python startup.py && ../$(BIN)/python slope.py && ../$(BIN)/python parallel.py && ../$(BIN)/python speed.py $(ARGS)

gpu-check: $(STAMP)  ## everything that needs CUDA in one command (<= 8 min on one H200); ARGS=--dry-run: on a CPU, all but the CUDA calls
	cd benchmarks && $(abspath $(BIN))/python gpu_check.py $(ARGS)

scenarios-mnist: $(STAMP)  ## every method in the task/domain/class scenarios of split and permuted MNIST vs van de Ven's numbers
	$(BIN)/python benchmarks/scenarios_mnist.py $(if $(strip $(DATA_ROOT)),--data-root $(DATA_ROOT)) $(ARGS)

reproduce-table1: $(STAMP)  ## CPG's Table 1 (scratch, packnet, pae, cpg on cifar100_20 / vgg16_bn) vs the paper; SCALE=smoke: minutes on a CPU
	$(BIN)/python benchmarks/reproduce_table1.py --scale $(SCALE) --seeds $(SEEDS) $(if $(strip $(DATA_ROOT)),--data-root $(DATA_ROOT)) $(ARGS)

reproduce-table2: $(STAMP)  ## CPG's Table 2 (scratch, 5 fine-tune rounds -> fine-Avg/Max, CPG avg/max/top) vs the paper; SCALE=smoke on a CPU
	$(BIN)/python benchmarks/reproduce_table2.py --scale $(SCALE) --seeds $(SEEDS) $(if $(strip $(DATA_ROOT)),--data-root $(DATA_ROOT)) $(ARGS)

reproduce-table3: $(STAMP)  ## CPG's Table 3 (ImageNet + 5 fine-grained tasks, ResNet-50: Scratch, Finetune, PackNet, Piggyback, CPG) vs the paper; DATA_ROOT: Piggyback's data/; SCALE=smoke on a CPU
	$(BIN)/python benchmarks/reproduce_table3.py --scale $(SCALE) --seeds $(SEEDS) $(if $(strip $(DATA_ROOT)),--data-root $(DATA_ROOT)) $(ARGS)

reproduce-fig2: $(STAMP)  ## CPG's Fig. 2 (tasks 1, 5, 10, 15 after each later task: DEN, CPG, Finetune Avg): PNG + CSV; SCALE=smoke on a CPU
	$(BIN)/python benchmarks/reproduce_fig2.py --scale $(SCALE) --seeds $(SEEDS) $(if $(strip $(DATA_ROOT)),--data-root $(DATA_ROOT)) $(ARGS)

reproduce-table4: $(STAMP)  ## CPG's Table 4 (scratch, finetune, cpg on the face tasks / sphereface20, age folds 0-4 averaged) vs the paper; SCALE=smoke on a CPU (synthetic faces)
	$(BIN)/python benchmarks/reproduce_table4.py --scale $(SCALE) --seeds $(SEEDS) $(if $(strip $(DATA_ROOT)),--data-root $(DATA_ROOT)) $(ARGS)

reproduce-pah: $(STAMP)  ## PAH's table (PAH, SI) on Split-CIFAR100 (ARGS="--dataset tiny": TinyImageNet) vs the paper; SCALE=smoke on a CPU
	$(BIN)/python benchmarks/reproduce_pah.py --scale $(SCALE) --seeds $(SEEDS) $(if $(strip $(DATA_ROOT)),--data-root $(DATA_ROOT)) $(ARGS)

reproduce-pah-ablation: $(STAMP)  ## PAH's ablations (prototype size, semantic init, L_sp, lambda_sm) as one multirun vs the poster's
	$(BIN)/python benchmarks/reproduce_pah.py --ablation --scale $(SCALE) --seeds $(SEEDS) $(if $(strip $(DATA_ROOT)),--data-root $(DATA_ROOT)) $(ARGS)

clean-outputs:
	rm -rf outputs/runs outputs/bench
