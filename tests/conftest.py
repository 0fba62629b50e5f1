"""Shared fixtures: small configs, a trained tiny policy (built once per session), MLflow stores."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from components.config import Config, parse_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(1)  # the tiny model is fastest on one thread; also keeps CI predictable

FAST = {
    "seed": 0,
    "data": {"num_train": 400, "num_test": 60},
    "sft": {"steps": 30, "batch_size": 16},
    "reward_model": {"steps": 10, "batch_size": 16},
    "rollout": {"group_size": 4, "prompts_per_step": 8, "max_new_tokens": 12},
    "grpo": {"minibatch_size": 16, "lr": 1e-4},
    "replay": {"steps": 5, "batch_size": 16},
    "loop": {"iterations": 1, "steps_per_iteration": 1},
}


def send_json(handler, status: int, payload) -> None:
    """Answer an `http.server` request with `payload` as JSON (the fake KFP and Kubernetes APIs)."""
    data = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a `kfp-grpo` / stage subprocess in a test: this checkout first on the path,
    offline, quiet, no tracking URI inherited from the test process; `extra` on top."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": str(root)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


def fast_config(**overrides) -> Config:
    """A small valid config: every stage runs in seconds (learning is not the point)."""
    from components.config import _deep_merge

    return parse_config(_deep_merge(FAST, overrides))


@pytest.fixture
def cfg() -> Config:
    return fast_config()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """train.parquet / test.parquet of the fast config's arithmetic task."""
    from components import prepare_data

    d = tmp_path_factory.mktemp("data")
    prepare_data.run(fast_config(), str(d / "train.parquet"), str(d / "test.parquet"))
    return d


@pytest.fixture(scope="session")
def trained_policy(tmp_path_factory) -> Path:
    """A tiny policy SFT-trained to non-trivial accuracy on addition (≈45 s, once per session)."""
    from components import prepare_data, sft

    d = tmp_path_factory.mktemp("trained")
    c = parse_config({"sft": {"steps": 500, "lr": 1e-3}})
    prepare_data.run(c, str(d / "train.parquet"), str(d / "test.parquet"))
    sft.run(c, str(d / "train.parquet"), str(d / "policy"))
    return d / "policy"


@pytest.fixture(scope="session")
def trained_test_set(trained_policy) -> Path:
    """The held-out split that `trained_policy` never saw."""
    return trained_policy.parent / "test.parquet"


@pytest.fixture(scope="session")
def untrained_policy(tmp_path_factory) -> Path:
    """A freshly initialised tiny policy (accuracy ≈ 0)."""
    from components.modeling import build_tiny_model, build_tiny_tokenizer, save_model
    from components.config import TinyModelConfig

    d = tmp_path_factory.mktemp("untrained") / "policy"
    tok = build_tiny_tokenizer()
    save_model(build_tiny_model(TinyModelConfig(), tok, seed=1), tok, d)
    return d


@pytest.fixture
def mlflow_uri(tmp_path) -> str:
    """A real MLflow SQLite store in a temp dir (schema created once, before any worker)."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(uri).search_experiments()
    return uri


@pytest.fixture(autouse=True)
def _isolated_tracking_uri(monkeypatch):
    """Every test starts without $MLFLOW_TRACKING_URI and leaves none behind: the task wrapper and
    `tracking.client` set it (and MLflow's process-wide URI) for the rest of a task's process."""
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils

    from components import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # `mlflow.set_experiment` sets it
    monkeypatch.setattr(utils, "_tracking_uri", None)
    monkeypatch.setattr(fluent, "_active_experiment_id", None)
    monkeypatch.setattr(tracking, "_REACHABLE", set())  # the once-per-process reachability probe
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


# --------------------------------------------------------------------------- GPU-scale fixtures
@pytest.fixture(scope="session")
def scale_work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scale")


@pytest.fixture(scope="session")
def scale_rollouts(scale_work, data_dir, untrained_policy) -> dict[float, Path]:
    """One round of rollouts of the untrained tiny policy at temperature 1.0 and at 0.7."""
    from components import rollout
    from tests.scale import synthetic_advantages

    out = {}
    for tau in (1.0, 0.7):
        path = scale_work / f"rollouts-{tau}.parquet"
        rollout.run(fast_config(rollout={"temperature": tau}), str(data_dir / "train.parquet"),
                    str(untrained_policy), None, str(path))
        synthetic_advantages(path)
        out[tau] = path
    return out


@pytest.fixture(scope="session")
def round1(scale_work, scale_rollouts, untrained_policy) -> Path:
    """A single-process update: a policy directory with optimizer state, as a later round sees it."""
    from components import grpo_update
    from tests.scale import update_cfg

    out = scale_work / "round1"
    grpo_update.run(update_cfg(), [str(scale_rollouts[1.0])], str(untrained_policy), None, str(out))
    return out


# --------------------------------------------------------------------------- the default, end to end
@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """`kfp-grpo run --workdir <tmp> --output json` on the embedded default, once per session (the
    learning test and the local-pipeline tests read the same run): (workdir, summary); the terminal
    output is in <workdir>/stdout.txt."""
    import contextlib
    import io

    from pipelines import cli

    workdir = tmp_path_factory.mktemp("run")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli.main(["run", "--workdir", str(workdir), "--output", "json"])
    text = buf.getvalue()
    assert code == 0, text[-3000:]
    (workdir / "stdout.txt").write_text(text)
    summary = json.loads(text[text.rindex("\n{") + 1:] if "\n{" in text else text[text.index("{"):])
    (workdir / "summary.json").write_text(json.dumps(summary))
    return workdir, summary
