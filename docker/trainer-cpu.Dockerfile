# syntax=docker/dockerfile:1.7
# CPU trainer image: every kfp-grpo stage (SFT, reward model, rollouts with
# transformers.generate, GRPO update, evaluation, promotion) on CPU nodes.
#
# Build from the repository root (the build context must be the repo root):
#   docker build -f docker/trainer-cpu.Dockerfile -t ghcr.io/kfp-grpo/trainer-cpu:0.1.0 .
# or `make -C docker build` (see docker/README.md).
FROM python:3.11.13-slim-bookworm

ARG VERSION=0.1.0
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

LABEL org.opencontainers.image.title="kfp-grpo trainer (CPU)" \
      org.opencontainers.image.description="Iterative GRPO fine-tuning stages for Kubeflow Pipelines, CPU build" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    HOME=/home/kfp \
    HF_HOME=/home/kfp/.cache/huggingface

WORKDIR /opt/kfp-grpo

# Layer 1 (largest, changes least): torch CPU wheels from the PyTorch CPU index,
# so pip never pulls the multi-GB CUDA build from PyPI.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# Layer 2: the project's dependencies, keyed on pyproject.toml only. Empty package
# stubs let pip resolve and install the dependencies; the stub is uninstalled again.
COPY pyproject.toml README.md ./
RUN mkdir -p components pipelines \
 && touch components/__init__.py pipelines/__init__.py \
 && pip install . \
 && pip uninstall -y kfp-grpo \
 && rm -rf components pipelines build ./*.egg-info

# Layer 3 (small, changes most): the source itself.
COPY components ./components
COPY pipelines ./pipelines
RUN pip install --no-deps . \
 && rm -rf build ./*.egg-info

# Non-root runtime user (numeric, so Kubernetes runAsNonRoot can verify it; group 0
# for platforms that run containers with an arbitrary UID in the root group).
RUN useradd --uid 10001 --gid 0 --create-home --home-dir /home/kfp --shell /usr/sbin/nologin kfp \
 && mkdir -p "${HF_HOME}" && chown -R 10001:0 /home/kfp && chmod -R g=u /home/kfp
USER 10001

# KFP replaces the command with its own launcher (python -m kfp.dsl.executor_main);
# the entrypoint is for manual use: `docker run IMAGE sft --help`.
ENTRYPOINT ["kfp-grpo", "stage"]
