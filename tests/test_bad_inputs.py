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
    oov = [dict(r) for r in rows]  # a table sampled from a model with a bigger vocabulary
    oov[3]["completion_ids"] = [*ids[:-1], len(tok) + 1000]
    write_parquet(pd.DataFrame(oov), d / "rollouts-oov.parquet")
    write_parquet(pd.DataFrame(rows).drop(columns=["advantage"]), d / "rollouts-noadv.parquet")
    (d / "not-parquet.parquet").write_text("id,prompt,answer\n1,What is 1 + 1?,2\n", encoding="utf-8")
    write_parquet(pd.DataFrame({"prompt": ["What is 1 + 1?", "What is 2 + 2?"], "answer": ["2", "four"]}),
                  d / "test-words.parquet")
    write_parquet(pd.DataFrame({"question": ["What is 1 + 1?"], "reply": ["2"]}), d / "prompts-nocols.parquet")

    import shutil

    from safetensors.torch import save_file

    truncated = d / "policy-truncated"  # a copy cut off half-way (a full disk, an interrupted download)
    shutil.copytree(d / "policy", truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    bad_opt = d / "policy-bad-optimizer"  # optimizer.pt overwritten with garbage
    shutil.copytree(d / "policy", bad_opt)
    (bad_opt / "optimizer.pt").write_bytes(b"PK\x03\x04 this is not a torch checkpoint")
    shape = d / "policy-wrong-shape"  # weights of another model size under this config.json
    shutil.copytree(d / "policy", shape)
    other = build_tiny_model(TinyModelConfig(**{**SMALL_MODEL, "hidden_size": 48, "num_heads": 2}), tok, seed=0)
    save_file({k: v.contiguous() for k, v in other.state_dict().items() if k != "lm_head.weight"},
              shape / "model.safetensors", metadata={"format": "pt"})
    no_config = d / "no-config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(b"")
    return {"dir": d, "train": d / "train.parquet", "test": d / "test.parquet", "policy": d / "policy",
            "rm_nan": d / "rm-nan", "policy_nan": d / "policy-nan", "distilbert": not_lm,
            "no_template": no_template, "truncated": truncated, "bad_opt": bad_opt, "wrong_shape": shape,
            "no_config": no_config}


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
    code: int = 2                   # 1: a remote endpoint failed (KFP, MLflow)
    raw: str | bytes | None = None  # the config file's text instead of the YAML of BASE + config
    # builds what the user already has (files, directories) → the paths that must stay exactly as they were
    user: Callable[[Path], list[Path]] | None = None
    env: dict = field(default_factory=dict)  # environment variables set for the run
    secret: str | None = None       # planted: must appear nowhere in the output

    @property
    def command(self) -> str:
        return self.stage if self.stage in COMMANDS else f"stage {self.stage}"


COMMANDS = ("compile", "run", "submit", "schedule", "promote")
CLOSED = "http://127.0.0.1:9"  # nothing listens on the discard port: a request would fail to connect


# the stage's inputs (besides the config) and its output flags → the artifacts that must not appear
def _stage_args(stage: str, env: dict, tmp: Path) -> tuple[list[str], list[Path]]:
    out = tmp / "out"
    if stage == "compile":
        return ["-o", str(tmp / "p.yaml")], [tmp / "p.yaml"]
    if stage == "run":
        return ["--workdir", str(tmp / "wd")], [tmp / "wd"]
    if stage in ("submit", "schedule"):
        return ["--host", CLOSED], []
    if stage == "promote":
        return ["--policy", str(env["policy"]), "--test", str(env["test"])], []
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


PLANTED = "Planted-s3cr3t-4f1d"  # a secret planted in a URI, a flag, the environment

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
    # ---------------------------------------------------------------- config files (round two)
    Case("config-empty-file", "an empty config file (it compiled with built-in defaults)", "compile",
         ["the config file is empty"], raw="# nothing here yet\n"),
    Case("config-duplicate-key", "config with `grpo:` twice (YAML keeps the last section silently)", "compile",
         ["duplicate key 'grpo'", "first on line 1", "line 3"], raw="grpo:\n  beta: 0.1\ngrpo:\n  lr: 1.0e-4\n"),
    Case("config-not-yaml", "config that is not YAML (`grpo: [1, 2`)", "compile", ["not valid YAML", "line"],
         raw="grpo: [1, 2\n"),
    Case("config-not-mapping", "config whose top level is a list", "compile", ["top level must be a mapping"],
         raw="- grpo\n- sft\n"),
    Case("config-not-utf8", "config file that is not UTF-8 text", "compile", ["not UTF-8 text"],
         raw=b"seed: 1\n# caf\xe9\n"),
    Case("config-missing", "`--config` names a file that does not exist", "compile",
         ["config file not found", "nope.yaml"], args=lambda env, tmp: ["--config", str(tmp / "nope.yaml")]),
    Case("config-is-directory", "`--config` names a directory", "compile", ["is a directory, not a YAML file"],
         args=lambda env, tmp: ["--config", str(env["dir"])]),
    Case("config-data-path-ignored", "config `data.path` without `data.source: file` (it was ignored)", "compile",
         ["data: ", "path set, but source is 'arithmetic'"], {"data": {"path": "train.jsonl"}}),
    Case("config-test-path-ignored", "config `data.test_path` with `data.source: hf`", "compile",
         ["data: ", "test_path set, but source is 'hf'"], {"data": {"source": "hf", "path": "gsm8k",
                                                                   "test_path": "test.jsonl"}}),
    Case("config-seed-negative", "config `seed: -1`", "compile", ["seed: Input should be greater than or equal to 0"],
         {"seed": -1}),
    Case("config-seed-overflow", "config `seed: 2**64` (a KFP parameter is an int64)", "compile",
         ["seed: Input should be less than or equal to 9223372036854775807"], {"seed": 2**64}),
    Case("config-lr-too-large", "config `grpo.lr: 5` (not a learning rate)", "compile",
         ["grpo.lr: Input should be less than or equal to 1"], {"grpo": {"lr": 5}}),
    Case("config-group-size-huge", "config `rollout.group_size: 100000`", "compile",
         ["rollout.group_size: Input should be less than or equal to 1024"], {"rollout": {"group_size": 100000}}),
    Case("config-token-budget-huge", "config `rollout.max_new_tokens: 10000000`", "compile",
         ["rollout.max_new_tokens: Input should be less than or equal to 131072"],
         {"rollout": {"max_new_tokens": 10_000_000}}),
    Case("config-shm-size-bad", "config `cluster.stages.rollout.shm_size: 2GB` (not a Kubernetes quantity)",
         "compile", ["cluster.stages.rollout.shm_size", "'2GB' is not a Kubernetes quantity"],
         {"cluster": {"stages": {"rollout": {"shm_size": "2GB"}}}}),
    Case("config-memory-milli", "config `memory_request: 2m` (2 milli-bytes, meant 2Mi)", "compile",
         ["cluster.stages.sft.memory_request", "under 1Mi"], {"cluster": {"stages": {"sft": {"memory_request": "2m"}}}}),
    Case("config-request-over-limit", "config `cpu_request: 4` over `cpu_limit: 2`", "compile",
         ["cluster.stages.grpo_update", "cpu_request 4 exceeds cpu_limit 2"],
         {"cluster": {"stages": {"grpo_update": {"cpu_request": "4", "cpu_limit": "2"}}}}),
    Case("config-unknown-stage", "config `cluster.stages.sfft` (misspelt stage)", "compile",
         ["cluster.stages", "unknown stage(s) ['sfft']"], {"cluster": {"stages": {"sfft": {}}}}),
    Case("config-nodes-without-pvc", "config `grpo.nodes: 2` without a shared PVC", "compile",
         ["grpo: ", "nodes > 1 needs trainer_job.shared_pvc"], {"grpo": {"nodes": 2}}),
    Case("config-temperature-range", "config `rollout.temperature_range: [2, 1]`", "compile",
         ["rollout.temperature_range", "need 0 < τ_lo <= τ_hi"], {"rollout": {"temperature_range": [2, 1]}}),
    Case("config-no-reward", "config with every reward weight 0", "compile", ["nothing to optimise"],
         {"reward": {"rm_weight": 0, "correctness_weight": 0, "format_weight": 0}}),
    Case("config-operand-range", "config `max_operand` below `min_operand`", "compile",
         ["data.arithmetic", "max_operand must be >= min_operand"],
         {"data": {"arithmetic": {"min_operand": 10, "max_operand": 5}}}),
    Case("config-bad-name", "config `name: My Pipeline` (not a Kubernetes name)", "compile",
         ["name: String should match pattern"], {"name": "My Pipeline"}),
    # ---------------------------------------------------------------- --set
    Case("set-not-yaml", "`--set grpo.beta=[1` (the value does not parse)", "compile",
         ["--set grpo.beta: the value '[1' is not valid YAML"], args=lambda env, tmp: ["--set", "grpo.beta=[1"]),
    Case("set-conflict", "`--set grpo=1 --set grpo.beta=0.1` (a section and a value)", "compile",
         ["--set grpo.beta: conflicts with --set grpo=..."],
         args=lambda env, tmp: ["--set", "grpo=1", "--set", "grpo.beta=0.1"]),
    Case("set-twice", "`--set seed=1 --set seed=2`", "compile", ["--set seed is given twice"],
         args=lambda env, tmp: ["--set", "seed=1", "--set", "seed=2"]),
    Case("set-no-value", "`--set grpo.beta` (no `=`)", "compile", ["--set expects key=value"],
         args=lambda env, tmp: ["--set", "grpo.beta"]),
    Case("set-bad-key", "`--set grpo..beta=1` (an empty key)", "compile", ["'' is not a key name"],
         args=lambda env, tmp: ["--set", "grpo..beta=1"]),
    Case("set-unknown-key", "`--set grpo.betta=0.1`", "compile", ["grpo.betta: unknown key"],
         args=lambda env, tmp: ["--set", "grpo.betta=0.1"]),
    Case("set-wrong-type", "`--set rollout.group_size=eight`", "compile",
         ["rollout.group_size: Input should be a valid integer"],
         args=lambda env, tmp: ["--set", "rollout.group_size=eight"]),
    # ---------------------------------------------------------------- output paths, the workdir
    Case("compile-over-user-file", "`compile -o notes.yaml`, a file the user wrote", "compile",
         ["notes.yaml is an existing file that kfp-grpo did not write"],
         args=lambda env, tmp: ["-o", str(tmp / "notes.yaml")], user=lambda tmp: _user_file(tmp / "notes.yaml")),
    Case("compile-under-a-file", "`compile -o notes.yaml/p.yaml` (the parent is a file)", "compile",
         ["notes.yaml is a file, not a directory"], args=lambda env, tmp: ["-o", str(tmp / "notes.yaml" / "p.yaml")],
         user=lambda tmp: _user_file(tmp / "notes.yaml")),
    Case("compile-not-yaml", "`compile -o pipeline.json`", "compile", ["a compiled pipeline is a .yaml file"],
         args=lambda env, tmp: ["-o", str(tmp / "pipeline.json")]),
    Case("compile-unwritable", "`compile -o /proc/p.yaml` (a read-only place)", "compile",
         ["output path /proc/p.yaml cannot be written"], args=lambda env, tmp: ["-o", "/proc/p.yaml"]),
    Case("workdir-is-file", "`run --workdir notes.txt` (a file)", "run", ["--workdir", "is a file, not a directory"],
         args=lambda env, tmp: ["--workdir", str(tmp / "notes.txt")], user=lambda tmp: _user_file(tmp / "notes.txt")),
    Case("workdir-user-dir", "`run --workdir ~/thesis` (a directory kfp-grpo did not create)", "run",
         ["is an existing directory that kfp-grpo did not create"], args=lambda env, tmp: ["--workdir", str(tmp / "thesis")],
         user=lambda tmp: _user_dir(tmp / "thesis")),
    Case("workdir-uncreatable", "`run --workdir /proc/runs`", "run", ["--workdir /proc/runs cannot be created"],
         args=lambda env, tmp: ["--workdir", "/proc/runs"]),
    Case("resume-new-workdir", "`run --resume <id>` in a new work directory", "run",
         ["cannot resume run 0123abcd", "holds no MLflow store"], args=lambda env, tmp: ["--resume", "0123abcd"]),
    Case("stage-output-user-dir", "`stage sft --model ~/thesis` (a user's directory)", "sft",
         ["thesis is an existing directory that kfp-grpo did not write"],
         args=lambda env, tmp: ["--model", str(tmp / "thesis")], user=lambda tmp: _user_dir(tmp / "thesis")),
    Case("stage-output-user-file", "`stage evaluate --out notes.json` (a user's JSON file)", "evaluate",
         ["notes.json is an existing file that kfp-grpo did not write"],
         args=lambda env, tmp: ["--out", str(tmp / "notes.json")], user=lambda tmp: _user_file(tmp / "notes.json")),
    Case("stage-outputs-same-path", "`stage prepare_data --train t.parquet --test t.parquet`", "prepare_data",
         ["outputs train and test are the same path"],
         args=lambda env, tmp: ["--train", str(tmp / "t.parquet"), "--test", str(tmp / "t.parquet")]),
    Case("stage-output-under-file", "`stage rollout --rollouts notes.txt/r.parquet`", "rollout",
         ["notes.txt is a file, not a directory"], args=lambda env, tmp: ["--rollouts", str(tmp / "notes.txt" / "r.parquet")],
         user=lambda tmp: _user_file(tmp / "notes.txt")),
    # ---------------------------------------------------------------- data files (round two)
    Case("data-not-parquet", "`data.path` names a CSV file called `.parquet`", "prepare_data", ["table.parquet"],
         make=_file_data(lambda d: _text(d, "table.parquet", "id,prompt,answer\n1,What is 1 + 1?,2\n"))),
    Case("data-bad-json-line", "JSONL with a line that is not JSON", "prepare_data", ["bad.jsonl", "line 2"],
         make=_file_data(lambda d: _text(d, "bad.jsonl", '{"prompt": "q", "answer": "1"}\n{"prompt": "q2", "answer": \n'))),
    Case("test-answers-not-numbers", "held-out table whose answers are words (accuracy would be 0)", "evaluate",
         ["answer is not a number", "row 1", "'four'"], args=lambda env, tmp: ["--test", str(env["dir"] / "test-words.parquet")]),
    Case("prompts-missing-columns", "`--prompts` table without `prompt`/`answer` columns", "rollout",
         ["lacks required column(s)", "prompts-nocols.parquet"],
         args=lambda env, tmp: ["--prompts", str(env["dir"] / "prompts-nocols.parquet")]),
    # ---------------------------------------------------------------- model / optimizer files
    Case("model-truncated-safetensors", "`--policy` whose `model.safetensors` was cut off half-way", "evaluate",
         ["policy-truncated/model.safetensors is damaged"], args=lambda env, tmp: ["--policy", str(env["truncated"])]),
    Case("model-wrong-shape", "`--policy` whose weights do not fit its `config.json`", "evaluate",
         ["policy-wrong-shape", "weights do not have the shapes its config.json describes"],
         args=lambda env, tmp: ["--policy", str(env["wrong_shape"])]),
    Case("model-no-config", "`--policy` directory without `config.json`", "evaluate", ["no config.json"],
         args=lambda env, tmp: ["--policy", str(env["no_config"])]),
    Case("optimizer-corrupt", "`--policy` whose `optimizer.pt` is corrupt", "grpo_update",
         ["optimizer.pt is not a readable optimizer state", "delete optimizer.pt"],
         args=lambda env, tmp: ["--policy", str(env["bad_opt"])]),
    Case("policy-as-reward-model", "`--reward-model` is a policy directory (its score head would be random)", "rollout",
         ["is not a reward model", "LlamaForCausalLM"], args=lambda env, tmp: ["--reward-model", str(env["policy"])]),
    Case("policy-nan-at-rollout", "`--policy` whose weights are NaN, at rollout", "rollout",
         ["has NaN/inf weights", "policy-nan"], args=lambda env, tmp: ["--policy", str(env["policy_nan"])]),
    Case("vllm-not-installed", "config `rollout.backend: vllm` where vLLM is not installed", "rollout",
         ["rollout.backend: backend vllm needs the gpu extra"], {"rollout": {"backend": "vllm"}}),
    # ---------------------------------------------------------------- rollout tables (round two)
    Case("rollout-token-out-of-vocab", "rollout Parquet with a token id outside the vocabulary", "grpo_update",
         ["row 3 hold token id", "outside the policy's vocabulary"],
         args=lambda env, tmp: ["--rollouts", str(env["dir"] / "rollouts-oov.parquet")]),
    Case("rollout-missing-column", "rollout Parquet without the `advantage` column", "grpo_update",
         ["lacks required column(s) ['advantage']"],
         args=lambda env, tmp: ["--rollouts", str(env["dir"] / "rollouts-noadv.parquet")]),
    Case("rollout-not-parquet", "rollout file that is not Parquet", "grpo_update", ["is not a readable Parquet file"],
         args=lambda env, tmp: ["--rollouts", str(env["dir"] / "not-parquet.parquet")]),
    # ---------------------------------------------------------------- URIs and credentials
    Case("submit-uri-password", "`submit --tracking-uri http://u:<password>@mlflow`", "submit",
         ["--tracking-uri contains a password"], args=lambda env, tmp: ["--tracking-uri", f"http://u:{PLANTED}@mlflow:5000"],
         secret=PLANTED),
    Case("schedule-uri-password", "`schedule --tracking-uri http://u:<password>@mlflow`", "schedule",
         ["--tracking-uri contains a password"], args=lambda env, tmp: ["--tracking-uri", f"http://u:{PLANTED}@mlflow:5000"],
         secret=PLANTED),
    Case("submit-init-uri-token", "`submit --init-policy-uri https://host/m?token=<secret>`", "submit",
         ["--init-policy-uri contains a secret query parameter (token=)"],
         args=lambda env, tmp: ["--init-policy-uri", f"https://host/model?token={PLANTED}"], secret=PLANTED),
    Case("config-secret-in-data-path", "config `data.path` with `?token=<secret>`", "compile",
         ["data: ", "path must not contain a password or token"],
         {"data": {"source": "hf", "path": f"https://hub/ds?token={PLANTED}"}}, secret=PLANTED),
    Case("env-tracking-uri-password", "`run` with `$MLFLOW_TRACKING_URI=http://u:<password>@host`", "run",
         ["$MLFLOW_TRACKING_URI contains a password"], env={"MLFLOW_TRACKING_URI": f"http://u:{PLANTED}@127.0.0.1:9"},
         secret=PLANTED),
    Case("config-tracking-scheme", "config `tracking.tracking_uri: htp://mlflow:5000` (unknown scheme)", "compile",
         ["tracking.tracking_uri", "unknown scheme 'htp'"], {"tracking": {"tracking_uri": "htp://mlflow:5000"}}),
    Case("config-tracking-bare-path", "config `tracking.tracking_uri: mlruns` (a bare path)", "compile",
         ["tracking.tracking_uri", "not a URI"], {"tracking": {"tracking_uri": "mlruns"}}),
    Case("env-tracking-scheme", "`promote` with `$MLFLOW_TRACKING_URI=mlflow:5000` (no scheme)", "promote",
         ["tracking URI mlflow:5000: not a URI"], env={"MLFLOW_TRACKING_URI": "mlflow:5000"}),
    # ---------------------------------------------------------------- KFP / MLflow endpoints
    Case("schedule-cron-range", "`schedule --cron '0 0 25 * * *'` (hour 25): refused before any upload", "schedule",
         ["hours field '25' is not within 0-23"], args=lambda env, tmp: ["--cron", "0 0 25 * * *"]),
    Case("schedule-cron-fields", "`schedule --cron '0 2 * * *'` (5 fields)", "schedule", ["--cron needs 6 fields"],
         args=lambda env, tmp: ["--cron", "0 2 * * *"]),
    Case("schedule-max-concurrency", "`schedule --max-concurrency 0`", "schedule",
         ["--max-concurrency 0: the KFP backend allows 1 to 10"], args=lambda env, tmp: ["--max-concurrency", "0"]),
    Case("kfp-unreachable", "`submit --host` where nothing listens (the token is never printed)", "submit",
         ["cannot reach the KFP API at http://127.0.0.1:9"], code=1,
         args=lambda env, tmp: ["--token", f"tok-{PLANTED}", "--namespace", "team-a"], secret=PLANTED),
    Case("kfp-host-password", "`submit --host http://admin:<password>@host` (unreachable)", "submit",
         ["cannot reach the KFP API at http://admin:***@127.0.0.1:9"], code=1,
         args=lambda env, tmp: ["--host", f"http://admin:{PLANTED}@127.0.0.1:9", "--namespace", "team-a"],
         secret=PLANTED),
    Case("mlflow-unreachable", "`promote` with an MLflow server that does not answer", "promote",
         ["MLflow tracking server http://127.0.0.1:9 is unreachable"], {"tracking": {"tracking_uri": CLOSED}}),
]



