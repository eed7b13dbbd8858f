# make demo   - set up .venv, make sure Fashion-MNIST is there, `dvc repro` the embedded default
#               (params.yaml), then `dvc metrics show`
# make test   - set up .venv, run the whole test suite
# make preset PRESET=fmnist-cpu [SEED=0] [SET="pretrain.epochs=13 ..."] - a recipe of presets/ on its own: shard, pretrain,
#               extract, knn under runs/<preset>/ (EXPERIMENTS.md has their results)
# Other targets: venv, test-fast, workflow, dvc-commit, install-slurm-profile, help.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Stages run as `python -m stages.<name>`: the venv's python first on PATH (dvc, snakemake too).
export PATH := $(CURDIR)/$(BIN):$(PATH)

FMNIST_PACKAGE := dataset-fashion-mnist
FMNIST_SYSTEM := /usr/share/datasets/fashion-mnist
FMNIST_EXTRACTED := data/external/$(FMNIST_PACKAGE)
FMNIST_LOCAL := $(FMNIST_EXTRACTED)/usr/share/datasets/fashion-mnist
FMNIST_FILES := train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz

SLURM_PROFILE_DIR := $(or $(XDG_CONFIG_HOME),$(HOME)/.config)/snakemake/slurm

.PHONY: help venv demo test test-fast preset system-fashion-mnist workflow dvc-repo dvc-commit install-slurm-profile

help:
	@sed -n 's/^# \{0,1\}//;1,6p' Makefile

# The venv, reinstalled whenever pyproject.toml or a C extension's source changes (the stamp is
# older then); the editable install compiles them in place (gcc).
venv: $(STAMP)
$(STAMP): pyproject.toml stages/dino/_pillow_ops.c stages/_knn_select.c
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[dev]'
	@touch $@

# A git repo with DVC initialised (a fresh clone has both; an unpacked archive gets them).
dvc-repo: $(STAMP)
	@if ! git rev-parse --git-dir >/dev/null 2>&1; then \
	  echo "make: not a git repository; creating one (DVC experiments need git)"; \
	  git init -q && git add -A && \
	  git -c user.name=dino -c user.email=dino@localhost commit -q -m "Initial import"; \
	fi
	@test -f .dvc/config || dvc init -q

# Fashion-MNIST from the Debian package: installed system-wide when root, otherwise unpacked
# into data/external/ and params.yaml's dataset.root pointed there by `dvc exp run -S`.
demo: dvc-repo
	@have() { for f in $(FMNIST_FILES); do test -f "$$1/$$f" || return 1; done; }; \
	if ! have $(FMNIST_SYSTEM) && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "make: $(FMNIST_SYSTEM) missing; installing $(FMNIST_PACKAGE)"; \
	  apt-get install -y $(FMNIST_PACKAGE) || { apt-get update && apt-get install -y $(FMNIST_PACKAGE); } || true; \
	fi; \
	if have $(FMNIST_SYSTEM); then \
	  dvc repro; \
	else \
	  if ! have $(FMNIST_LOCAL) && command -v apt-get >/dev/null; then \
	    echo "make: $(FMNIST_SYSTEM) missing; unpacking $(FMNIST_PACKAGE) into $(FMNIST_EXTRACTED)"; \
	    mkdir -p data/external && rm -f data/external/$(FMNIST_PACKAGE)_*.deb; \
	    (cd data/external && apt-get download $(FMNIST_PACKAGE)) && \
	    dpkg-deb -x data/external/$(FMNIST_PACKAGE)_*.deb $(FMNIST_EXTRACTED) || true; \
	  fi; \
	  if ! have $(FMNIST_LOCAL); then \
	    echo "make: Fashion-MNIST is not available: neither $(FMNIST_SYSTEM) (apt-get install $(FMNIST_PACKAGE)) nor $(FMNIST_LOCAL) (apt-get download) worked." >&2; \
	    echo "make: offline fallback: set dataset.source: digits (scikit-learn's bundled digits) and transfer.dataset: null (fine-tune on the shards) in params.yaml, then run make demo again." >&2; \
	    exit 1; \
	  fi; \
	  echo "make: using $(FMNIST_LOCAL): running the demo as an experiment with dataset.root and transfer.dataset.root set there (params.yaml is changed accordingly)"; \
	  dvc exp run -S dataset.root=$(FMNIST_LOCAL) -S transfer.dataset.root=$(FMNIST_LOCAL); \
	fi
	dvc metrics show

test: $(STAMP)
	@$(MAKE) --no-print-directory system-fashion-mnist || echo "make: Fashion-MNIST not installed; its tests will be skipped"
	$(BIN)/python -m pytest -q

# The Debian package of Fashion-MNIST when missing and we are root (the real-data tests use it).
system-fashion-mnist:
	@have() { for f in $(FMNIST_FILES); do test -f "$$1/$$f" || return 1; done; }; \
	if ! have $(FMNIST_SYSTEM) && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "make: $(FMNIST_SYSTEM) missing; installing $(FMNIST_PACKAGE)"; \
	  apt-get install -y $(FMNIST_PACKAGE) || { apt-get update && apt-get install -y $(FMNIST_PACKAGE); }; \
	fi; have $(FMNIST_SYSTEM)

PRESET ?= fmnist-cpu
preset: $(STAMP)
	@$(MAKE) --no-print-directory system-fashion-mnist
	$(BIN)/python -m stages.presets $(PRESET) --run $(if $(SEED),--seed $(SEED)) $(foreach pair,$(SET),-S $(pair))

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not e2e and not slurm"

# The same DAG with Snakemake on this machine; onsuccess records the outputs in DVC.
workflow: dvc-repo
	snakemake --profile workflow/profiles/local all

# Record the current outputs of every stage in dvc.lock by hand (what the Snakefile's onsuccess
# does), e.g. after `snakemake --no-hooks`.
dvc-commit: $(STAMP)
	dvc commit --force

# Copy the cluster profile to Snakemake's config dir (`snakemake --profile slurm`), never over
# an existing one.
install-slurm-profile:
	@if [ -e "$(SLURM_PROFILE_DIR)/config.yaml" ]; then \
	  echo "$(SLURM_PROFILE_DIR)/config.yaml exists: left as it is (compare with workflow/profiles/slurm/config.yaml)"; \
	else \
	  mkdir -p "$(SLURM_PROFILE_DIR)" && cp workflow/profiles/slurm/config.yaml "$(SLURM_PROFILE_DIR)/config.yaml" && \
	  echo "installed $(SLURM_PROFILE_DIR)/config.yaml: edit slurm_partition and slurm_account in default-resources"; \
	fi
