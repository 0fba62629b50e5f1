# Rollout image: samples G completions per prompt with vLLM (tensor parallel,
# rollouts sharded across pods) — the project installed with its `gpu` extra.
#
# vLLM pins its torch version exactly (vllm 0.32.0 -> torch 2.13.0, the same torch
# as the trainer images) and a transformers range inside the project's own range,
# so the rollout and trainer images load each other's checkpoints unchanged.
#
#   docker build -f docker/rollout-vllm.Dockerfile -t ghcr.io/kfp-grpo/rollout-vllm:0.1.0 .
# or `make -C docker build-rollout-vllm` (see docker/README.md; no CPU torch in WHEELS).
FROM python:3.11.13-slim-bookworm

ARG VERSION=0.1.0
ARG TORCH_VERSION=2.13.0
ARG VLLM_VERSION=0.32.0
# vLLM 0.32.0 needs older transformers (<5.20), fastapi (<0.137) and numpy (<2.4) than
# constraints.txt (the trainers' set) pins: here they are pinned to what pip resolved
# for vLLM with the rest of constraints.txt (2026-12-01); every other pin is kept.
# They must stay inside pyproject.toml's ranges (tests/test_docker.py checks it): vLLM
# 0.32.0/0.33.0 accept transformers < 5.20/5.21 only.
ARG VLLM_PINS="transformers==5.19.0 fastapi==0.136.3 numpy==2.3.5"
# An extra index whose torch build wins over PyPI's (e.g. 2.13.0+cu128); empty: PyPI's.
ARG TORCH_INDEX_URL=
# Build-time pip settings (docker/Makefile CA_BUNDLE=, WHEELS=), see trainer-cpu.Dockerfile.
ARG PIP_CONFIG_FILE=/tmp/build-extras/pip.conf

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

# vLLM compiles Triton kernels / torch.compile graphs at start-up: needs a C compiler
# and Python.h (a Debian-Python base, docker/make-base-image.sh, gets python3-dev).
# Debian package versions are not pinned: bookworm security updates replace them.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
    $(python3 -c "import os, sysconfig; print('' if os.path.exists(sysconfig.get_paths()['include'] + '/Python.h') else 'python3-dev')") \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/kfp-grpo

# Every install is pinned by the repository's constraints file, with VLLM_PINS in place
# of its own pins for those packages (packages it does not list float within vLLM's ranges).
COPY constraints.txt ./
RUN for pin in ${VLLM_PINS}; do sed -i "/^${pin%%==*}==/Id" constraints.txt && echo "$pin" >> constraints.txt; done

# Layer 1: torch at exactly the version vLLM pins (CUDA build).
RUN --mount=type=bind,source=docker/build-extras,target=/tmp/build-extras \
    pip install -c constraints.txt ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}" \
 && python -c "import torch, sys; sys.exit(None if torch.version.cuda else 'rollout-vllm got a CPU-only torch build')"

# Layer 2: vLLM and the project's dependencies (with the `gpu` extra), keyed on
# pyproject.toml and constraints.txt only; empty package stubs stand in for the source.
COPY pyproject.toml ./
# hadolint ignore=DL3013
RUN --mount=type=bind,source=docker/build-extras,target=/tmp/build-extras \
    mkdir -p components pipelines \
 && touch components/__init__.py pipelines/__init__.py README.md \
 && pip install -c constraints.txt ".[gpu]" "vllm==${VLLM_VERSION}" "torch==${TORCH_VERSION}" \
 && pip uninstall -y kfp-grpo \
 && rm -rf components pipelines README.md build ./*.egg-info

# Layer 3: the source.
COPY README.md ./
COPY components ./components
COPY pipelines ./pipelines
# hadolint ignore=DL3013
RUN --mount=type=bind,source=docker/build-extras,target=/tmp/build-extras \
    pip install --no-deps ".[gpu]" \
 && rm -rf build ./*.egg-info

RUN useradd --uid 10001 --gid 0 --create-home --home-dir /home/kfp --shell /usr/sbin/nologin kfp \
 && mkdir -p "${HF_HOME}" && chown -R 10001:0 /home/kfp && chmod -R g=u /home/kfp
USER 10001

# KFP replaces the command; the entrypoint is for `docker run IMAGE rollout --help`.
ENTRYPOINT ["kfp-grpo", "stage"]