def _user_file(path: Path) -> list[Path]:
    path.write_text("the user's own notes\n", encoding="utf-8")
    return [path]


def _user_dir(path: Path) -> list[Path]:
    (path / "chapter1").mkdir(parents=True)
    (path / "chapter1" / "draft.md").write_text("# the user's own work\n", encoding="utf-8")
    (path / "data.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    return [path]


def _text(d: Path, name: str, text: str) -> Path:
    (d / name).write_text(text, encoding="utf-8")
    return d / name


def _no_artifact(path: Path) -> bool:
    return not path.exists() and not list(path.parent.glob(f".{path.name}.tmp-*")) if path.parent.exists() \
        else True


def _snapshot(paths: list[Path]) -> dict[str, bytes | None]:
    """Every file under `paths` with its bytes (directories by their entries): what must not change."""
    out: dict[str, bytes | None] = {}
    for root in paths:
        for p in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            out[str(p)] = p.read_bytes() if p.is_file() else None if p.is_dir() else b"<absent>"
    return out


def _replace_flags(base: list[str], extra: list[str]) -> list[str]:
    """`base` without the options (and their one value) that `extra` gives again."""
    given = {a for a in extra if a.startswith("-")}
    out, skip = [], False
    for a in base:
        if skip:
            skip = False
            continue
        if a in given:
            skip = True
            continue
        out.append(a)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_error_line_exit_2_and_no_artifact(case: Case, env, tmp_path, capsys, monkeypatch):
    overrides = case.make(tmp_path) if case.make else {}
    config = tmp_path / "config.yaml"
    if case.raw is None:
        config.write_text(yaml.safe_dump(_deep_merge(_deep_merge(BASE, overrides), case.config)), encoding="utf-8")
    else:
        config.write_bytes(case.raw.encode() if isinstance(case.raw, str) else case.raw)
    for k, v in case.env.items():
        monkeypatch.setenv(k, v)
    user = case.user(tmp_path) if case.user else []
    before = _snapshot(user)
    stage_args, artifacts = _stage_args(case.stage, env, tmp_path)
    extra = case.args(env, tmp_path)
    stage_args = _replace_flags(stage_args, extra)  # a case's own --policy, -o, ... replace the stage's default
    if case.stage == "evaluate" and "--policy" not in extra:
        extra += ["--policy", str(env["policy"])]
    if case.stage == "grpo_update" and "--rollouts" not in extra:
        extra += ["--rollouts", str(env["dir"] / "rollouts-ok.parquet")]
    config_args = [] if "--config" in extra else ["--config", str(config)]
    capsys.readouterr()
    code = cli.main([*case.command.split(), *config_args, *stage_args, *extra])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == case.code, (code, captured.err[-2000:])
    assert len(lines) == 1, captured.err
    line = lines[0]
    assert line.startswith("error: "), line
    for w in case.words:
        assert w in line, (w, line)
    assert "Traceback" not in captured.err and captured.out.strip() == ""
    for a in artifacts:
        assert _no_artifact(a), a
    assert _snapshot(user) == before, "the user's files changed"
    if case.secret:
        assert case.secret not in captured.err + captured.out
    RESULTS[case.id] = (case.input, re.sub(r"(?<![\w.])/tmp/(?:[^\s/'\"\]]+/)+", "<tmp>/", line))


def test_readme_table_lists_every_kind():
    """The README table has one row per kind (regenerated from the runs above on demand)."""
    if os.environ.get("KFP_GRPO_WRITE_SNIPPET"):
        assert len(RESULTS) == len(CASES), "run the whole file to regenerate the table"
        rows = ["| # | kind | input | what the user sees (stderr; exit code 2, 1 where a remote endpoint failed) |",
                "|---|---|---|---|"]
        for i, c in enumerate(CASES, 1):
            inp, line = RESULTS[c.id]
            if len(line) > 400:  # transformers' list of every supported config class
                line = f"{line[:400]}… [{len(line) - 400} more characters]"
            rows.append(f"| {i} | `{c.id}` | {inp} (`kfp-grpo {c.command}`) | `{line.replace('|', '¦')}` |")
        text = SNIPPET.read_text(encoding="utf-8") if SNIPPET.exists() else f"{BEGIN}\n{END}\n"
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        SNIPPET.write_text(f"{head}{BEGIN}\n" + "\n".join(rows) + f"\n{END}{tail}", encoding="utf-8")
    table = SNIPPET.read_text(encoding="utf-8").split(BEGIN, 1)[1].split(END, 1)[0]
    for c in CASES:
        assert f"`{c.id}`" in table, f"{c.id} missing from {SNIPPET.name}; regenerate with KFP_GRPO_WRITE_SNIPPET=1"
    assert len(CASES) >= 60
