# The two commands: `make demo` (the whole pipeline on the built-in data, offline, on a CPU)
# and `make test` (the test suite). Both create .venv first when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline \
	NO_ALBUMENTATIONS_UPDATE=1 TOKENIZERS_PARALLELISM=false GRADIO_ANALYTICS_ENABLED=False
DEMO_DIR ?= demo_out

.PHONY: install test demo bench clean

install: $(STAMP)

# Re-install only when a requirements file changed (or the venv is missing).
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

# tests/test_app.py drives Debian's headless Chromium (Playwright cannot download its own browser
# here); installed from apt when missing (CI runs as root with the apt registry reachable).
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

test: $(STAMP) $(CHROMIUM)
	$(OFFLINE) $(PY) -m pytest -q --durations=15 tests

# Re-running reuses the stages that finished with the same inputs and config; FORCE=1 starts over.
demo: $(STAMP)
	$(OFFLINE) PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) scripts/demo.py $(DEMO_DIR) $(if $(FORCE),--force)

bench: $(STAMP)
	$(OFFLINE) PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/bench.sh $(BENCH_ARGS)

clean:
	rm -rf $(DEMO_DIR) bench_out .pytest_cache
