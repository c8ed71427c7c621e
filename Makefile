# One target directory, one profile (dev, with optimised dependencies), one
# feature set: tests and the server binary share every compiled host crate.
# Always build/test the whole workspace (`--workspace`): selecting fewer
# packages changes feature unification and recompiles mistral.rs.
MODEL_DIR := models/smollm2
MODEL_FILE := SmolLM2-135M-Instruct.Q4_1.gguf
PORT ?= 1234
KV_CACHE ?= omnikv
KV_CACHE_CONFIG ?= configs/serve.json
CARGO ?= cargo

.PHONY: prepare build serve test eval divergence ab calibrate peers fixtures cuda-check nccl-check gpu-bundle fmt

## Extract and patch the pinned host crates, fetch the model, install the
## OpenAI Python client the streaming-error test drives the server with.
prepare:
	scripts/prepare-host.sh
	scripts/fetch-model.sh
	python3 -m pip install --quiet --disable-pip-version-check -r scripts/test-requirements.txt

## Build the patched `mistralrs` binary (target/debug/mistralrs).
build: prepare
	$(CARGO) build --workspace

## Serve the real model on 127.0.0.1:$(PORT) (A/B: make serve KV_CACHE=default).
serve: build
	@echo
	@echo "Serving $(MODEL_FILE) with --kv-cache $(KV_CACHE) on 127.0.0.1:$(PORT). Try:"
	@echo "  curl -s http://127.0.0.1:$(PORT)/v1/chat/completions -H 'Content-Type: application/json' \\"
	@echo "    -d '{\"model\":\"default\",\"messages\":[{\"role\":\"user\",\"content\":\"What is the capital of Japan?\"}],\"temperature\":0,\"max_tokens\":48}'"
	@echo
	target/debug/mistralrs serve --host 127.0.0.1 -p $(PORT) \
	  --kv-cache $(KV_CACHE) $(if $(filter default,$(KV_CACHE)),,--kv-cache-config $(KV_CACHE_CONFIG)) \
	  --format gguf -m $(MODEL_DIR) -f $(MODEL_FILE)

## Every test: unit tests, real-model logits fixtures, CLI errors, and the
## end-to-end HTTP tests against stock mistral.rs outputs.
test: build
	$(CARGO) test --workspace

## Fidelity evaluation through the real server (writes results/fidelity.md).
## `full` is full attention after the same fast prefill (each request
## sends "kv_cache": {"enabled": false}), so the OmniKV columns differ from
## it by the selection only.
EVAL_ARGS ?= --variants full,omnikv@0.067,omnikv@0.1,omnikv@0.1:keep_sink_tokens=4+keep_recent_tokens=32 \
  --config configs/smollm2-135m.json
eval: build
	scripts/fetch-haystack.sh
	target/debug/omnikv-eval $(EVAL_ARGS)

## Teacher-forced divergence from full attention, in process (writes
## results/fidelity-tf.md and its plots; resumable).
CHOSEN := do_select_layers=[4,8,17,22]+num_wait_load_layers=0
DIVERGENCE_VARIANTS := full-exact-prefill,omnikv@0.05,omnikv@0.1,omnikv@0.2,omnikv@0.05:$(CHOSEN),omnikv@0.1:$(CHOSEN),omnikv@0.2:$(CHOSEN),h2o@0.05,h2o@0.1,h2o@0.2,streaming@0.05,streaming@0.1,streaming@0.2,snapkv@0.05,snapkv@0.1,snapkv@0.2,omnikv@0.1:selection_per_kv_head=true,omnikv@0.1:$(CHOSEN)+selection_per_kv_head=true,omnikv@0.1:keep_sink_tokens=4+keep_recent_tokens=32
DIVERGENCE_DOCS ?= 8,8,8
DIVERGENCE_ARGS ?= --lengths 1024,4096,7680 --docs $(DIVERGENCE_DOCS) --steps 64 --exact-prefill-lengths 1024 \
  --config configs/smollm2-135m-published.json --paired "omnikv:$(CHOSEN)" --variants "$(DIVERGENCE_VARIANTS)"
