"""MLflow tracking for stages: log only when an MLflow run is active.

Stages call `log_metrics`/`log_params`; with no active run (a test, a shell call
without tracking) these do nothing, so a stage never needs MLflow to work.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

import mlflow

from components.config import check_tracking_scheme as check_scheme
from components.redaction import scrub

if TYPE_CHECKING:
    import pandas as pd

    from components.config import Config


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
        mlflow.log_params({k: scrub(str(v))[:6000] for k, v in params.items()})


def log_samples(table: "pd.DataFrame", artifact_file: str) -> None:
    """Log a table of sample completions to the active run (MLflow shows it under Artifacts and in
    the run's Evaluation view; `mlflow.load_table` reads it back)."""
    if active():
        mlflow.log_table(data=table, artifact_file=artifact_file)


def log_dataset(df: "pd.DataFrame", name: str, source: str, context: str) -> None:
    """Record `df` (written to `source`) as an input data set of the active run (`context`: training,
    evaluation): its name, digest, schema and row count appear on the run's page."""
    if active():
        import warnings

        import mlflow.data

        with warnings.catch_warnings():  # a local path matches two equivalent source types; either will do
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = mlflow.data.from_pandas(df, source=source, name=name)
        mlflow.log_input(dataset, context=context)


# --------------------------------------------------------------------------- runs
def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI: the given one, else $MLFLOW_TRACKING_URI; an error if neither."""
    import os

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ValueError("no MLflow tracking URI: set tracking.tracking_uri in the config or $MLFLOW_TRACKING_URI")
    check_scheme(uri)
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
    """`uri` without user:password@ nor any other credential (safe to print)."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(uri)
        if "://" not in uri or not (parts.username or parts.password):
            return scrub(uri)
        host = parts.hostname or ""
        return scrub(urlunsplit(parts._replace(netloc=host + (f":{parts.port}" if parts.port else ""))))
    except ValueError:  # an unreadable port: no structure to rely on
        return scrub(uri)


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


def champion_uris(cfg: "Config") -> dict[str, str]:
    """The pipeline arguments that start a run from this config's registered champions
    (`--from-champion`, scheduled runs); a run may pass them before any champion exists."""
    prefix = cfg.promote.model_prefix
    return {"init_policy_uri": f"models:/{prefix}-policy@{CHAMPION}",
            "init_reward_uri": f"models:/{prefix}-reward@{CHAMPION}"}


ACCURACY_TAG = "heldout_accuracy"


def _pinned(*packages: str) -> list[str]:
    """`package==version` of what is installed here (what a logged model needs to load)."""
    from importlib.metadata import version

    return [f"{p}=={version(p).split('+')[0]}" for p in packages]


def _log_model(run_id: str, flavor: Any, name: str, **kwargs: Any) -> "mlflow.models.model.ModelInfo":
    """Log a model of `flavor` to run `run_id` (a logged model in the run's experiment; no run is
    started or ended, and the process's active experiment is left as it was)."""
    from mlflow.models import Model
    from mlflow.tracking import fluent

    previous = fluent._active_experiment_id  # MLflow logs the model into the active experiment
    mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(run_id).info.experiment_id)
    try:
        return Model.log(artifact_path=None, name=name, flavor=flavor, run_id=run_id, **kwargs)
    finally:
        fluent._active_experiment_id = previous


def log_policy(run_id: str, policy_dir: str, name: str = "policy") -> "mlflow.models.model.ModelInfo":
    """Log a policy directory to run `run_id` as an MLflow transformers model (chat task, the
    tokenizer's chat template kept): `mlflow.pyfunc.load_model(...).predict({"messages": [...]})`
    answers, and `mlflow models serve` serves it."""
    from components.modeling import load_policy

    model, tok = load_policy(policy_dir)
    return _log_model(run_id, mlflow.transformers, name, transformers_model={"model": model, "tokenizer": tok},
                      task="llm/v1/chat", pip_requirements=_pinned("torch", "transformers", "accelerate"))


