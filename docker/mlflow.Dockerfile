# MLflow tracking server for the Helm chart (helm/kfp-grpo) and for
# `kfp-grpo run --runner docker`: MLflow (server + UI, the `auth` extra with Flask-WTF
# for `--app-name basic-auth`), the PostgreSQL driver (backend + basic-auth user store)
# and boto3 (S3-compatible artifact store, also used by the chart's setup Job to create
# the bucket), on the same Python base as the project's images, running as a non-root user.
#
#   docker build -f docker/mlflow.Dockerfile -t ghcr.io/kfp-grpo/mlflow-server:0.1.0 .
# or `make -C docker build-mlflow-server` (see docker/README.md).
FROM python:3.11.13-slim-bookworm

ARG VERSION=0.1.0
ARG MLFLOW_VERSION=3.17.2
ARG PSYCOPG2_VERSION=2.9.13
ARG BOTO3_VERSION=1.44.5
# Build-time pip settings (docker/Makefile CA_BUNDLE=, WHEELS=), see trainer-cpu.Dockerfile.
ARG PIP_CONFIG_FILE=/tmp/build-extras/pip.conf

LABEL org.opencontainers.image.title="kfp-grpo MLflow server" \
      org.opencontainers.image.description="MLflow tracking server with PostgreSQL, S3 and basic-auth support for kfp-grpo" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.kfp-grpo.mlflow.version="${MLFLOW_VERSION}"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    HOME=/home/mlflow

COPY constraints.txt /tmp/constraints.txt
RUN --mount=type=bind,source=docker/build-extras,target=/tmp/build-extras \
    pip install -c /tmp/constraints.txt "mlflow[auth]==${MLFLOW_VERSION}" \
        "psycopg2-binary==${PSYCOPG2_VERSION}" \
        "boto3==${BOTO3_VERSION}" \
 && rm /tmp/constraints.txt \
 && useradd --uid 10001 --gid 0 --create-home --home-dir /home/mlflow --shell /usr/sbin/nologin mlflow \
 && chmod -R g=u /home/mlflow
USER 10001
WORKDIR /home/mlflow
EXPOSE 5000

# The chart starts the server through its own script (see helm/kfp-grpo/files/);
# plain `docker run -p 5000:5000 IMAGE` gives a local server for a quick look.
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
