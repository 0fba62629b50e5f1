"""Setup Job of the kfp-grpo chart (a Helm post-install/post-upgrade hook).

Idempotent; every step is skipped when its inputs are absent:
1. KFP_GRPO_CREATE_BUCKET=true: create the artifact bucket on the bundled
   S3-compatible store (MLFLOW_S3_ENDPOINT_URL, AWS_* keys, KFP_GRPO_BUCKET).
2. Wait until the MLflow server answers /health (MLFLOW_TRACKING_URI).
3. KFP_GRPO_PIPELINE_USERNAME set: log in as the MLflow admin
   (MLFLOW_TRACKING_USERNAME/PASSWORD) and create the non-admin user pipeline pods
   log in as, or reset its password to the one in the pipeline Secret.
4. As that user, create the experiment MLFLOW_EXPERIMENT_NAME if it does not exist,
   so the pipeline user owns it (MANAGE permission).
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request

TIMEOUT_S = float(os.environ.get("KFP_GRPO_SETUP_TIMEOUT_S", "600"))


def log(msg: str) -> None:
    print(f"[kfp-grpo setup] {msg}", flush=True)


class Fatal(Exception):
    """An error that retrying cannot fix."""


def is_auth_error(exc: Exception) -> bool:
    text = str(exc)
    return "error code 401" in text or "error code 403" in text


def retry(what: str, fn, timeout_s: float = TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    delay = 2.0
    while True:
        try:
            return fn()
        except Fatal:
            raise
        except Exception as exc:  # noqa: BLE001 - report and retry anything until the deadline
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: gave up after {timeout_s:.0f}s: {exc}") from exc
            log(f"{what}: not yet ({type(exc).__name__}: {exc}); retrying in {delay:.0f}s")
            time.sleep(delay)
            delay = min(delay * 1.5, 15.0)


def create_bucket() -> None:
    import boto3
    from botocore.exceptions import ClientError

    bucket = os.environ["KFP_GRPO_BUCKET"]
    s3 = boto3.client(
        "s3",
        endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"],
        region_name=os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
    )

    def ensure() -> None:
        try:
            s3.head_bucket(Bucket=bucket)
            log(f"bucket {bucket!r} exists")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise
            s3.create_bucket(Bucket=bucket)
            log(f"created bucket {bucket!r}")

    retry("create bucket", ensure)


def wait_for_mlflow(uri: str) -> None:
    def health() -> None:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}")

    retry(f"MLflow at {uri}", health)
    log(f"MLflow at {uri} is up")


def ensure_pipeline_user(uri: str, username: str, password: str) -> None:
    from mlflow.exceptions import RestException
    from mlflow.server.auth.client import AuthServiceClient

    client = AuthServiceClient(uri)  # authenticates as the admin (MLFLOW_TRACKING_* env)
    try:
        try:
            client.create_user(username, password)
            log(f"created MLflow user {username!r}")
        except RestException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            client.update_user_password(username, password)
            log(f"MLflow user {username!r} exists; password synced with the pipeline Secret")
    except Exception as exc:
        if is_auth_error(exc):
            raise Fatal(
                "the MLflow admin login was refused. The server creates the admin user once, "
                "with the admin-password of the auth Secret at its first start; if that Secret "
                "was replaced since, put the old password back or change the admin's password "
                "with the update-password API."
            ) from exc
        raise


def ensure_experiment(uri: str, name: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name)
        log(f"created experiment {name!r}")
    else:
        log(f"experiment {name!r} exists")


def main() -> int:
    try:
        return run()
    except Fatal as exc:
        log(f"error: {exc}")
        return 1


def run() -> int:
    if os.environ.get("KFP_GRPO_CREATE_BUCKET") == "true":
        create_bucket()
    uri = os.environ["MLFLOW_TRACKING_URI"]
    wait_for_mlflow(uri)
    username = os.environ.get("KFP_GRPO_PIPELINE_USERNAME", "")
    password = os.environ.get("KFP_GRPO_PIPELINE_PASSWORD", "")
    if username:
        if not password:
            log("the pipeline Secret has no MLFLOW_TRACKING_PASSWORD")
            return 1
        retry("create pipeline user", lambda: ensure_pipeline_user(uri, username, password))
        # From here on, act as the pipeline user.
        os.environ["MLFLOW_TRACKING_USERNAME"] = username
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "")
    if experiment:
        retry("create experiment", lambda: ensure_experiment(uri, experiment))
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
