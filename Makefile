# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
STAMP := $(VENV)/.dsla-setup-done
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
D2_WHEEL := sal-detectron2==0.7.2
PYTEST_ARGS ?=

.PHONY: setup demo test benchmark clean

setup: $(STAMP)

# Re-runs only when the pins or the package metadata change; a ready venv costs one stat.
$(STAMP): requirements.txt setup.py Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH_PINS)
	$(PIP) install -r requirements.txt
	@# detectron2: keep one that is already importable (e.g. a source build); otherwise the
	@# pure-Python wheel (tagged cp310, runs on newer Pythons without its optional _C).
	@$(PY) -c "import detectron2" 2>/dev/null && echo "detectron2 already installed" || \
	  $(PIP) install --no-deps --python-version 3.10 --only-binary=:all: --upgrade \
	    --target "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" $(D2_WHEEL)
	$(PIP) install --no-deps --no-build-isolation -e .
	$(PY) -c "import dsla, detectron2; print('dsla', dsla.__version__, 'with detectron2', detectron2.__version__)"
	@touch $@

demo: setup
	$(PY) -m dsla.tools.demo

test: setup
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

benchmark: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) output
