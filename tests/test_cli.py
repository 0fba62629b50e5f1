"""The command line follows the conventions of kfp's and mlflow's: --version, help with defaults, a list of stages."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import pytest

from components.config import STAGES
from pipelines import cli


def kfp_grpo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, timeout=120)


def test_version():
    res = kfp_grpo("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"kfp-grpo {version('kfp-grpo')}"


def test_stage_help_lists_every_stage_with_what_it_does(capsys):
    assert cli.main(["stage", "--help"]) == 0
    out = capsys.readouterr().out
    for stage in STAGES:
        assert f"\n  {stage} " in out
    assert "supervised fine-tuning" in out
    assert cli.main(["stage"]) == 2  # no stage named: the list, and a usage error
    assert "grpo_update" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "compile", "submit", "schedule", "promote", "stage sft",
                                     "stage rollout", "stage grpo_update"])
def test_every_option_has_help_and_shows_its_default(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one option per line
    with pytest.raises(SystemExit) as info:
        cli.main([*command.split(), "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: kfp-grpo {command}")
    parser = cli.build_parser()
    if command in ("run", "compile", "submit", "schedule"):  # the options kfp-grpo itself defines
        sub = parser._subparsers._group_actions[0].choices[command]
        for action in sub._actions:
            assert action.help, f"{command} {action.option_strings} has no help"
    if command == "run":
        assert "(default: kfp-grpo-runs)" in out and "(default: text)" in out
    if command == "schedule":
        assert "(default: 1)" in out  # --max-concurrency
