# The two README commands: `make run` (the main job) and `make test` (the whole suite).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP_FLAGS := -q --disable-pip-version-check

.PHONY: run test lint clean data leaderboard results results-default results-fashion-mnist results-leaderboard

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install $(PIP_FLAGS) -e . 2>&1 | { grep -v "is ignored: it is neither" || true; }
	$(BIN)/python -c "import bench, torch, torchvision, ray, fvcore" 
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install $(PIP_FLAGS) -e ".[dev]" 2>&1 | { grep -v "is ignored: it is neither" || true; }
	$(BIN)/python -c "import bench, torch, torchvision, ray, fvcore, pytest"
	touch $(VENV)/.installed $@

# The default sweep in a fresh folder each time (runs/<time>/default/, its report in runs/<time>/default/report/).
# A user's run never writes into the repository: the committed results are the results-* targets below.
run: $(VENV)/.installed
	RAY_AUTH_MODE=disabled $(BIN)/exitbench sweep default storage_path=runs/$$(date +%Y%m%d-%H%M%S)

# The Fashion-MNIST leaderboard (results/fashion-mnist/sweep.yaml, ~1.5 h on 2 cores) in a fresh folder, reported there,
# then merged with the committed digits sweep and the published rows into runs/<time>/leaderboard.md.
# Interrupted: `exitbench sweep --resume runs/<time>/fashion-mnist` (the sweep prints it).
leaderboard: $(VENV)/.installed data
	t=runs/$$(date +%Y%m%d-%H%M%S) && \
	RAY_AUTH_MODE=disabled $(BIN)/exitbench sweep results/fashion-mnist/sweep.yaml storage_path=$$t && \
	$(BIN)/exitbench leaderboard $$t/fashion-mnist results/default --published results/published --out $$t

# Maintainers: regenerate the committed results from nothing with today's code (overwrites results/).
# results-default: ~2 min; results-fashion-mnist: ~1.5 h on 2 cores; results-leaderboard: seconds, from the two stores.
results: results-default results-fashion-mnist results-leaderboard

results-default: $(VENV)/.installed
	RAY_AUTH_MODE=disabled $(BIN)/exitbench sweep default storage_path=runs/$$(date +%Y%m%d-%H%M%S) \
		report.out=results/default report.copy_store=true

results-fashion-mnist: $(VENV)/.installed data
	RAY_AUTH_MODE=disabled $(BIN)/exitbench sweep results/fashion-mnist/sweep.yaml \
		storage_path=runs/$$(date +%Y%m%d-%H%M%S) report.out=results/fashion-mnist report.copy_store=true

results-leaderboard: $(VENV)/.installed
	$(BIN)/exitbench leaderboard results/fashion-mnist results/default --published results/published --out results

test: $(VENV)/.installed-dev
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q

# Fashion-MNIST (the leaderboard's data): Debian's dataset-fashion-mnist, installed when root and the files are missing.
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
data:
	@if [ -f $(FMNIST) ]; then echo "fashion-mnist: found in $(dir $(FMNIST))"; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else echo "fashion-mnist: missing; as root: apt-get install -y dataset-fashion-mnist" >&2; exit 2; fi

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check bench methods tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
