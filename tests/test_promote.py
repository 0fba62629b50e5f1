"""Registry and promotion gate, against a real MLflow store (SQLite + local artifacts in tmp).

The policies are the shared fixtures: `trained_policy` (SFT'd, ~26% held-out accuracy)
and `untrained_policy` (~0%), both evaluated on `trained_test_set`. `promote.run`
re-evaluates the current champion on that same split, so each call costs one or two
greedy evaluations of the tiny model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from components import promote, tracking
from components.promote import gate
from components.artifacts import BUFFER_FILE
from tests.conftest import fast_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def _mlflow_template(tmp_path_factory) -> Path:
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()  # creates the schema (~6 s)
    return path


@pytest.fixture
def mlflow_uri(_mlflow_template, tmp_path) -> str:
    """Like conftest's: a fresh, real SQLite MLflow store in the test's tmp dir, here copied
    from a database whose schema was created once for the module (not once per test)."""
    shutil.copy(_mlflow_template, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def pcfg(mlflow_uri):
    return fast_config(tracking={"tracking_uri": mlflow_uri}, promote={"model_prefix": "t"})


@pytest.fixture
def store_dir(mlflow_uri) -> Path:
    return Path(mlflow_uri[len("sqlite:///"):]).parent


@pytest.fixture(scope="module")
def reward_dir(untrained_policy, tmp_path_factory) -> Path:
    """A real (untrained) tiny reward model directory: scalar head on the policy backbone."""
    from components.modeling import load_reward_model, save_model

    rm, tok = load_reward_model(str(untrained_policy), new_head=True)
    out = tmp_path_factory.mktemp("rm") / "reward_model"
    save_model(rm, tok, out)
    return out


@pytest.fixture(scope="module")
def buffer_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("buffer") / "buffer.parquet"
    pd.DataFrame({"prompt": ["1+2=", "3+4="], "chosen": ["<answer>3</answer>", "<answer>7</answer>"],
                  "rejected": ["<answer>4</answer>", "<answer>8</answer>"]}).to_parquet(path)
    return path


def new_run(cfg) -> str:
    """A run in the config's experiment (artifacts beside the SQLite database)."""
    c = tracking.client(cfg.tracking.tracking_uri)
    return c.create_run(tracking.ensure_experiment(c, cfg.tracking.experiment)).info.run_id


def aliases(cfg, name: str) -> dict[str, str]:
    c = tracking.client(cfg.tracking.tracking_uri)
    return dict(sorted((a, str(c.get_model_version_by_alias(name, a).version))
                       for a in (tracking.CHAMPION, tracking.CHALLENGER)
                       if _has_alias(c, name, a)))


def _has_alias(c, name, alias) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        c.get_model_version_by_alias(name, alias)
        return True
    except MlflowException:
        return False


def version_tags(cfg, name: str, version: str) -> dict[str, str]:
    return tracking.client(cfg.tracking.tracking_uri).get_model_version(name, version).tags


def run_tags(cfg, run_id: str) -> dict[str, str]:
    return tracking.client(cfg.tracking.tracking_uri).get_run(run_id).data.tags


def do_promote(cfg, policy, test, rm=None, buffer=None, accuracy=None, start=None):
    run_id = new_run(cfg)
    decision = promote.run(cfg, str(policy), str(rm) if rm else None, str(test), run_id,
                           str(buffer) if buffer else None, challenger_accuracy=accuracy, start_accuracy=start)
    return run_id, decision


# --------------------------------------------------------------------------- gate
@pytest.mark.parametrize("challenger, champion, margin, promoted", [
    (0.0, None, 0.0, True),     # no starting point given (a model registered by hand): the first version
    (0.0, None, 0.5, True),     # ... becomes champion whatever the margin
    (0.30, 0.20, 0.0, True),    # better
    (0.20, 0.30, 0.0, False),   # worse
    (0.25, 0.25, 0.0, False),   # a tie does not beat the champion
    (0.30, 0.25, 0.10, False),  # better, but not by the margin
    (0.40, 0.25, 0.10, True),   # better by more than the margin
    (1.00, 0.00, 1.0, False),   # a margin of 1.0 can never be beaten
])
def test_gate(challenger, champion, margin, promoted):
    ok, reason = gate(challenger, champion, margin)
    assert ok is promoted
    assert f"{challenger:.4f}" in reason
    if champion is None:
        assert "no champion" in reason
    else:
        assert f"{champion:.4f}" in reason and str(margin) in reason


