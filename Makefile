# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-stop test fuzz bench protos system clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --config-settings editable_mode=compat -e '.[dev]'
	@touch $@

# Debian packages the tests, the demo and the units' verification need (idempotent).
system:
	@scripts/bootstrap-system.sh

demo: system $(STAMP)
	@scripts/demo.sh start

demo-stop:
	@scripts/demo.sh stop

# The suite with the built-in supervisor and, side by side, the deploy, day-2 and recovery tests once
# more with the systemd driver under a bare systemd of the tests' own (tests/run.py).
test: system $(STAMP)
	@$(PY) -m tests.run

# The fuzz tests with thousands of examples each instead of the suite's few (see tests/conftest.py).
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q --timeout=3600 tests/test_fuzz.py

bench: system $(STAMP)
	$(PY) bench/run.py

protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. protos/deployer.proto

clean: demo-stop
	rm -rf $(VENV) .demo build *.egg-info
