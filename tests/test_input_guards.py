"""Guards that fail a run in its first second: seeds, the config/--set parser (fuzzed), credentials.

- Per-step seeds are derived safely for every valid `seed`, and unchanged for the seeds that
  worked before (the published numbers depend on today's random draws).
- The config file and `--set` parser raise only ConfigError, whatever text they get (Hypothesis).
- One scrubber: a secret planted in the config, the environment, a CLI flag or a URI is refused
  where it would be stored, and never printed.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from components.config import (RUN_TIME_KEYS, Config, ConfigError, load_config, parse_config, parse_set,
                               with_run_time_settings)
from components.redaction import credentials_in, register_secret, scrub
from components.seeds import TORCH_BITS, derived_seed
from pipelines import cli
from tests.conftest import fast_config


# =========================================================================== seeds
def test_derived_seeds_are_unchanged_where_they_fit_and_reduced_where_they_overflow():
    for v in (0, 1, 100_003 * 7 + 5, 2**32 - 1):
        assert derived_seed(v) == v
    assert derived_seed(2**32) == 0 and derived_seed(20261121 * 100_003 + 4) < 2**32
    assert derived_seed(2**63 * 100_003, TORCH_BITS) < 2**63
    assert derived_seed(12345, TORCH_BITS) == 12345


def test_prompt_batches_of_seeds_that_worked_before_are_the_same_draws(data_dir):
    from components.rollout import select_prompts

    prompts = pd.read_parquet(data_dir / "train.parquet")
    for seed, step in ((0, 0), (0, 3), (7, 2), (42, 11)):  # today's rule: random_state = seed * 100_003 + step
        expect = prompts.sample(n=8, random_state=seed * 100_003 + step)
        assert select_prompts(prompts, 8, seed, step).equals(expect)


@pytest.mark.parametrize("seed", [20261121, 2**63 - 1])
def test_a_large_valid_seed_runs_the_rollout(seed, data_dir, untrained_policy, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**fast_config().model_dump(mode="json"), "seed": seed,
                                      "rollout": {"group_size": 2, "prompts_per_step": 2, "max_new_tokens": 3}}))
    code = cli.main(["stage", "rollout", "--config", str(config), "--prompts", str(data_dir / "train.parquet"),
                     "--policy", str(untrained_policy), "--rollouts", str(tmp_path / "r.parquet"), "--step", "7"])
    assert code == 0, capsys.readouterr().err
    assert len(pd.read_parquet(tmp_path / "r.parquet")) == 4


@pytest.mark.parametrize("seed", [-1, 2**63])
def test_a_seed_outside_int64_range_is_a_config_error(seed):
    with pytest.raises(ConfigError, match="config: seed: Input should be"):
        parse_config({"seed": seed})


# =========================================================================== the parser, fuzzed
KEYS = ["seed", "grpo", "grpo.beta", "grpo.lr", "rollout.group_size", "data.source", "data.path", "loop",
        "cluster.stages.sft.shm_size", "cluster.stages.sft", "tracking.tracking_uri", "a..b", "", ".", "grpo.",
        "x.y.z", "sft.lr.x"]
VALUES = st.one_of(st.text(max_size=30), st.sampled_from(["[1", "{a: 1, a: 2}", "1e400", ".nan", "-.inf", "~",
                                                          "!!python/object:os.system x", "2**70", "0x10", "'", ":",
                                                          "{beta: 0.1}", "[]", "2026-01-01", "yes", "- a"]))
SETS = st.lists(st.builds(lambda k, sep, v: f"{k}{sep}{v}", st.one_of(st.sampled_from(KEYS), st.text(max_size=12)),
                          st.sampled_from(["=", "", "=="]), VALUES), max_size=5)
YAML_TEXT = st.one_of(
    st.text(max_size=200),
    st.lists(st.builds(lambda k, v: f"{k}: {v}", st.sampled_from(["seed", "grpo", "rollout", "data", "  beta",
                                                                  "  group_size", "grpo", "- x", "? a"]), VALUES),
             max_size=6).map("\n".join),
    st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
                 lambda inner: st.one_of(st.lists(inner, max_size=3),
                                         st.dictionaries(st.sampled_from(["seed", "grpo", "beta", "lr", "rollout",
                                                                          "group_size", "x"]), inner, max_size=3)),
                 max_leaves=10).map(lambda d: yaml.safe_dump(d)),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=YAML_TEXT, sets=SETS)
def test_config_file_and_set_parser_raise_only_config_errors(text, sets, tmp_path):
    """Whatever the file and the --set options hold: a Config, or ConfigError with one message."""
    f = tmp_path / "fuzz.yaml"
    f.write_text(text, encoding="utf-8", errors="surrogatepass") if _encodable(text) else f.write_bytes(b"\xff")
    try:
        cfg = load_config(f, parse_set(sets))
    except ConfigError as err:
        assert str(err).strip(), "an empty error message"
        return
    assert isinstance(cfg, Config)


@settings(max_examples=200, deadline=None)
@given(settings_=st.dictionaries(st.sampled_from([k.replace(".", "_") for k in RUN_TIME_KEYS] + ["bogus"]),
                                 st.one_of(VALUES, st.integers(), st.floats(), st.booleans()), max_size=4))
def test_run_time_settings_raise_only_config_errors(settings_):
    """What a KFP run parameter can hold (any text): a Config, or ConfigError naming the key."""
    base = fast_config()
    try:
        with_run_time_settings(base, settings_)
    except ConfigError as err:
        assert str(err).startswith("run-time settings")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@pytest.mark.parametrize("sets, words", [
    (["grpo=1", "grpo.beta=0.1"], "conflicts with --set grpo=..."),
    (["grpo.beta=0.1", "grpo.beta=0.2"], "given twice"),
    (["grpo.beta=[1"], "--set grpo.beta: the value '[1' is not valid YAML"),
    (["grpo..beta=1"], "'' is not a key name"),
    (["grpo.beta"], "--set expects key=value"),
])
def test_set_values_that_do_not_parse_or_conflict(sets, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace(".", r"\.")):
        parse_set(sets)


def test_a_duplicated_yaml_key_is_an_error_naming_the_key_and_lines(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("grpo:\n  beta: 0.1\nseed: 3\ngrpo:\n  lr: 1e-4\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'grpo' \(first on line 1\).*line 4"):
        load_config(f)


# =========================================================================== credentials
SECRET = "s3cr3t-Planted-7f9a"


@pytest.mark.parametrize("text", [
    f"http://user:{SECRET}@mlflow:5000", f"https://h/x.jsonl?token={SECRET}", f"s3://b/k?X-Amz-Signature={SECRET}",
    f"postgresql://kfp:{SECRET}@db/mlflow", f"error at https://u:{SECRET}@h:5000/api: refused",
])
def test_scrub_removes_every_planted_secret_and_credentials_in_names_it(text):
    assert SECRET not in scrub(text) and "***" in scrub(text)
    assert credentials_in(text.split()[-2] if text.startswith("error") else text)


def test_scrub_removes_secret_env_values_and_registered_tokens(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    assert scrub(f"boto said: bad key {SECRET}") == "boto said: bad key ***"
    register_secret("tok-" + SECRET[::-1])
    assert scrub("Bearer tok-" + SECRET[::-1]) == "Bearer ***"


@pytest.mark.parametrize("key, value", [
    ("tracking.tracking_uri", f"http://u:{SECRET}@mlflow:5000"),
    ("data.path", f"https://host/train.jsonl?token={SECRET}"),
    ("model.policy", f"https://u:{SECRET}@hub/model"),
    ("cluster.images.gpu", f"https://u:{SECRET}@registry/img"),
])
def test_a_credential_anywhere_in_the_config_is_refused_without_printing_it(key, value, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("seed: 0\n")
    extra = ["--set", "data.source=hf"] if key == "data.path" else []
    code = cli.main(["compile", "--config", str(config), "--set", f"{key}={value}", *extra,
                     "-o", str(tmp_path / "p.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and "must not contain a password or token" in err and SECRET not in err, err
    assert not (tmp_path / "p.yaml").exists()


@pytest.mark.parametrize(("command", "flag"), [("submit", "--tracking-uri"), ("submit", "--init-policy-uri"),
                                               ("submit", "--init-reward-uri"),
                                               ("schedule", "--tracking-uri")])  # schedule has no --init-* options
def test_submit_and_schedule_refuse_a_credential_in_a_run_parameter_before_any_request(command, flag, capsys):
    # a closed port: were anything sent, the error would be "cannot reach the KFP API"
    code = cli.main([command, "--host", "http://127.0.0.1:9", flag, f"http://u:{SECRET}@mlflow:5000"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"error: {flag} contains a password") and SECRET not in err


def test_kfp_errors_never_print_the_token_or_a_host_password(capsys):
    code = cli.main(["submit", "--host", f"http://admin:{SECRET}@127.0.0.1:9", "--token", "tok-" + SECRET])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: cannot reach the KFP API") and SECRET not in err, err


def test_local_run_refuses_a_password_in_the_environment_tracking_uri(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://u:{SECRET}@127.0.0.1:9")
    code = cli.main(["run", "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2 and "$MLFLOW_TRACKING_URI contains a password" in err and SECRET not in err, err
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())


def test_logged_params_are_scrubbed(mlflow_uri, monkeypatch):
    import mlflow

    from components import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    mlflow.set_tracking_uri(mlflow_uri)
    with mlflow.start_run() as run:
        tracking.log_params({"note": f"password={SECRET} uri=http://u:{SECRET}@h"})
    params = mlflow.MlflowClient(mlflow_uri).get_run(run.info.run_id).data.params
    assert SECRET not in json.dumps(params) and params["note"].startswith("password=***")


# =========================================================================== registered models
def test_a_misspelt_model_uri_is_an_error_but_a_missing_champion_means_from_scratch(mlflow_uri, tmp_path):
    """Only this config's own champion URIs may be absent (the first run has no champion yet); a
    misspelt alias or name used to be taken for "no champion yet" and retrained from scratch."""
    from pipelines.client import champion_uris
    from pipelines.warm_start import _champions, resolve_model, sft_task

    cfg = fast_config(tracking={"tracking_uri": mlflow_uri})
    champions = tuple(champion_uris(cfg).values())
    assert _champions(cfg) == champions  # what `--from-champion` passes is what may be absent
    assert resolve_model(champions[0], str(tmp_path / "p"), "", mlflow_uri, champions) is False
    with pytest.raises(ValueError, match=r"cannot resolve models:/kfp-grpo-policy@champoin: .*check the model name"):
        sft_task("sft", cfg.to_json(), "", "", None, "models:/kfp-grpo-policy@champoin",
                 train=str(tmp_path / "train.parquet"), model=str(tmp_path / "model"))
    assert not (tmp_path / "p").exists() and not (tmp_path / "model").exists()


def test_task_logs_and_the_verbose_terminal_are_scrubbed(tmp_path, monkeypatch):
    """What a task prints (kfp.local streams it through `TaskLog`) reaches its log file and the terminal
    without a credential."""
    import io

    from pipelines.progress import TaskLog

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    terminal = io.StringIO()
    sink = TaskLog({"sft": ("sft", "sft", 1)}, tmp_path / "logs", terminal, verbose=True)
    sink.write("Executing task 'sft'\n")
    sink.write(f"[sft] connecting to http://admin:{SECRET}@mlflow:5000 with password {SECRET}\n")
    sink.write("Task 'sft' finished with status SUCCESS\n")
    sink.close_logs()
    logs = "".join(p.read_text() for p in (tmp_path / "logs").rglob("*.log"))
    assert "connecting to http://admin:***@mlflow:5000" in logs
    assert SECRET not in logs and SECRET not in terminal.getvalue()