@pytest.mark.parametrize("challenger, champion, start, margin, promoted", [
    (0.30, None, 0.25, 0.0, True),    # the first version beats the model the run started from
    (0.25, None, 0.25, 0.0, False),   # a first version that only ties its start is not promoted
    (0.20, None, 0.25, 0.0, False),   # ... nor one that is worse than its start
    (0.30, None, 0.25, 0.1, False),   # better than its start, but not by the margin
    (0.40, 0.30, 0.45, 0.0, False),   # beats the champion but not the start (a --from-champion run)
    (0.50, 0.30, 0.45, 0.0, True),    # beats both
])
def test_gate_guards_the_starting_point(challenger, champion, start, margin, promoted):
    ok, reason = gate(challenger, champion, margin, start)
    assert ok is promoted
    assert f"{challenger:.4f}" in reason and f"{start:.4f}" in reason
    if not ok and challenger <= start + margin:
        assert "did not improve" in reason


def test_first_version_that_does_not_beat_its_start_is_not_champion(pcfg, trained_policy, trained_test_set,
                                                                     reward_dir):
    run_id, d = do_promote(pcfg, trained_policy, trained_test_set, reward_dir, start=0.99)  # evaluates itself
    assert d["promoted"] is False and d["start_accuracy"] == 0.99
    assert aliases(pcfg, "t-policy") == {"challenger": "1"}  # registered, but no champion
    assert aliases(pcfg, "t-reward") == {"challenger": "1"}
    tags = version_tags(pcfg, "t-policy", "1")
    assert tags["promotion_decision"] == "rejected" and "did not improve" in tags["promotion_reason"]
    assert run_tags(pcfg, run_id)["promotion_decision"] == "rejected"
    c = tracking.client(pcfg.tracking.tracking_uri)
    assert c.get_run(run_id).data.metrics["promote/start_accuracy"] == 0.99
    # the same model from a worse start becomes the first champion
    _, d = do_promote(pcfg, trained_policy, trained_test_set, reward_dir, start=0.0)
    assert d["promoted"] is True and aliases(pcfg, "t-policy") == {"challenger": "2", "champion": "2"}


# --------------------------------------------------------------------------- promote.run
def test_first_version_becomes_champion(pcfg, store_dir, trained_policy, trained_test_set, reward_dir, buffer_file):
    run_id, d = do_promote(pcfg, trained_policy, trained_test_set, reward_dir, buffer_file)  # evaluates itself
    assert d["promoted"] is True and d["champion_accuracy"] is None and d["champion_version"] is None
    assert 0.1 < d["challenger_accuracy"] < 0.9  # the trained fixture: non-trivial accuracy
    assert (d["policy_version"], d["reward_version"]) == ("1", "1")
    assert aliases(pcfg, "t-policy") == {"challenger": "1", "champion": "1"}
    assert aliases(pcfg, "t-reward") == {"challenger": "1", "champion": "1"}
    tags = version_tags(pcfg, "t-policy", "1")
    assert float(tags["heldout_accuracy"]) == pytest.approx(d["challenger_accuracy"])
    assert tags["config_hash"] == pcfg.hash()
    assert tags["promotion_decision"] == "champion" and "no champion" in tags["promotion_reason"]
    rm_tags = version_tags(pcfg, "t-reward", "1")
    assert rm_tags["policy_version"] == "1" and rm_tags["config_hash"] == pcfg.hash()
    assert run_tags(pcfg, run_id)["promotion_decision"] == "champion"
    c = tracking.client(pcfg.tracking.tracking_uri)
    assert c.get_run(run_id).data.metrics["promote/challenger_accuracy"] == pytest.approx(d["challenger_accuracy"])
    # artifacts live beside the SQLite database in tmp, not in the repository
    for name in ("t-policy", "t-reward"):
        source = c.get_model_version(name, "1").source  # models:/<logged model id>
        location = c.get_logged_model(source.removeprefix("models:/")).artifact_location
        assert location.startswith(store_dir.as_uri() + "/mlartifacts/"), location
        assert not location.startswith(REPO.as_uri())


