# conceptlens: `make demo` and `make test` are the two commands a newcomer needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# torch's CUDA build (runs on the CPU too); pinned so pip takes the copies on local disk where present.
TORCH  := torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast install proto bench lint-proto clean

$(STAMP): pyproject.toml setup.py
	@echo "installing into $(VENV) (torch's CUDA build is large: a minute or two)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel grpcio-tools
	$(PIP) install -q $(TORCH)
	$(PIP) install -q --no-build-isolation -e '.[precompute,test,torchserve]'
	$(PIP) install -q --no-deps 'tritonclient[http,grpc]==2.73.0'  # its deps are in [test]; see pyproject.toml
	touch $(STAMP)

install: $(STAMP)

proto: $(STAMP)
	$(PY) -c "from setup import generate_protos; generate_protos()"  # the build's own protoc call

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FASHION := /usr/share/datasets/fashion-mnist

demo: $(STAMP) proto
	@test -d $(FASHION) || { echo "installing Debian's dataset-fashion-mnist (real images for the demo)"; \
	  $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null || { $(SUDO) apt-get update -q >/dev/null && \
	  $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null; }; }
	$(PY) -m conceptlens.service.demo --out demo-out

test: $(STAMP) proto
	$(PY) -m pytest -q -ra

test-fast: $(STAMP) proto
	$(PY) -m pytest -q -ra -m "not slow"

bench: $(STAMP) proto
	$(PY) bench/bench_nmf.py

# Known vulnerabilities of the packages in $(VENV) (pip-audit, run from a tools venv of its own so the
# project's dependency set stays as it is; deploy/audit_deps.py says what passes and what fails, and
# deploy/pip-audit-ignores.txt holds the documented exceptions).
TOOLS       := .venv-tools
TOOLS_STAMP := $(TOOLS)/.installed
$(TOOLS_STAMP): deploy/tools-requirements.txt
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q -r deploy/tools-requirements.txt
	touch $(TOOLS_STAMP)

.PHONY: audit
audit: $(STAMP) $(TOOLS_STAMP)
	$(TOOLS)/bin/python deploy/audit_deps.py --python $(PY)

lint-proto:
	npx --yes @bufbuild/buf lint

clean:
	rm -rf $(VENV) demo-out .pytest_cache build *.egg-info