REWARD_MODEL_ARTIFACT, BUFFER_ARTIFACT = "reward_model", "replay_buffer"


def log_reward_model(run_id: str, rm_dir: str, buffer: str | None = None, name: str = "reward_model",
                     system_prompt: str | None = None, max_length: int = 512) -> "mlflow.models.model.ModelInfo":
    """Log a reward-model directory to run `run_id` as a scalar-scoring pyfunc
    (`components/reward_pyfunc.py`: a table of prompt, completion → one score per row), with the
    replay history `buffer` beside it (the next run carries it forward)."""
    from pathlib import Path

    import pandas as pd
    from mlflow.models import infer_signature

    example = pd.DataFrame({"prompt": ["What is 37 + 48?"], "completion": ["<answer>85</answer>"]})
    artifacts = {REWARD_MODEL_ARTIFACT: rm_dir, **({BUFFER_ARTIFACT: buffer} if buffer else {})}
    return _log_model(run_id, mlflow.pyfunc, name, python_model=str(Path(__file__).with_name("reward_pyfunc.py")),
                      artifacts=artifacts, model_config={"system_prompt": system_prompt, "max_length": max_length},
                      code_paths=[str(Path(__file__).parent)], signature=infer_signature(example, [0.0]),
                      pip_requirements=_pinned("torch", "transformers", "pandas"))


def register(c: "mlflow.MlflowClient", name: str, info: "mlflow.models.model.ModelInfo", run_id: str,
             tags: Mapping[str, Any]) -> str:
    """Register logged model `info` as a new version of `name`; returns the version."""
    from mlflow.exceptions import MlflowException

    try:
        c.create_registered_model(name)
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    mv = c.create_model_version(name, source=info.model_uri, run_id=run_id, model_id=info.model_id,
                                tags={k: str(v) for k, v in tags.items()})
    return str(mv.version)  # MLflow's store returns an int; versions are strings in its API and URIs


def champion(c: "mlflow.MlflowClient", name: str):
    """The model version holding alias `champion`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def resolve_version(c: "mlflow.MlflowClient", uri: str):
    """The registry version `models:/name@alias` or `models:/name/N` names (MlflowException if none)."""
    name, _, alias = uri[len("models:/"):].partition("@")
    return c.get_model_version_by_alias(name, alias) if alias else c.get_model_version(*name.split("/", 1))


def download_model(uri: str, dst: str) -> str:
    """A registered or logged model as a standard HF directory under `dst` (no MLflow layout).

    `uri`: `models:/name@alias`, `models:/name/N` or a logged model's `models:/m-…`. A policy
    (transformers flavor) is written as a model + tokenizer directory; a reward model
    (`components/reward_pyfunc.py`) as its HF directory with the replay history beside the
    weights (`BUFFER_FILE`). Returns the directory.
    """
    import shutil
    from pathlib import Path

    import mlflow.artifacts

    from components.artifacts import BUFFER_FILE

    if uri.startswith("models:/") and not uri.startswith("models:/m-"):
        uri = resolve_version(mlflow.MlflowClient(), uri).source
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(Path(dst) / "mlflow")))
    out = Path(dst) / "model"
    flavors = mlflow.models.Model.load(str(local / "MLmodel")).flavors
    artifacts = {k: local / v["path"] for k, v in flavors.get("python_function", {}).get("artifacts", {}).items()}
    if REWARD_MODEL_ARTIFACT in artifacts:
        shutil.copytree(artifacts[REWARD_MODEL_ARTIFACT], out)
        if BUFFER_ARTIFACT in artifacts:
            shutil.copy(artifacts[BUFFER_ARTIFACT], out / BUFFER_FILE)  # (components.artifacts)
    else:
        from components.modeling import save_model

        parts = mlflow.transformers.load_model(str(local), return_type="components")
        save_model(parts["model"], parts["tokenizer"], out)
    return str(out)


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
