# kvggml: one entry point for set-up, build, the evaluator and the tests.
#   make eval     set up everything, then evaluate codecs on the default model
#   make test     set up everything, then run the test suite
#   make test-fast  the tests that need no llama.cpp build (codec, wavelet, config, ...), in under a minute
#   make lint     ruff's checks and format check (pyproject.toml), as CI runs them
#   make sanitize build the patched library with AddressSanitizer + UBSan (build/sanitize) and run
#                 the tier, memory-operation, state and Python-layer tests against it
#   make fuzz     fuzz the block decoder and the saved-state loader (ASan + UBSan + edge coverage),
#                 FUZZ_SECONDS each (default 600), after replaying tests/fuzz/regressions
#   make tsan     build everything with ThreadSanitizer (build/tsan) and run the thread tests against it
#   make soak     a SOAK_TOKENS-token generation past n_ctx (default 20000), plainly and under
#                 OLLAMA_KV_COMPRESSION_BUDGET=SOAK_BUDGET (0.25): RSS flat, counters add up
#   make load     4 clients against `kvggml serve` for LOAD_SECONDS (default 600), then against llama-server
#                 with 4 slots: no error, RSS and fds stable
#   make memory-model  random memory operations against a model of the cache, SEEDS seeds (default 0-19)
#                 of OPS operations (200), with the preset and two schedules; a failure is shrunk
#   make chat     set up everything, then chat with the default model, KV cache compressed
#   make apply-patches / make format-patches
#                 edit llama.cpp in vendor/llama.cpp, commit there, export to patches/
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
JOBS   ?= $(shell nproc)

.PHONY: setup build eval chat test test-fast lint sanitize fuzz tsan soak load memory-model apply-patches format-patches clean

$(VENV)/.installed: pyproject.toml vendor/llama-cpp-python.toml
	$(PYTHON) -m venv $(VENV)
	# llama-cpp-python from the pinned sdist, compiling nothing: kvggml points it at our builds.
	CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(PY) -m pip install -q "$$($(PY) scripts/vendor.py fetch)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

build: setup
	$(PY) scripts/vendor.py build -j $(JOBS)

eval: build
	$(VENV)/bin/kvggml eval

chat: build
	$(VENV)/bin/kvggml chat

test: build
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m fast

SANITIZED_TESTS := tests/test_tier.py tests/test_memory_ops.py tests/test_llama.py tests/test_native.py

sanitize: setup
	$(PY) scripts/vendor.py build stock sanitize -j $(JOBS)
	KVGGML_TEST_PATCHED=sanitize $(PY) -m pytest $(SANITIZED_TESTS)

FUZZ_SECONDS ?= 600

fuzz: setup
	$(PY) scripts/fuzz.py --seconds $(FUZZ_SECONDS)

THREAD_TESTS := tests/test_threads.py

tsan: setup
	$(PY) scripts/vendor.py build tsan -j $(JOBS)
	KVGGML_TEST_PATCHED=tsan $(PY) -m pytest $(THREAD_TESTS)

SOAK_TOKENS ?= 20000
SOAK_BUDGET ?= 0.25
LOAD_SECONDS ?= 600

soak: build
	$(PY) scripts/soak.py generate --tokens $(SOAK_TOKENS)
	OLLAMA_KV_COMPRESSION_BUDGET=$(SOAK_BUDGET) $(PY) scripts/soak.py generate --tokens $(SOAK_TOKENS)

load: build
	$(PY) scripts/soak.py load --seconds $(LOAD_SECONDS)
	$(PY) scripts/soak.py load --seconds $(LOAD_SECONDS) --engine llama-server

SEEDS ?= 0-19
OPS   ?= 200

memory-model: build
	for variant in preset hierarchy drop; do \
	    $(PY) tests/scripts/memory_model.py --variant $$variant --seeds $(SEEDS) --ops $(OPS) || exit 1; \
	done

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

apply-patches:
	$(PYTHON) scripts/vendor.py apply-patches

format-patches:
	$(PYTHON) scripts/vendor.py format-patches

clean:
	rm -rf build/stock build/patched
