# OpenLoRA — developer entry points. Every target sets up what is missing.
PY_SYS   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup protos test test-fast demo up lint clean

# venv sees system site-packages so an already installed torch is accepted;
# torch is installed (CPU build on this kind of machine) only when missing.
$(VENV)/.setup-done: pyproject.toml
	test -x $(PY) || $(PY_SYS) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.setup-done

protos: setup
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. protos/*.proto

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: setup
	$(PY) -m services.demo

up: setup
	$(VENV)/bin/openlora up

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .demo
