# star-jax: every target does its own set-up on a fresh Debian machine.
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed
DEB_PKGS  := espeak-ng sox openttd-opensfx chromium chromium-driver
OPENSFX   := /usr/share/games/openttd/baseset/opensfx/opensfx.cat
PYTEST_ARGS ?= -n 2 --dist loadfile --timeout 1200

.PHONY: setup system-deps demo test test-slow bench clean

setup: system-deps $(STAMP)

# Debian packages for offline TTS (espeak-ng), audio tools (sox), the built-in corpus (openttd-opensfx) and the
# headless browser of the page tests (chromium, chromium-driver).
system-deps:
	@if command -v espeak-ng >/dev/null && command -v sox >/dev/null && [ -f $(OPENSFX) ] \
	    && command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEB_PKGS) >/dev/null; \
	else \
	  echo "missing Debian packages: run 'sudo apt-get install $(DEB_PKGS)' (tests that need them will skip)"; \
	fi

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[torch,test,demo,serve]'
	touch $(STAMP)

demo: setup
	$(BIN)/star-jax demo --workdir outputs/demo

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-slow: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

# The latency bench reads the built-in corpus's test split; prepare is a no-op when it is already built.
bench: setup
	@grep -qs '"test":' data/opensfx/info.json || $(BIN)/star-jax prepare opensfx --out data/opensfx --audio-rate-hz 16000
	@for f in bench/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) outputs .pytest_cache
