# sglang-indexcache: `make demo` and `make test` are the whole set-up on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3.11
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SGLANG_DIR ?=

.PHONY: install demo test test-fast apply-patches revert-patches check-patches bench gpu-bundle clean-venv

install: $(STAMP)

# Re-installs only when the project's dependency files change.
$(STAMP): pyproject.toml requirements/lock.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (SGLang 0.5.23 ships cp311 wheels only)"; exit 2; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); test "$$free" -ge 8 || \
		echo "warning: $$free GiB free here; the environment needs about 7 GiB (torch 2.14.1 with its CUDA libraries)" >&2
	@echo "installing the project and its pinned dependencies into $(VENV) (requirements/lock.txt)"
	@$(PY) -m pip install -q --disable-pip-version-check -c requirements/lock.txt -e '.[test,sglang-cpu]' || \
		{ echo "error: pip could not install the environment (above); a half-made $(VENV) is kept: 'make clean-venv' removes it" >&2; exit 1; }
	@touch $(STAMP)

demo: install
	@$(VENV)/bin/indexcache demo

test: install
	$(PY) -m pytest -q

# The quick loop while editing: no SGLang wheel, no Triton-interpreter kernel cases, no slow or GPU
# tests (`make test` runs everything and is what CI runs).
test-fast: install
	$(PY) -m pytest -q -m "not sglang and not interpreter and not slow and not gpu"

bench: install
	$(VENV)/bin/indexcache bench prefill --config tiny

apply-patches: install
	$(VENV)/bin/indexcache apply-patches "$(SGLANG_DIR)"

revert-patches: install
	$(VENV)/bin/indexcache revert-patches "$(SGLANG_DIR)"

check-patches: install
	$(VENV)/bin/indexcache check-patches "$(SGLANG_DIR)"

# Offline wheel bundle for an air-gapped GPU host (docs/gpu.md). WHEELHOUSE: wheels already on disk.
GPU_SGLANG ?= 0.5.17
GPU_PYTHON ?= 3.12
GPU_ARCH ?= sm_90
PART_SIZE ?= 40MiB
BUNDLE_OUT ?= gpu-bundle
WHEELHOUSE ?=
gpu-bundle: install
	$(VENV)/bin/indexcache gpu-bundle --sglang $(GPU_SGLANG) --python $(GPU_PYTHON) --arch $(GPU_ARCH) \
		--part-size $(PART_SIZE) --out $(BUNDLE_OUT) $(if $(WHEELHOUSE),--wheelhouse $(WHEELHOUSE))

clean-venv:
	rm -rf $(VENV)
