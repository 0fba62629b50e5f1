# CPU trainer image: every kfp-grpo stage (SFT, reward model, rollouts with
# transformers.generate, GRPO update, evaluation, promotion) on CPU nodes.
#
# Build from the repository root (the build context must be the repo root):
#   docker build -f docker/trainer-cpu.Dockerfile -t ghcr.io/kfp-grpo/trainer-cpu:0.1.0 .
# or `make -C docker build-trainer-cpu` (see docker/README.md: build options for an extra
# CA bundle and a local wheel directory, podman, a locally made base image).
# Needs BuildKit (Docker >= 23 by default) or podman/buildah for `RUN --mount`.
FROM python:3.11.13-slim-bookworm

ARG VERSION=0.1.0
ARG TORCH_VERSION=2.13.0
# An extra index whose torch build wins over PyPI's (2.13.0+cpu sorts above 2.13.0), so pip
# never pulls the multi-GB CUDA build; empty: PyPI and the local wheels only.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Build-time pip settings from docker/build-extras/ (docker/Makefile CA_BUNDLE=, WHEELS=),
# bind-mounted into the pip steps only: nothing of them lands in a layer.
ARG PIP_CONFIG_FILE=/tmp/build-extras/pip.conf

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

# Every install is pinned by the repository's constraints file. Size (<= 1.4 GB): pip
# installs without byte-compiling, then importing what the tasks import compiles just
# that (110 MB of .pyc instead of 360 MB; task start-up stays ~8 s instead of ~16 s);
# the wheels' test suites and torch's C++ test binaries and headers (no C++ compiler
# here for torch.compile/cpp_extension) are removed in the layer that installed them.
COPY constraints.txt ./

# Layer 1 (largest, changes least): torch, CPU build; the check fails the build if a
# CUDA build slipped in.
RUN --mount=type=bind,source=docker/build-extras,target=/tmp/build-extras \
    pip install --no-compile -c constraints.txt ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}" \
 && site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && rm -rf "$site"/torch/test "$site"/torch/include "$site"/torch/bin/test_* "$site"/torch/bin/*Test "$site"/torch/bin/protoc* \
 && find "$site" -type d -name tests -prune -exec rm -rf {} + \
 && PYTHONDONTWRITEBYTECODE= python -c "import torch, sys; sys.exit(torch.version.cuda and 'trainer-cpu got a CUDA torch build')"

# Layer 2: the project's dependencies, keyed on pyproject.toml and constraints.txt only.
# Empty package stubs (and README) let pip resolve and install them; the stub is
# uninstalled again. The import compiles the dependencies' import-time modules.
COPY pyproject.toml ./
RUN --mount=type=bind,source=docker/build-extras,target=/tmp/build-extras \
    mkdir -p components pipelines \
 && touch components/__init__.py pipelines/__init__.py README.md \
 && pip install --no-compile -c constraints.txt . \
 && pip uninstall -y kfp-grpo \
 && rm -rf components pipelines README.md build ./*.egg-info \
 && find "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" -type d -name tests -prune -exec rm -rf {} + \
 && PYTHONDONTWRITEBYTECODE= python -c "import transformers.modeling_utils, transformers.generation, tokenizers, safetensors, accelerate, datasets, pandas, \
        pyarrow.parquet, pydantic, yaml, kfp.dsl, kfp.kubernetes, mlflow, sqlalchemy, alembic, matplotlib.pyplot, docker"

# Layer 3 (small, changes most): the source itself, installed (the copy is removed so it
# cannot shadow the installed package), then every stage imported once to compile it.
COPY README.md ./
COPY components ./components
COPY pipelines ./pipelines
RUN --mount=type=bind,source=docker/build-extras,target=/tmp/build-extras \
    pip install --no-compile --no-deps . \
 && rm -rf build ./*.egg-info components pipelines README.md \
 && PYTHONDONTWRITEBYTECODE= python -c "import importlib; from components.config import STAGES; \
        [importlib.import_module('components.' + s) for s in STAGES]; \
        import pipelines.runtime, pipelines.trainer_job, kfp.dsl.executor_main"

# Non-root runtime user (numeric, so Kubernetes runAsNonRoot can verify it; group 0
# for platforms that run containers with an arbitrary UID in the root group).
RUN useradd --uid 10001 --gid 0 --create-home --home-dir /home/kfp --shell /usr/sbin/nologin kfp \
 && mkdir -p "${HF_HOME}" && chown -R 10001:0 /home/kfp && chmod -R g=u /home/kfp
USER 10001

# KFP replaces the command with its own launcher (python -m kfp.dsl.executor_main);
# the entrypoint is for manual use: `docker run IMAGE sft --help`.
ENTRYPOINT ["kfp-grpo", "stage"]