def test_worse_model_never_becomes_champion(pcfg, trained_policy, untrained_policy, trained_test_set, reward_dir):
    _, first = do_promote(pcfg, trained_policy, trained_test_set, reward_dir)
    run_id, d = do_promote(pcfg, untrained_policy, trained_test_set, reward_dir)  # evaluates both
    assert d["promoted"] is False
    assert d["challenger_accuracy"] < first["challenger_accuracy"]
    # the champion was re-evaluated on the same split: the same greedy accuracy as when it was registered
    assert d["champion_accuracy"] == pytest.approx(first["challenger_accuracy"])
    assert d["champion_version"] == "1" and d["policy_version"] == "2"
    assert aliases(pcfg, "t-policy") == {"challenger": "2", "champion": "1"}
    assert aliases(pcfg, "t-reward") == {"challenger": "2", "champion": "1"}
    assert run_tags(pcfg, run_id)["promotion_decision"] == "rejected"
    assert "does not beat" in run_tags(pcfg, run_id)["promotion_reason"]
    assert version_tags(pcfg, "t-policy", "2")["promotion_decision"] == "rejected"
    metrics = tracking.client(pcfg.tracking.tracking_uri).get_run(run_id).data.metrics
    assert metrics["promote/champion_accuracy"] == pytest.approx(first["challenger_accuracy"])
    # an equally good challenger (the champion itself again) does not take over either
    _, again = do_promote(pcfg, trained_policy, trained_test_set, accuracy=first["challenger_accuracy"])
    assert again["promoted"] is False
    assert aliases(pcfg, "t-policy") == {"challenger": "3", "champion": "1"}


def test_better_model_becomes_champion(pcfg, trained_policy, untrained_policy, trained_test_set, reward_dir):
    _, first = do_promote(pcfg, untrained_policy, trained_test_set, reward_dir)
    assert first["promoted"] is True
    run_id, d = do_promote(pcfg, trained_policy, trained_test_set, reward_dir)
    assert d["promoted"] is True and d["champion_version"] == "1"
    assert d["challenger_accuracy"] > d["champion_accuracy"] == pytest.approx(first["challenger_accuracy"])
    assert aliases(pcfg, "t-policy") == {"challenger": "2", "champion": "2"}
    assert aliases(pcfg, "t-reward") == {"challenger": "2", "champion": "2"}  # the RM moves with its policy
    assert run_tags(pcfg, run_id)["promotion_decision"] == "champion"
    assert "beats" in version_tags(pcfg, "t-policy", "2")["promotion_reason"]


def test_margin_blocks_promotion(mlflow_uri, trained_policy, untrained_policy, trained_test_set):
    cfg = fast_config(tracking={"tracking_uri": mlflow_uri}, promote={"model_prefix": "t", "margin": 1.0})
    do_promote(cfg, untrained_policy, trained_test_set)
    run_id, d = do_promote(cfg, trained_policy, trained_test_set)
    assert d["challenger_accuracy"] > d["champion_accuracy"]  # better, but not by 1.0
    assert d["promoted"] is False and "1.0" in d["reason"]
    assert aliases(cfg, "t-policy") == {"challenger": "2", "champion": "1"}
    assert run_tags(cfg, run_id)["promotion_decision"] == "rejected"


