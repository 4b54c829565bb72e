# raftmq: one command to run the broker, one to run the tests (fresh machine, root or sudo).
VENV    ?= .venv
PY      := $(VENV)/bin/python
PORT    ?= 1883
PYTEST_ARGS ?=

.PHONY: serve install build test test-deps bench lint clean

## serve: build a virtualenv, compile the extensions, start the broker on 127.0.0.1:$(PORT)
serve: install
	$(VENV)/bin/raftmq serve --host 127.0.0.1 -p $(PORT)

## install: virtualenv + package (editable) + compiled Cython extensions
install: $(VENV)/.installed
	$(PY) setup.py -q build_ext --inplace

$(VENV)/.installed: pyproject.toml setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel "Cython>=3.0"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

## build: recompile the Cython extensions in place after editing ext/
build:
	$(PY) setup.py -q build_ext --inplace

## test-deps: Debian packages the tests drive (Mosquitto as the reference broker, its clients)
test-deps:
	@if ! command -v mosquitto >/dev/null 2>&1 && ! test -x /usr/sbin/mosquitto || ! command -v mosquitto_ctrl >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients; \
	fi

## test: everything the tests need, then the whole suite -- and the broker suite
## again with 2 and 4 worker processes per node (issue 4)
test: test-deps install
	$(PY) -m pytest $(PYTEST_ARGS)
	@if [ -z "$(PYTEST_ARGS)" ]; then \
		for n in 2 4; do \
			echo "== tests/broker with $$n workers"; \
			RAFTMQ_TEST_WORKERS=$$n $(PY) -m pytest tests/broker -q -k "not mosquitto" || exit 1; \
		done; \
	fi

## bench: raftmq and Mosquitto side by side, ratios printed
bench: test-deps install
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/compare.py

lint:
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf build $(VENV) src/raftmq/*.so src/raftmq/*.c ext/*.c ext/*.html
