# syntax=docker/dockerfile:1.7
# Rollout image: samples G completions per prompt with vLLM (tensor parallel,
# rollouts sharded across pods) — the project installed with its `gpu` extra.
#
# vLLM pins its torch version exactly (vllm 0.32.0 -> torch 2.13.0, the same torch
# as the trainer images) and a transformers range inside the project's own range,
# so the rollout and trainer images load each other's checkpoints unchanged.
#
#   docker build -f docker/rollout-vllm.Dockerfile -t ghcr.io/kfp-grpo/rollout-vllm:0.1.0 .
FROM python:3.11.13-slim-bookworm

ARG VERSION=0.1.0
ARG TORCH_VERSION=2.13.0
ARG VLLM_VERSION=0.32.0

LABEL org.opencontainers.image.title="kfp-grpo rollout (vLLM)" \
      org.opencontainers.image.description="Iterative GRPO rollout stage for Kubeflow Pipelines, vLLM on CUDA" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.kfp-grpo.vllm.version="${VLLM_VERSION}"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HOME=/home/kfp \
    HF_HOME=/home/kfp/.cache/huggingface \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1

# vLLM compiles Triton kernels / torch.compile graphs at start-up: needs a C compiler.
# Debian package versions are not pinned: bookworm security updates replace them.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/kfp-grpo

# Layer 1: torch at exactly the version vLLM pins.
RUN pip install "torch==${TORCH_VERSION}"

# Layer 2: vLLM and the project's dependencies (with the `gpu` extra), keyed on
# pyproject.toml only; empty package stubs stand in for the source.
COPY pyproject.toml README.md ./
# hadolint ignore=DL3013
RUN mkdir -p components pipelines \
 && touch components/__init__.py pipelines/__init__.py \
 && pip install ".[gpu]" "vllm==${VLLM_VERSION}" "torch==${TORCH_VERSION}" \
 && pip uninstall -y kfp-grpo \
 && rm -rf components pipelines build ./*.egg-info

# Layer 3: the source.
COPY components ./components
COPY pipelines ./pipelines
# hadolint ignore=DL3013
RUN pip install --no-deps ".[gpu]" \
 && rm -rf build ./*.egg-info

RUN useradd --uid 10001 --gid 0 --create-home --home-dir /home/kfp --shell /usr/sbin/nologin kfp \
 && mkdir -p "${HF_HOME}" && chown -R 10001:0 /home/kfp && chmod -R g=u /home/kfp
USER 10001

# KFP replaces the command; the entrypoint is for `docker run IMAGE rollout --help`.
ENTRYPOINT ["kfp-grpo", "stage"]
