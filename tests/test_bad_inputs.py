"""The bad-input table: every kind of bad input, through the real CLI (`kfp-grpo stage ...`).

One table-driven test. Each case runs `pipelines.cli.main(["stage", <stage>, ...])` on a
real file/model built here and asserts: exit code 2, exactly one line on stderr starting
with `error: ` and naming the problem, nothing on stdout, and no output artifact (nor a
temporary sibling of one) left behind.

The README table (input → the error line the user sees) is generated from these runs:
    KFP_GRPO_WRITE_SNIPPET=1 python -m pytest tests/test_bad_inputs.py
rewrites the table in README.md (the part between the table markers).
Single-stage variants already covered elsewhere (several stages per config error in
tests/test_stages.py, loader edge cases in tests/test_tasks.py / test_modeling.py) are
not repeated here; this table is the one place listing each kind once, end to end.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
import torch
import yaml

from components.config import TinyModelConfig, _deep_merge
from components.io import write_parquet
from pipelines import cli
from tests.conftest import FAST

SNIPPET = Path(__file__).resolve().parent.parent / "README.md"  # the table lives in the README
BEGIN, END = "<!-- bad-input-table:begin -->", "<!-- bad-input-table:end -->"
SMALL_MODEL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
# what every case's config starts from: tiny and fast (the bad part is merged on top)
BASE = _deep_merge(FAST, {"model": {"tiny": SMALL_MODEL}, "data": {"num_train": 40, "num_test": 10},
                          "rollout": {"group_size": 2, "prompts_per_step": 2, "max_new_tokens": 3},
                          "reward": {"rm_weight": 0.5}})
RESULTS: dict[str, tuple[str, str]] = {}  # case id → (input, the error line), for the README table


# =========================================================================== the inputs
@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    """Real inputs, built once: prompt tables, a tiny policy, a NaN reward model, broken model dirs."""
    from transformers import DistilBertConfig, DistilBertModel

    from components import prepare_data
    from components.config import parse_config
    from components.modeling import build_tiny_model, build_tiny_tokenizer, load_reward_model, save_model

    d = tmp_path_factory.mktemp("bad-inputs")
    cfg = parse_config(BASE)
    prepare_data.run(cfg, str(d / "train.parquet"), str(d / "test.parquet"))
    tok = build_tiny_tokenizer()
    model = build_tiny_model(TinyModelConfig(**SMALL_MODEL), tok, seed=0)
    save_model(model, tok, d / "policy")

    rm, rm_tok = load_reward_model(str(d / "policy"), new_head=True)
    with torch.no_grad():
        rm.score.weight.fill_(float("nan"))  # every score NaN
    save_model(rm, rm_tok, d / "rm-nan")

    with torch.no_grad():  # a policy whose weights went NaN: its loss is NaN
        for p in model.parameters():
            p.fill_(float("nan"))
    save_model(model, tok, d / "policy-nan")

    not_lm = d / "distilbert"  # an encoder (no causal-LM head exists for it), with a chat-template tokenizer
    DistilBertModel(DistilBertConfig(vocab_size=len(tok), dim=32, n_layers=1, n_heads=2, hidden_dim=64)
                    ).save_pretrained(not_lm)
    tok.save_pretrained(not_lm)

    no_template = d / "no-template"
    fresh_tok = build_tiny_tokenizer()
    fresh_tok.chat_template = None
    build_tiny_model(TinyModelConfig(**SMALL_MODEL), fresh_tok).save_pretrained(no_template)
    fresh_tok.save_pretrained(no_template)

    # one round of rollouts (the columns grpo_update reads), valid except where a case breaks it
    ids = tok("<answer>3</answer>", add_special_tokens=False).input_ids
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 1 + 2?"}], tokenize=False,
                                     add_generation_prompt=True)
    rows = [{"prompt_text": prompt, "completion_ids": ids, "sampler_logprobs": [-1.0] * len(ids),
             "advantage": a, "reward": r} for a, r in [(1.0, 1.0), (-1.0, 0.0)] * 2]
    write_parquet(pd.DataFrame(rows), d / "rollouts-ok.parquet")
    empty = [dict(r) for r in rows]
    empty[1].update(completion_ids=[], sampler_logprobs=[])
    write_parquet(pd.DataFrame(empty), d / "rollouts-empty.parquet")
    nan_adv = [dict(r) for r in rows]
    nan_adv[2]["advantage"] = float("nan")
    write_parquet(pd.DataFrame(nan_adv), d / "rollouts-nan.parquet")
    return {"dir": d, "train": d / "train.parquet", "test": d / "test.parquet", "policy": d / "policy",
            "rm_nan": d / "rm-nan", "policy_nan": d / "policy-nan", "distilbert": not_lm,
            "no_template": no_template}


def _jsonl(d: Path, name: str, rows: list) -> Path:
    path = d / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


PLAIN = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(6)]


# =========================================================================== the table
@dataclass
class Case:
    id: str
    input: str                      # what the user gave (README column 1)
    stage: str
    words: list[str]                # phrases the one error line must contain
    config: dict = field(default_factory=dict)
    # (env, tmp) → extra CLI args; the output flags are added by the stage's OUT entry
    args: Callable[[dict, Path], list[str]] = lambda env, tmp: []
    make: Callable[[Path], dict] | None = None  # builds a data file → config overrides


# the stage's inputs (besides the config) and its output flags → the artifacts that must not appear
def _stage_args(stage: str, env: dict, tmp: Path) -> tuple[list[str], list[Path]]:
    out = tmp / "out"
    if stage == "prepare_data":
        return ["--train", str(out / "train.parquet"), "--test", str(out / "test.parquet")], \
            [out / "train.parquet", out / "test.parquet"]
    if stage == "sft":
        return ["--train", str(env["train"]), "--model", str(out)], [out]
    if stage == "rollout":
        return ["--prompts", str(env["train"]), "--policy", str(env["policy"]), "--reward-model",
                str(env["rm_nan"]), "--rollouts", str(tmp / "rollouts.parquet")], [tmp / "rollouts.parquet"]
    if stage == "grpo_update":
        return ["--policy", str(env["policy"]), "--new-policy", str(out)], [out]
    if stage == "evaluate":
        return ["--test", str(env["test"]), "--out", str(tmp / "metrics.json")], [tmp / "metrics.json"]
    raise AssertionError(stage)


def _file_data(make: Callable[[Path], Path], layout: str = "plain") -> Callable[[Path], dict]:
    return lambda d: {"data": {"source": "file", "path": str(make(d)), "layout": layout, "num_test": 1}}


def _latin1(d: Path) -> Path:
    path = d / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "What is 1 + 1?", "answer": "2"}\n{"prompt": "caf\xe9 + 1?", "answer": "2"}\n')
    return path


CASES = [
    # ---------------------------------------------------------------- config
    Case("config-unknown-key", "config with a misspelt key `grpo.betta: 0.1`", "prepare_data",
         ["grpo.betta", "unknown key"], {"grpo": {"betta": 0.1}}),
    Case("config-wrong-type", "config `sft.steps: many` (not an int)", "prepare_data",
         ["sft.steps", "valid integer"], {"sft": {"steps": "many"}}),
    Case("config-group-size-1", "config `rollout.group_size: 1` (G < 2)", "prepare_data",
         ["rollout.group_size", "greater than or equal to 2"], {"rollout": {"group_size": 1}}),
    Case("config-beta-negative", "config `grpo.beta: -0.1` (β < 0)", "prepare_data",
         ["grpo.beta", "greater than or equal to 0"], {"grpo": {"beta": -0.1}}),
    Case("config-eps-zero", "config `grpo.eps_high: 0` (ε ≤ 0)", "prepare_data",
         ["grpo.eps_high", "greater than 0"], {"grpo": {"eps_high": 0}}),
    Case("config-iterations-zero", "config `loop.iterations: 0` (I = 0)", "prepare_data",
         ["loop.iterations", "greater than or equal to 1"], {"loop": {"iterations": 0}}),
    Case("config-steps-zero", "config `loop.steps_per_iteration: 0` (M = 0)", "prepare_data",
         ["loop.steps_per_iteration", "greater than or equal to 1"], {"loop": {"steps_per_iteration": 0}}),
    Case("config-max-tokens-zero", "config `rollout.max_new_tokens: 0`", "prepare_data",
         ["rollout.max_new_tokens", "greater than 0"], {"rollout": {"max_new_tokens": 0}}),
    Case("config-uri-with-password", "config `tracking.tracking_uri: http://u:secret@host` (credentials)",
         "prepare_data", ["tracking: ", "tracking_uri must not contain a password"],
         {"tracking": {"tracking_uri": "http://u:secret@mlflow:5000"}}),
    # ---------------------------------------------------------------- data sets
    Case("data-missing-file", "`data.path` names a file that does not exist", "prepare_data",
         ["data file not found", "nope.jsonl"], make=lambda d: {"data": {"source": "file",
                                                                         "path": str(d / "nope.jsonl")}}),
    Case("data-wrong-columns", "JSONL with columns question/reply (layout plain needs prompt, answer)",
         "prepare_data", ["missing required column", "['prompt'", "found columns"],
         make=_file_data(lambda d: _jsonl(d, "cols.jsonl", [{"question": "q", "reply": "1"}] * 3))),
    Case("data-empty", "JSONL file with no rows", "prepare_data", ["contains no rows"],
         make=_file_data(lambda d: _jsonl(d, "empty.jsonl", []))),
    Case("data-duplicate-ids", "JSONL with the same `id` twice", "prepare_data", ["duplicate id 'a'", "row 2"],
         make=_file_data(lambda d: _jsonl(d, "dup.jsonl", [{"id": "a", **PLAIN[0]}, {"id": "b", **PLAIN[1]},
                                                           {"id": "a", **PLAIN[2]}]))),
    Case("data-not-utf8", "JSONL with a Latin-1 byte (not UTF-8)", "prepare_data", ["not valid UTF-8", "row 1"],
         make=_file_data(_latin1)),
    Case("data-unparsable-answer", "JSONL answer `about 5` (not a number)", "prepare_data",
         ["answer is not a number", "row 1"],
         make=_file_data(lambda d: _jsonl(d, "answers.jsonl", [PLAIN[0], {"prompt": "q", "answer": "about 5"}]))),
    Case("data-gsm8k-no-hashes", "GSM8K-layout row whose answer has no `#### N`", "prepare_data", ["####", "row 1"],
         make=_file_data(lambda d: _jsonl(d, "gsm.jsonl", [{"question": "q1", "answer": "so 2+3 = 5\n#### 5"},
                                                           {"question": "q2", "answer": "It is 5."}]), "gsm8k")),
    # ---------------------------------------------------------------- model directories
    Case("model-missing", "`--policy` directory that does not exist", "evaluate",
         ["model directory not found", "no-such-model"],
         args=lambda env, tmp: ["--policy", str(tmp / "no-such-model")]),
    Case("model-not-causal-lm", "`--policy` is a DistilBERT encoder (no causal-LM head)", "evaluate",
         ["cannot load a causal LM", "distilbert", "DistilBertConfig"],
         args=lambda env, tmp: ["--policy", str(env["distilbert"])]),
    Case("model-no-chat-template", "`--policy` whose tokenizer has no chat template", "evaluate",
         ["has no chat template"], args=lambda env, tmp: ["--policy", str(env["no_template"])]),
    Case("model-reward-model-as-policy", "`--policy` is a reward model directory (sequence classifier)", "evaluate",
         ["cannot load a causal LM", "rm-nan", "LlamaForSequenceClassification"],
         args=lambda env, tmp: ["--policy", str(env["rm_nan"])]),
    # ---------------------------------------------------------------- rewards, rollouts, numerics
    Case("reward-rm-nan", "reward model that scores NaN", "rollout", ["reward is NaN/inf", "reward model score nan"]),
    Case("reward-weight-inf", "config `reward.correctness_weight: .inf` (any NaN/inf number in the config)",
         "rollout", ["config.yaml: reward.correctness_weight: Input should be a finite number"],
         {"reward": {"correctness_weight": math.inf, "rm_weight": 0.0}}),
    Case("rollout-empty-completion", "rollout Parquet with an empty `completion_ids`", "grpo_update",
         ["completion(s) are empty", "first at row 1"],
         args=lambda env, tmp: ["--rollouts", str(env["dir"] / "rollouts-empty.parquet")]),
    Case("rollout-nan-advantage", "rollout Parquet with a NaN advantage", "grpo_update",
         ["advantage is NaN/inf", "first at row 2"],
         args=lambda env, tmp: ["--rollouts", str(env["dir"] / "rollouts-nan.parquet")]),
    Case("policy-nan-loss", "`--policy` whose weights are NaN (the GRPO loss is NaN)", "grpo_update",
         ["grpo_update: loss is nan", "the policy was not updated"],
         args=lambda env, tmp: ["--rollouts", str(env["dir"] / "rollouts-ok.parquet"), "--policy",
                                str(env["policy_nan"])]),
]


def _no_artifact(path: Path) -> bool:
    return not path.exists() and not list(path.parent.glob(f".{path.name}.tmp-*")) if path.parent.exists() \
        else True


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_error_line_exit_2_and_no_artifact(case: Case, env, tmp_path, capsys):
    overrides = case.make(tmp_path) if case.make else {}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_deep_merge(_deep_merge(BASE, overrides), case.config)), encoding="utf-8")
    stage_args, artifacts = _stage_args(case.stage, env, tmp_path)
    extra = case.args(env, tmp_path)
    # a case's own --policy/--rollouts replace the stage's default one
    for flag in ("--policy", "--rollouts"):
        if flag in extra and flag in stage_args:
            i = stage_args.index(flag)
            del stage_args[i:i + 2]
    if case.stage == "evaluate" and "--policy" not in extra:
        extra += ["--policy", str(env["policy"])]
    if case.stage == "grpo_update" and "--rollouts" not in extra:
        extra += ["--rollouts", str(env["dir"] / "rollouts-ok.parquet")]
    capsys.readouterr()
    code = cli.main(["stage", case.stage, "--config", str(config), *stage_args, *extra])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, (code, captured.err[-2000:])
    assert len(lines) == 1, captured.err
    line = lines[0]
    assert line.startswith("error: "), line
    for w in case.words:
        assert w in line, (w, line)
    assert "Traceback" not in captured.err and captured.out.strip() == ""
    for a in artifacts:
        assert _no_artifact(a), a
    RESULTS[case.id] = (case.input, re.sub(r"(?<![\w.])/(?:[^\s/'\"\]]+/)+", "<tmp>/", line))


def test_readme_table_lists_every_kind():
    """The README table has one row per kind (regenerated from the runs above on demand)."""
    if os.environ.get("KFP_GRPO_WRITE_SNIPPET"):
        assert len(RESULTS) == len(CASES), "run the whole file to regenerate the table"
        rows = ["| # | kind | input | what the user sees (stderr, exit code 2) |", "|---|---|---|---|"]
        for i, c in enumerate(CASES, 1):
            inp, line = RESULTS[c.id]
            if len(line) > 400:  # transformers' list of every supported config class
                line = f"{line[:400]}… [{len(line) - 400} more characters]"
            rows.append(f"| {i} | `{c.id}` | {inp} (`kfp-grpo stage {c.stage}`) | `{line.replace('|', '¦')}` |")
        text = SNIPPET.read_text(encoding="utf-8") if SNIPPET.exists() else f"{BEGIN}\n{END}\n"
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        SNIPPET.write_text(f"{head}{BEGIN}\n" + "\n".join(rows) + f"\n{END}{tail}", encoding="utf-8")
    table = SNIPPET.read_text(encoding="utf-8").split(BEGIN, 1)[1].split(END, 1)[0]
    for c in CASES:
        assert f"`{c.id}`" in table, f"{c.id} missing from {SNIPPET.name}; regenerate with KFP_GRPO_WRITE_SNIPPET=1"
    assert len(CASES) >= 15
