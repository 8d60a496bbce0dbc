# Fresh-machine entry points:  `make demo` (install + the local demo)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU quickstart pins torch first; on a GPU cluster install mmdit into your own CUDA torch
# environment with `pip install -e .[gpu]` instead (mmdit never replaces an installed torch).
TORCH_PIN ?= torch==2.13.0
FONTS := /usr/share/fonts/truetype/wqy/wqy-microhei.ttc /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf

.PHONY: install sysdeps demo test test-quick bench clean

install: $(VENV)/.installed sysdeps

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Fonts for synthetic text rendering (Chinese + Latin), from Debian packages.
sysdeps:
	@for f in $(FONTS); do [ -f $$f ] || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing fonts-wqy-microhei fonts-dejavu-core"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-wqy-microhei fonts-dejavu-core >/dev/null; \
	fi

demo: install
	$(BIN)/mmdit demo run.dir=runs/demo

test: install
	$(BIN)/python -m pytest -q tests

# The in-process tier (under a minute): what to run while editing.
test-quick: install
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: install
	$(BIN)/python bench/recompute.py
	$(BIN)/python bench/producer.py
	$(BIN)/python bench/data_service.py

clean:
	rm -rf $(VENV) runs *.egg-info