def test_registered_policy_is_a_plain_hf_directory(pcfg, trained_policy, trained_test_set, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    do_promote(pcfg, trained_policy, trained_test_set, accuracy=0.5)  # the accuracy is given: no evaluation
    local = Path(tracking.download_model("models:/t-policy@champion", str(tmp_path / "dl")))
    assert local.is_relative_to(tmp_path)
    assert (local / "model.safetensors").is_file() and (local / "config.json").is_file()
    # plain transformers, no project code
    model = AutoModelForCausalLM.from_pretrained(local)
    tok = AutoTokenizer.from_pretrained(local)
    assert tok.chat_template
    original = AutoModelForCausalLM.from_pretrained(trained_policy)
    for (k, a), (k2, b) in zip(model.state_dict().items(), original.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    # also by version number
    by_version = Path(tracking.download_model("models:/t-policy/1", str(tmp_path / "dl1")))
    assert sorted(p.name for p in by_version.iterdir()) == sorted(p.name for p in local.iterdir())


def test_reward_model_version_carries_the_replay_buffer(pcfg, trained_policy, trained_test_set, reward_dir,
                                                        buffer_file, tmp_path):
    from transformers import AutoModelForSequenceClassification

    before = sorted(p.name for p in reward_dir.iterdir())
    do_promote(pcfg, trained_policy, trained_test_set, reward_dir, buffer_file, accuracy=0.5)
    local = Path(tracking.download_model("models:/t-reward@champion", str(tmp_path / "rm")))
    pd.testing.assert_frame_equal(pd.read_parquet(local / BUFFER_FILE), pd.read_parquet(buffer_file))
    rm = AutoModelForSequenceClassification.from_pretrained(local)  # the buffer does not bother HF loaders
    assert rm.config.num_labels == 1
    assert sorted(p.name for p in reward_dir.iterdir()) == before  # the input directory is left alone
    # without a buffer, the version is the reward model alone
    do_promote(pcfg, trained_policy, trained_test_set, reward_dir, accuracy=0.9)
    plain = Path(tracking.download_model("models:/t-reward/2", str(tmp_path / "rm2")))
    assert not (plain / BUFFER_FILE).exists() and (plain / "model.safetensors").is_file()


def test_promote_cli_by_hand(pcfg, store_dir, trained_policy, trained_test_set, reward_dir, buffer_file, tmp_path,
                             capsys):
    from pipelines.cli import main

    config = tmp_path / "promote.yaml"
    config.write_text(yaml.safe_dump(pcfg.model_dump(mode="json")), encoding="utf-8")
    rc = main(["promote", "--config", str(config), "--policy", str(trained_policy), "--reward-model",
               str(reward_dir), "--buffer", str(buffer_file), "--test", str(trained_test_set)])
    out = capsys.readouterr().out
    assert rc == 0, out
    decision = json.loads(out[out.index("{"):])
    assert decision["promoted"] is True and decision["policy_version"] == "1" and decision["reward_version"] == "1"
    assert aliases(pcfg, "t-policy") == {"challenger": "1", "champion": "1"}
    c = tracking.client(pcfg.tracking.tracking_uri)
    (run,) = c.search_runs([tracking.ensure_experiment(c, pcfg.tracking.experiment)])
    assert run.info.run_name == "manual-promote" and run.info.status == "FINISHED"
    assert run.data.tags["promotion_decision"] == "champion"
    assert run.info.artifact_uri.startswith(store_dir.as_uri())
    # into an existing run, by id
    run_id = new_run(pcfg)
    rc = main(["promote", "--config", str(config), "--policy", str(trained_policy), "--test", str(trained_test_set),
               "--run-id", run_id])
    assert rc == 0
    assert run_tags(pcfg, run_id)["promotion_decision"] == "rejected"  # a tie with the champion
    assert c.get_run(run_id).info.status == "RUNNING"  # someone else's run is left open


def test_promote_cli_reports_bad_input(pcfg, tmp_path, trained_policy, capsys):
    from pipelines.cli import main

    config = tmp_path / "promote.yaml"
    config.write_text(yaml.safe_dump(pcfg.model_dump(mode="json")), encoding="utf-8")
    with pytest.raises(SystemExit) as err:  # --test is required
        main(["promote", "--config", str(config), "--policy", str(trained_policy)])
    assert err.value.code == 2
    rc = main(["promote", "--config", str(config), "--policy", str(trained_policy),
               "--test", str(tmp_path / "missing.parquet")])
    assert rc == 2
    assert "missing.parquet" in capsys.readouterr().err
    # the manual promotion's MLflow run says it failed (it read FINISHED before)
    import mlflow

    c = mlflow.MlflowClient(pcfg.tracking.tracking_uri)
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()], "attributes.run_name = 'manual-promote'")
    assert [r.info.status for r in runs] == ["FAILED"]


