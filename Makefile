# Fresh-machine entry points:  `make demo` (install + the local demo)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU quickstart pins torch first; on a GPU cluster install mmdit into your own CUDA torch
# environment with `pip install -e .[gpu]` instead (mmdit never replaces an installed torch).
TORCH_PIN ?= torch==2.13.0

.PHONY: install sysdeps testdeps demo test test-quick bench clean

install: $(VENV)/.installed sysdeps

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Debian packages, installed when missing: fonts for synthetic text rendering (the demo and
# tests), and the real Prometheus server and Chromium the observability tests drive.
DEMO_DEBS := /usr/share/fonts/truetype/wqy/wqy-microhei.ttc:fonts-wqy-microhei \
             /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf:fonts-dejavu-core
TEST_DEBS := /usr/bin/prometheus:prometheus /usr/bin/chromium:chromium /usr/sbin/slurmctld:slurm-wlm \
             /usr/sbin/munged:munge /usr/bin/ss:iproute2  # ip, ss: the multi-host tier
define apt_install
	@missing=""; for pair in $(1); do [ -e "$${pair%%:*}" ] || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
endef

sysdeps:
	$(call apt_install,$(DEMO_DEBS))

testdeps: sysdeps
	$(call apt_install,$(TEST_DEBS))

demo: install
	$(BIN)/mmdit demo run.dir=runs/demo

test: install testdeps
	$(BIN)/python -m pytest -q --durations=30 tests

# The in-process tier (about 100 s on 2 cores): what to run while editing.
test-quick: install
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: install
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/recompute.py
	$(BIN)/python bench/producer.py
	$(BIN)/python bench/data_service.py
	$(BIN)/python bench/coordinator_scale.py
	$(BIN)/python bench/sequence_parallel.py

clean:
	rm -rf $(VENV) runs *.egg-info
