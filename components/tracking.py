"""MLflow tracking for stages: log only when an MLflow run is active.

Stages call `log_metrics`/`log_params`; with no active run (a test, a shell call
without tracking) these do nothing, so a stage never needs MLflow to work.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import mlflow


def active() -> bool:
    return mlflow.active_run() is not None


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log the finite numeric values of `metrics` at `step` to the active run."""
    if not active():
        return
    clean = {k: float(v) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_params(params: Mapping[str, Any]) -> None:
    """Log params (values stringified, truncated by MLflow's limit) to the active run."""
    if active():
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})


# --------------------------------------------------------------------------- runs
def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI: the given one, else $MLFLOW_TRACKING_URI; an error if neither."""
    import os

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ValueError("no MLflow tracking URI: set tracking.tracking_uri in the config or $MLFLOW_TRACKING_URI")
    return uri


def client(uri: str | None = None) -> "mlflow.MlflowClient":
    """An MlflowClient for `uri` (also made the process default); a server that does not
    answer fails fast here (TrackingUnavailable naming the URI), not after minutes of retries."""
    uri = resolve_tracking_uri(uri)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(uri)


class TrackingUnavailable(ConnectionError, ValueError):
    """The MLflow tracking server does not answer; the message names the URI (never its credentials)."""


_REACHABLE: set[str] = set()


def redact(uri: str) -> str:
    """`uri` without user:password@ (safe to print)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if "://" not in uri or not (parts.username or parts.password):
        return uri
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")))


def check_reachable(uri: str) -> None:
    """One short probe of an http(s) tracking server's /health (once per process and URI).

    MLflow's own client retries a dead server for minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    default 7, exponential backoff): right for a blip in the middle of a run, wrong at the
    start, where the user should learn at once that the URI is wrong or the server is down.
    Any HTTP answer (even 401/404) counts as reachable; only no answer fails. Tunables:
    KFP_GRPO_TRACKING_PROBE_TIMEOUT (s, default 5), KFP_GRPO_TRACKING_PROBE_ATTEMPTS (default 3).
    """
    import os
    import time

    if not uri.startswith(("http://", "https://")) or uri in _REACHABLE:
        return
    import requests

    timeout = float(os.environ.get("KFP_GRPO_TRACKING_PROBE_TIMEOUT", "5"))
    attempts = max(1, int(os.environ.get("KFP_GRPO_TRACKING_PROBE_ATTEMPTS", "3")))
    verify: bool | str = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        verify = False
    why = ""
    for attempt in range(attempts):
        try:
            requests.get(uri.rstrip("/") + "/health", timeout=timeout, verify=verify, allow_redirects=False)
            _REACHABLE.add(uri)
            return
        except requests.exceptions.Timeout:
            why = f"no answer within {timeout:g}s"
        except requests.exceptions.SSLError:
            why = "TLS handshake failed"
        except requests.exceptions.RequestException:
            why = "connection refused or host unreachable"
        if attempt + 1 < attempts:
            time.sleep(0.5 * 2 ** attempt)
    raise TrackingUnavailable(f"MLflow tracking server {redact(uri)} is unreachable ({why}, {attempts} attempts); "
                              "check tracking.tracking_uri / $MLFLOW_TRACKING_URI and that the server is up")


# --------------------------------------------------------------------------- registry
CHAMPION, CHALLENGER = "champion", "challenger"
ACCURACY_TAG = "heldout_accuracy"


def register_dir(c: "mlflow.MlflowClient", name: str, local_dir: str, run_id: str, artifact_path: str,
                 tags: Mapping[str, Any]) -> str:
    """Log a HF directory to `run_id` and register it as a new version of `name`; returns the version.

    The version's source is the run's artifact folder (a standard HF directory).
    """
    from mlflow.exceptions import MlflowException

    c.log_artifacts(run_id, local_dir, artifact_path)
    try:
        c.create_registered_model(name)
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    source = f"{c.get_run(run_id).info.artifact_uri}/{artifact_path}"
    mv = c.create_model_version(name, source=source, run_id=run_id,
                                tags={k: str(v) for k, v in tags.items()})
    return str(mv.version)  # MLflow's store returns an int; versions are strings in its API and URIs


def champion(c: "mlflow.MlflowClient", name: str):
    """The model version holding alias `champion`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def download_model(uri: str, dst: str) -> str:
    """Download `models:/name@alias`, `models:/name/N`, `runs:/…` or any artifact URI into `dst`."""
    import mlflow.artifacts

    if uri.startswith("models:/"):
        c = mlflow.MlflowClient()
        name, _, ref = uri[len("models:/"):].partition("@")
        mv = c.get_model_version_by_alias(name, ref) if ref else c.get_model_version(*name.split("/", 1))
        uri = mv.source
    return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst)


def ensure_experiment(c: "mlflow.MlflowClient", name: str) -> str:
    """The id of experiment `name`, created if missing.

    With a SQLite store, artifacts go to `mlartifacts/` beside the database file
    (not into the current directory).
    """
    from pathlib import Path

    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    uri = c.tracking_uri
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return c.create_experiment(name, artifact_location=location)
