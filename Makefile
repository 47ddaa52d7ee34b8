# The two commands a user needs: `make serve` and `make test`. Each sets up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test serve install clean

$(STAMP): pyproject.toml constraints.txt sdk/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ./sdk -e '.[serve,demo,test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# Options pass through: make serve ARGS="--port 3001 --model prsmed-tiny"
serve: $(STAMP)
	$(VENV)/bin/prsmed serve $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