# --------------------------------------------------------------------------- MLflow-native models
CHAT = {"messages": [{"role": "user", "content": "What is 37 + 48?"}], "max_tokens": 12}


def test_registered_models_are_mlflow_models_of_the_run(pcfg, trained_policy, trained_test_set, reward_dir,
                                                        buffer_file):
    """The champion loads with `mlflow.pyfunc` and answers a chat prompt (transformers flavor, the
    tokenizer's chat template); the reward model is a pyfunc that scores (prompt, completion)
    rows; both are logged models of the pipeline's run (search_logged_models finds them)."""
    import math

    import mlflow

    run_id, _ = do_promote(pcfg, trained_policy, trained_test_set, reward_dir, buffer_file, accuracy=0.5)
    mlflow.set_tracking_uri(pcfg.tracking.tracking_uri)
    answer = mlflow.pyfunc.load_model("models:/t-policy@champion").predict(CHAT)
    text = answer[0]["choices"][0]["message"]["content"]
    assert text.startswith("<answer>") and text.endswith("</answer>"), text  # the SFT'd fixture's format
    scorer = mlflow.pyfunc.load_model("models:/t-reward@champion")
    scores = scorer.predict(pd.DataFrame({"prompt": ["What is 37 + 48?"] * 2,
                                          "completion": ["<answer>85</answer>", "<answer>75</answer>"]}))
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores)
    c = tracking.client(pcfg.tracking.tracking_uri)
    logged = mlflow.search_logged_models(experiment_ids=[c.get_run(run_id).info.experiment_id],
                                         output_format="list")
    assert sorted(m.name for m in logged) == ["policy", "reward_model"]
    assert {m.source_run_id for m in logged} == {run_id}
    assert c.get_model_version("t-policy", "1").source in {m.model_uri for m in logged}


def test_mlflow_models_serve_answers_a_prompt(pcfg, trained_policy, trained_test_set, tmp_path):
    """`mlflow models serve -m models:/t-policy@champion` on 127.0.0.1: POST a chat prompt, get a completion."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    do_promote(pcfg, trained_policy, trained_test_set, accuracy=0.5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": pcfg.tracking.tracking_uri}
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/t-policy@champion",
                               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(1)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(CHAT).encode(),
                                         headers={"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(request, timeout=60).read())
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()
    choices = reply[0]["choices"] if isinstance(reply, list) else reply["choices"]
    assert choices[0]["message"]["content"].startswith("<answer>"), reply


def test_a_run_from_the_champion_starts_from_its_weights_and_replay_history(pcfg, trained_policy, trained_test_set,
                                                                            reward_dir, buffer_file, tmp_path):
    """What `--from-champion` and `schedule` do: the sft and reward-model tasks resolve
    `models:/<prefix>-policy@champion` / `-reward@champion` instead of training."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.client import champion_uris
    from pipelines.warm_start import reward_model_task, sft_task

    config = pcfg.to_json()
    uris = champion_uris(pcfg)
    assert sft_task("sft", config, "", "", None, uris["init_policy_uri"], train=str(trained_test_set),
                    model=str(tmp_path / "none")) is not None  # no champion yet: SFT trains from scratch
    do_promote(pcfg, trained_policy, trained_test_set, reward_dir, buffer_file, accuracy=0.5)
    assert sft_task("sft", config, "", "", None, uris["init_policy_uri"], train=str(trained_test_set),
                    model=str(tmp_path / "policy")) == {}
    start, original = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (tmp_path / "policy",
                                                                                      trained_policy))
    assert all(torch.equal(start[k], original[k]) for k in original)
    assert reward_model_task("reward-model", config, "", "", None, uris["init_reward_uri"], str(trained_test_set),
                             str(tmp_path / "policy"), str(tmp_path / "rm"), str(tmp_path / "history")) == {}
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "history"), pd.read_parquet(buffer_file))
