"""The config schema: defaults, shipped configs, key-path errors, loading, overrides, hashing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.config import (
    Config,
    ConfigError,
    config_from_json,
    default_config_path,
    load_config,
    parse_config,
    set_dotted,
)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "pipelines" / "configs").glob("*.yaml"))


def errors_of(data) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


# --------------------------------------------------------------------------- valid configs
def test_defaults_validate_and_match_the_design():
    cfg = Config()
    assert parse_config({}) == cfg
    assert parse_config(None) == cfg
    # the design's defaults: ε = 0.2 both sides, β = 0.04, μ = 1, G = 8, lr 1e-6
    assert (cfg.grpo.eps_low, cfg.grpo.eps_high, cfg.grpo.beta, cfg.grpo.epochs) == (0.2, 0.2, 0.04, 1)
    assert cfg.rollout.group_size == 8 and cfg.grpo.lr == 1e-6
    assert cfg.replay.historical_fraction == 0.1
    assert cfg.model.trust_remote_code is False and cfg.model.use_safetensors is True
    # the canonical JSON round-trips to an equal config
    assert config_from_json(cfg.to_json()) == cfg


def test_shipped_configs_exist_and_validate():
    assert default_config_path() in [p.resolve() for p in SHIPPED]
    for path in SHIPPED:
        cfg = load_config(path)
        assert isinstance(cfg, Config), path
        # round trip through the canonical JSON the pipeline passes to every component
        assert config_from_json(cfg.to_json()) == cfg, path


def test_embedded_default_is_tiny_yaml():
    cfg = load_config()
    assert cfg.model.policy == "tiny"
    assert cfg == load_config(default_config_path())
    raw = yaml.safe_load(default_config_path().read_text())
    assert cfg.name == raw["name"] and cfg.rollout.group_size == raw["rollout"]["group_size"]


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("data, path", [
    ({"grpo": {"beta": -0.1}}, "grpo.beta"),
    ({"grpo": {"eps_low": 0}}, "grpo.eps_low"),
    ({"grpo": {"eps_low": 1.0}}, "grpo.eps_low"),
    ({"grpo": {"loss_agg": "mean"}}, "grpo.loss_agg"),
    ({"grpo": {"advantage": {"std": "biased"}}}, "grpo.advantage.std"),
    ({"rollout": {"group_size": 1}}, "rollout.group_size"),
    ({"rollout": {"top_p": 1.5}}, "rollout.top_p"),
    ({"rollout": {"temperature": 0}}, "rollout.temperature"),
    ({"rollout": {"temperature_range": [0.0, 1.0]}}, "rollout.temperature_range"),
    ({"rollout": {"temperature_range": [1.2, 0.6]}}, "rollout.temperature_range"),
    ({"rollout": {"hf": {"dtype": "float8"}}}, "rollout.hf.dtype"),
    ({"replay": {"historical_fraction": 1.5}}, "replay.historical_fraction"),
    ({"model": {"dtype": "float8"}}, "model.dtype"),
    ({"model": {"tiny": {"hidden_size": 2}}}, "model.tiny.hidden_size"),
    ({"data": {"arithmetic": {"operators": ["/"]}}}, "data.arithmetic.operators.0"),
    ({"name": "Has Spaces"}, "name"),
    ({"loop": {"iterations": 0}}, "loop.iterations"),
    ({"cluster": {"stages": {"bogus": {}}}}, "cluster.stages"),
    ({"reward": {"rm_weight": float("inf")}}, "reward.rm_weight"),
    ({"grpo": {"lr": float("nan")}}, "grpo.lr"),
    ({"grpo": {"max_kl": float("inf")}}, "grpo.max_kl"),
])
def test_bad_value_names_its_dotted_key_path(data, path):
    msg = errors_of(data)
    assert f"config: {path}: " in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize("data, path", [
    ({"bogus": 1}, "bogus"),
    ({"grpo": {"betta": 0.1}}, "grpo.betta"),
    ({"grpo": {"advantage": {"scaling": "group"}}}, "grpo.advantage.scaling"),
    ({"cluster": {"stages": {"sft": {"gpus": 1}}}}, "cluster.stages.sft.gpus"),
])
def test_unknown_key_is_an_error_naming_it(data, path):
    assert f"{path}: unknown key" in errors_of(data)


def test_cross_field_rules():
    assert "path is required" in errors_of({"data": {"source": "file"}})
    assert "nothing to optimise" in errors_of({"reward": {"rm_weight": 0, "correctness_weight": 0,
                                                          "format_weight": 0}})
    assert "max_operand must be >= min_operand" in errors_of({"data": {"arithmetic": {"min_operand": 9,
                                                                                      "max_operand": 3}}})


def test_several_errors_are_reported_together():
    msg = errors_of({"grpo": {"beta": -1, "eps_low": 0}, "rollout": {"group_size": 1}, "bogus": True})
    for path in ("grpo.beta", "grpo.eps_low", "rollout.group_size", "bogus"):
        assert f"config: {path}: " in msg, msg
    assert msg.count("; ") == 3


def test_assignment_is_validated_too():
    cfg = Config()
    with pytest.raises(Exception, match="group_size"):
        cfg.rollout.group_size = 1


# --------------------------------------------------------------------------- loading
def test_load_config_reports_the_file_and_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("grpo:\n  beta: -1\n")
    with pytest.raises(ConfigError, match=rf"{f}: grpo\.beta: "):
        load_config(f)


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just a string\n", "str"), ("42\n", "int")])
def test_yaml_that_is_not_a_mapping(tmp_path, text, kind):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=f"top level must be a mapping, got {kind}"):
        load_config(f)
    # overrides on top of a non-mapping file are the same clear error, not a crash in the merge
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(f, overrides={"seed": 3})


def test_empty_yaml_is_an_error_and_an_empty_mapping_the_defaults(tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("# nothing\n")  # a truncated or wrong file must not run on built-in defaults
    with pytest.raises(ConfigError, match="the config file is empty"):
        load_config(f)
    f.write_text("{}\n")
    assert load_config(f) == Config()


def test_invalid_yaml_syntax(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("grpo: {beta: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"config file not found: {missing}"):
        load_config(missing)
    with pytest.raises(ConfigError, match="is a directory, not a YAML file"):
        load_config(tmp_path)  # a directory is not a config file


def test_config_from_json_errors():
    with pytest.raises(ConfigError, match="config: grpo.beta: "):
        config_from_json(json.dumps({"grpo": {"beta": -2}}))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        config_from_json("[1, 2]")


# --------------------------------------------------------------------------- overrides
def test_set_dotted_builds_nested_overrides():
    over: dict = {}
    set_dotted(over, "grpo.beta", 0.1)
    set_dotted(over, "grpo.advantage.std", "sample")
    set_dotted(over, "seed", 7)
    assert over == {"grpo": {"beta": 0.1, "advantage": {"std": "sample"}}, "seed": 7}


def test_overrides_merge_deeply_over_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("grpo:\n  beta: 0.5\n  eps_high: 0.3\nrollout: {group_size: 4}\n")
    over: dict = {}
    set_dotted(over, "grpo.beta", 0.0)
    set_dotted(over, "rollout.temperature_range", [0.6, 1.2])
    cfg = load_config(f, over)
    assert cfg.grpo.beta == 0.0 and cfg.grpo.eps_high == 0.3 and cfg.rollout.group_size == 4
    assert cfg.rollout.temperature_range == (0.6, 1.2)
    # the file itself is unchanged by the merge
    assert yaml.safe_load(f.read_text())["grpo"]["beta"] == 0.5
    bad: dict = {}
    set_dotted(bad, "grpo.beta", -1)
    with pytest.raises(ConfigError, match="grpo.beta"):
        load_config(f, bad)


# --------------------------------------------------------------------------- hash
def test_hash_is_stable_and_content_based():
    a = parse_config({"grpo": {"beta": 0.1}, "seed": 3})
    b = parse_config({"seed": 3, "grpo": {"beta": 0.1}})
    assert a.hash() == b.hash() == config_from_json(a.to_json()).hash()
    assert len(a.hash()) == 12 and all(c in "0123456789abcdef" for c in a.hash())
    assert a.hash() != parse_config({"grpo": {"beta": 0.2}, "seed": 3}).hash()
    assert a.hash() != parse_config({"grpo": {"beta": 0.1}, "seed": 4}).hash()
    assert Config().hash() != parse_config({"cluster": {"stages": {"sft": {"retries": 3}}}}).hash()


def test_hash_is_the_same_in_another_process():
    code = ("from components.config import parse_config;"
            "print(parse_config({'grpo': {'beta': 0.1}, 'seed': 3}).hash())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == parse_config({"grpo": {"beta": 0.1}, "seed": 3}).hash()
