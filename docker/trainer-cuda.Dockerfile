# CUDA trainer image: SFT, reward-model training and the GRPO update on GPU node
# pools (single process or torchrun/FSDP inside one pod).
#
# PyPI's Linux x86_64 torch wheels are CUDA builds that bundle the CUDA runtime,
# cuDNN and NCCL as nvidia-* wheels, so a slim Python base is enough: the node's
# driver is mounted by the NVIDIA container toolkit / GPU operator. Set
# TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cu128) to prefer another
# CUDA variant. Do not give this build a local wheel directory holding a CPU torch
# (docker/Makefile WHEELS=): the build fails if torch is not a CUDA build.
#
#   docker build -f docker/trainer-cuda.Dockerfile -t ghcr.io/kfp-grpo/trainer-cuda:0.1.0 .
# or `make -C docker build-trainer-cuda` (see docker/README.md).
FROM python:3.11.13-slim-bookworm

ARG VERSION=0.1.0
ARG TORCH_VERSION=2.13.0
# An extra index whose torch build wins over PyPI's (e.g. 2.13.0+cu128); empty: PyPI's.
ARG TORCH_INDEX_URL=
# Build-time pip settings (docker/Makefile CA_BUNDLE=, WHEELS=), see trainer-cpu.Dockerfile.
ARG PIP_CONFIG_FILE=/tmp/build-extras/pip.conf

LABEL org.opencontainers.image.title="kfp-grpo trainer (CUDA)" \
      org.opencontainers.image.description="Iterative GRPO fine-tuning stages for Kubeflow Pipelines, CUDA build" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HOME=/home/kfp \
    HF_HOME=/home/kfp/.cache/huggingface

# Triton (used by torch.compile and fused kernels) compiles a small C launcher at
# run time: it needs a C compiler and Python.h (the official Python image ships the
# headers; a Debian-Python base, docker/make-base-image.sh, gets python3-dev).
# Debian package versions are not pinned: bookworm security updates replace them.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
    $(python3 -c "import os, sysconfig; print('' if os.path.exists(sysconfig.get_paths()['include'] + '/Python.h') else 'python3-dev')") \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/kfp-grpo

# Every install is pinned by the repository's constraints file.
COPY constraints.txt ./

# Layer 1: torch (CUDA build) — the largest layer, changes least.
RUN --mount=type=bind,source=docker/build-extras,target=/tmp/build-extras \
    pip install -c constraints.txt ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}" \
 && python -c "import torch, sys; sys.exit(None if torch.version.cuda else 'trainer-cuda got a CPU-only torch build')"

# Layer 2: the project's dependencies, keyed on pyproject.toml and constraints.txt only.
COPY pyproject.toml ./
RUN --mount=type=bind,source=docker/build-extras,target=/tmp/build-extras \
    mkdir -p components pipelines \
 && touch components/__init__.py pipelines/__init__.py README.md \
 && pip install -c constraints.txt . \
 && pip uninstall -y kfp-grpo \
 && rm -rf components pipelines README.md build ./*.egg-info

# Layer 3: the source.
COPY README.md ./
COPY components ./components
COPY pipelines ./pipelines
RUN --mount=type=bind,source=docker/build-extras,target=/tmp/build-extras \
    pip install --no-deps . \
 && rm -rf build ./*.egg-info

RUN useradd --uid 10001 --gid 0 --create-home --home-dir /home/kfp --shell /usr/sbin/nologin kfp \
 && mkdir -p "${HF_HOME}" && chown -R 10001:0 /home/kfp && chmod -R g=u /home/kfp
USER 10001

# KFP replaces the command; the entrypoint is for `docker run IMAGE grpo_update --help`.
ENTRYPOINT ["kfp-grpo", "stage"]
