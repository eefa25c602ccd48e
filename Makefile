# The two commands the README promises: `make run` and `make test`. Both set everything up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEV    := var/dev

.PHONY: run test lint bench-accept bench-dkim bench-feedback bench-latency clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.run-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.run-installed

# The benchmarks' own extra (pynacl), on top of the daemon: no test extras needed.
$(VENV)/.bench-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[bench]'
	touch $@ $(VENV)/.run-installed

# Start the daemon in the foreground on loopback high ports (a dev set-up is created in var/dev once).
run: $(VENV)/.run-installed
	@if [ ! -f $(DEV)/mailrelayd.toml ]; then $(BIN)/mailrelayd init $(DEV); else \
	  echo "Using $(DEV)/ (delete it for a fresh set-up). Submit a test message with:"; \
	  $(BIN)/python -c 'from mailrelayd.devsetup import swaks_relay; print("  " + swaks_relay())'; fi
	@$(BIN)/python -m compileall -q mailrelayd >/dev/null
	@echo "Listening: relay 127.0.0.1:2525, submission 127.0.0.1:2587 (STARTTLS), submissions 127.0.0.1:2465, http 127.0.0.1:9025"
	exec $(BIN)/mailrelayd run -c $(DEV)/mailrelayd.toml

# Install what the tests drive (swaks, promtool, Mail::DKIM, mailauth), then run the whole suite.
# Byte-compiled once first: where PYTHONDONTWRITEBYTECODE is set, each of the few hundred daemon and
# CLI processes the suite starts would otherwise compile the package from source again (~0.3 s each).
# One pytest worker per CPU (pytest-xdist): most tests wait on sockets and subprocesses, so two
# workers on two cores take ~8 minutes where one took ~10. PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= auto
test: $(VENV)/.test-installed
	bash tests/system-deps.sh
	$(BIN)/python -m compileall -q mailrelayd >/dev/null
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --durations=10

lint: $(VENV)/.test-installed
	$(BIN)/ruff check mailrelayd tests bench

bench-accept: $(VENV)/.bench-installed
	$(BIN)/python bench/accept.py

bench-dkim: $(VENV)/.bench-installed
	$(BIN)/python bench/dkim_sign.py

bench-feedback: $(VENV)/.bench-installed
	$(BIN)/python bench/feedback_accuracy.py --corpus ../shared/corpus/feedback

bench-latency: $(VENV)/.bench-installed
	$(BIN)/python bench/latency.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
