# `make test` and `make demo` bootstrap .venv on a fresh machine by themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# extras installed into .venv; CI adds gst (.ci/run installs the system packages it builds against)
EXTRAS ?= export,test,docs,sign,trust,service
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: test demo docs lint bench clean

$(STAMP): pyproject.toml constraints.txt
	@echo "== bootstrapping $(VENV) (first run downloads ~400 MB of wheels)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	@touch $@

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m demo --out build/demo

# the documentation site, strict: a warning, a broken link or anchor, or a page outside the contents fails
docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -n -q -b html docs build/site
	@echo "== docs: build/site/index.html"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/export_speed.py
	$(PY) benchmarks/int8_speed.py

clean:
	rm -rf build .pytest_cache
