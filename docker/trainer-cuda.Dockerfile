# syntax=docker/dockerfile:1.7
# CUDA trainer image: SFT, reward-model training and the GRPO update on GPU node
# pools (single process or torchrun/FSDP inside one pod).
#
# PyPI's Linux x86_64 torch wheels are CUDA builds that bundle the CUDA runtime,
# cuDNN and NCCL as nvidia-* wheels, so a slim Python base is enough: the node's
# driver is mounted by the NVIDIA container toolkit / GPU operator. Set
# TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cu128) to pick another
# CUDA variant.
#
#   docker build -f docker/trainer-cuda.Dockerfile -t ghcr.io/kfp-grpo/trainer-cuda:0.1.0 .
FROM python:3.11.13-slim-bookworm

ARG VERSION=0.1.0
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple

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
# run time and needs a C compiler; the Python headers ship with the base image.
# Debian package versions are not pinned: bookworm security updates replace them.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/kfp-grpo

# Layer 1: torch (CUDA build) — the largest layer, changes least.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# Layer 2: the project's dependencies, keyed on pyproject.toml only.
COPY pyproject.toml README.md ./
RUN mkdir -p components pipelines \
 && touch components/__init__.py pipelines/__init__.py \
 && pip install . \
 && pip uninstall -y kfp-grpo \
 && rm -rf components pipelines build ./*.egg-info

# Layer 3: the source.
COPY components ./components
COPY pipelines ./pipelines
RUN pip install --no-deps . \
 && rm -rf build ./*.egg-info

RUN useradd --uid 10001 --gid 0 --create-home --home-dir /home/kfp --shell /usr/sbin/nologin kfp \
 && mkdir -p "${HF_HOME}" && chown -R 10001:0 /home/kfp && chmod -R g=u /home/kfp
USER 10001

# KFP replaces the command; the entrypoint is for `docker run IMAGE grpo_update --help`.
ENTRYPOINT ["kfp-grpo", "stage"]
