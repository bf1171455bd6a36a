# Fresh-machine entry points. `make demo` and `make test` create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv demo test lint clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first, pinned, so pip takes the local build instead of a multi-GB download
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[test]"
	# headless Chromium for the report's browser test (skipped without it): Debian's package,
	# installed once, as root where apt-get exists (CI); otherwise say how
	command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	      --no-install-recommends chromium fonts-dejavu-core; \
	  else echo "note: no chromium; the report's browser test will be skipped" \
	    "(sudo apt-get install chromium)"; fi
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/skpatchcore demo --out demo_output

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo_output
