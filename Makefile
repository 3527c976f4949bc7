# Two entry points: `make demo` (the main job on the bundled stream) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast venv clean

# torch is pinned first so that pip takes the CPU build instead of a multi-GB CUDA build;
# uv then installs the rest (downloads in parallel: 45 s here against pip's 179 s), keeping
# that torch and any constraints file pip reads on this machine.
PIP_CONSTRAINTS := $(wildcard /etc/xdg/pip/constraints.txt)
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0 uv
	$(VENV)/bin/uv pip install --quiet --python $(PY) --compile-bytecode \
		$(if $(PIP_CONSTRAINTS),--constraint $(PIP_CONSTRAINTS)) torch==2.13.0 -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/ctt run --out runs/demo

test: venv
	$(PY) -m pytest -q --durations=15

test-fast: venv
	$(PY) -m pytest -q -m "not integration and not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