## The selection options and filter-layer sets of issue 15 at P = 1024
## (writes results/fidelity-tf-options.md).
OPTION_VARIANTS := omnikv@0.1,omnikv@0.1:$(CHOSEN),omnikv@0.1:selection_per_kv_head=true,omnikv@0.1:$(CHOSEN)+selection_per_kv_head=true,omnikv@0.1:keep_sink_tokens=4+keep_recent_tokens=32,omnikv@0.1:selector_cls=softmax_before_last,omnikv@0.1:do_select_layers=[3,6,19],omnikv@0.1:do_select_layers=[2,10,14,19],omnikv@0.1:num_wait_load_layers=2,omnikv@0.1:do_select_layers=[8,18],omnikv@0.1:do_select_layers=[18],omnikv@0.2:selection_mass=0.9,omnikv@0.5:selection_mass=0.95
OPTIONS_ARGS ?= --lengths 1024 --docs 8 --steps 64 --config configs/smollm2-135m-published.json \
  --paired omnikv --variants "$(OPTION_VARIANTS)" --out results/fidelity-tf-options.md \
  --title "Selection options at P = 1024, teacher forced, on SmolLM2-135M-Instruct"
divergence: build
	scripts/fetch-haystack.sh
	target/debug/omnikv-divergence $(DIVERGENCE_ARGS)
	target/debug/omnikv-divergence $(OPTIONS_ARGS)

## A/B: the stock cache, OmniKV and the token-dropping baselines at three
## budgets on needle-in-a-haystack, two-stage retrieval (chat and
## chain-of-thought), two needles and the committed LongBench/InfiniteBench
## sample files (writes results/ab.md and its plots; resumable). `default`
## is the stock cache with the stock prefill, `full` full attention after
## OmniKV's prefill.
AB_ARGS ?= --variants default,full,omnikv@0.05,omnikv@0.1,omnikv@0.2,h2o@0.05,h2o@0.1,h2o@0.2,streaming@0.05,streaming@0.1,streaming@0.2,snapkv@0.05,snapkv@0.1,snapkv@0.2 \
  --suites needle,2stage,2needle,bench --needle-lengths 1000,2000 --depths 0,25,50,75,100 \
  --two-stage-sizes 60 --two-stage-per-size 4 --prompt-modes chat,cot --two-needle-lengths 1000 \
  --bench-files crates/omnikv-eval/samples/longbench,crates/omnikv-eval/samples/infinitebench \
  --title "A/B: OmniKV vs token dropping on SmolLM2-135M-Instruct" \
  --reference default,full --out results/ab.md --cache results/cache/ab.jsonl
ab: build
	scripts/fetch-haystack.sh
	target/debug/omnikv-eval $(AB_ARGS)

## Filter-layer calibration (writes configs/smollm2-135m*.{json,svg,md}).
CALIBRATE_ARGS ?= --filters 1,2,3,4 --wait-load 0,1,2 --first 1,2,3,4 --budget 0.1 \
  --candidates "2,8,18" --greedy-top 2 --base configs/smollm2-135m.json --out configs/smollm2-135m.json
calibrate: build
	scripts/fetch-haystack.sh
	target/debug/omnikv-calibrate $(CALIBRATE_ARGS)

## This project against llama.cpp on the same CPU, GGUF and thread count
## (builds llama.cpp's llama-bench from the llama-cpp-python sdist once;
## writes results/peers.md and results/peers.svg).
PEERS_ARGS ?= --repeats 3
peers: build
	target/debug/omnikv-peers $(PEERS_ARGS)

## Rewrite the tiny Llama fixtures (needs torch, transformers, gguf).
fixtures:
	python3 scripts/make_tiny_llama_fixtures.py

## The CUDA side without a GPU: the kernels compiled for sm_80 and sm_90
## with nvcc from PyPI, the GPU bundle's kernel tests built and linked for
## real (target/gpu-bundle), and its run script stopping with "no CUDA
## device" (exit 3) where there is none; on a GPU machine it runs them.
cuda-check:
	scripts/check-cuda-kernels.sh
	scripts/gpu-bundle.sh --kernels-only
	@s=0; target/gpu-bundle/bundle/run.sh target/gpu-bundle/check || s=$$?; \
	  if [ $$s -ne 0 ] && [ $$s -ne 3 ]; then echo "cuda-check: the bundle's run.sh exited $$s" >&2; exit 1; fi; \
	  echo "ok   GPU bundle run script (exit $$s)"

## The GPU check as a bundle to carry to a GPU machine (README, CUDA):
## target/gpu-bundle/bundle/{omnikv-kernels-cuda,synth,run.sh}.
gpu-bundle:
	scripts/gpu-bundle.sh

fmt:
	$(CARGO) fmt -p omnikv-kernels -p omnikv-backend -p omnikv-eval -p omnikv-tools -p integration-tests

## Compile-check the workspace with CUDA + NCCL (tensor parallelism across
## GPUs) without a GPU, in target/nccl-check (about 20 min cold; not in CI).
nccl-check: prepare
	scripts/check-nccl.sh
