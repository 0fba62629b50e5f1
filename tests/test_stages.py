"""Every stage's run() and CLI on tiny real inputs: real HF models, real Parquet, no mocks.

The stages are chained the way the pipeline chains them: prepare_data (the session
`data_dir` fixture) → sft → reward_model → rollout → grpo_update → rm_replay, and
evaluate on the session's SFT-trained tiny policy.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from components import evaluate, grpo_update, prepare_data, reward_model, rm_replay, rollout, sft
from components.artifacts import OPTIMIZER_FILE
from components.config import _deep_merge
from components.distributed import Context
from components.generation import make_backend
from components.io import MARKER, OutputPathError, atomic_path, write_json, write_parquet
from components.modeling import initial_policy, load_policy, load_reward_model, save_model
from components.rewards import extract_answer, format_reward, is_correct, normalize_number, reference_completion
from tests.conftest import FAST, fast_config

ROOT = Path(__file__).resolve().parent.parent
ROLLOUT_COLUMNS = ["prompt", "completion", "completion_ids", "sampler_logprobs", "reward", "reward_rm",
                   "reward_correct", "reward_format", "correct", "advantage", "group", "policy_version",
                   "finish_reason", "temperature"]
TEMPS = (0.6, 1.2)
WEIGHTS = {"rm_weight": 0.3, "correctness_weight": 1.0, "format_weight": 0.2}


def no_artifact(path: Path) -> bool:
    """Neither the artifact nor a temporary sibling of it exists."""
    return not path.exists() and not list(path.parent.glob(f".{path.name}.tmp-*"))


def state_dict_of(model_dir: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(model_dir).state_dict()


# =========================================================================== fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stages")


@pytest.fixture(scope="module")
def sft_result(data_dir, work):
    out = work / "sft"
    metrics = sft.run(fast_config(), str(data_dir / "train.parquet"), str(out))
    return out, metrics


@pytest.fixture(scope="module")
def rm_result(data_dir, sft_result, work):
    out, data_out = work / "rm", work / "rm.parquet"
    metrics = reward_model.run(fast_config(), str(data_dir / "train.parquet"), str(sft_result[0]), str(out),
                               str(data_out))
    return out, data_out, metrics


@pytest.fixture(scope="module")
def rollout_cfg():
    return fast_config(rollout={"temperature_range": list(TEMPS)}, reward=WEIGHTS)


@pytest.fixture(scope="module")
def rollout_result(rollout_cfg, data_dir, trained_policy, rm_result, work):
    out = work / "rollout.parquet"
    metrics = rollout.run(rollout_cfg, str(data_dir / "train.parquet"), str(trained_policy), str(rm_result[0]),
                          str(out), step=3, policy_version="1.2")
    return out, metrics


@pytest.fixture(scope="module")
def update1(rollout_cfg, rollout_result, trained_policy, work):
    out = work / "policy-1"
    metrics = grpo_update.run(rollout_cfg, [str(rollout_result[0])], str(trained_policy), None, str(out), step=0)
    return out, metrics


# =========================================================================== sft
def _mean_sft_loss(model, tok, df, cfg) -> float:
    examples = sft.build_examples(tok, df.head(64), cfg)
    with torch.no_grad():
        return float(model(**sft.lm_batch(examples, tok.pad_token_id)).loss)


def test_prepare_data_output_is_the_prompt_table(data_dir):
    train = pd.read_parquet(data_dir / "train.parquet")
    test = pd.read_parquet(data_dir / "test.parquet")
    assert list(train.columns) == ["id", "prompt", "answer", "solution"]
    assert (len(train), len(test)) == (FAST["data"]["num_train"], FAST["data"]["num_test"])
    assert not set(train.prompt) & set(test.prompt)


def test_sft_writes_an_hf_dir_and_the_loss_goes_down(data_dir, sft_result):
    out, metrics = sft_result
    cfg = fast_config()
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not list(out.parent.glob(".sft.tmp-*"))
    assert metrics["sft/examples"] == FAST["data"]["num_train"]
    df = pd.read_parquet(data_dir / "train.parquet")
    init_model, init_tok = initial_policy(cfg.model, cfg.seed)  # what SFT started from
    trained = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    before, after = _mean_sft_loss(init_model, init_tok, df, cfg), _mean_sft_loss(trained, tok, df, cfg)
    assert math.isfinite(metrics["sft/final_loss"])
    assert after < 0.6 * before, (before, after)
    assert metrics["sft/final_loss"] < 0.6 * before


def test_sft_continues_from_an_init_dir(data_dir, sft_result, work):
    out = work / "sft-continued"
    cfg = fast_config(sft={"steps": 2, "warmup_steps": 0})
    sft.run(cfg, str(data_dir / "train.parquet"), str(out), init=str(sft_result[0]))
    df = pd.read_parquet(data_dir / "train.parquet")
    first, tok = load_policy(str(sft_result[0]))
    second, _ = load_policy(str(out))
    # started from the SFT weights, not from a fresh tiny model: the loss stays low
    assert _mean_sft_loss(second, tok, df, cfg) < 1.5 * _mean_sft_loss(first, tok, df, cfg)
    assert any(not torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


# =========================================================================== reward model
def test_reward_model_writes_a_scalar_classifier_and_its_data(data_dir, rm_result):
    out, data_out, metrics = rm_result
    assert 0.0 <= metrics["rm/heldout_accuracy"] <= 1.0
    assert math.isfinite(metrics["rm/final_loss"])
    # a standard HF sequence classifier with one output, opened without project code
    assert (out / "model.safetensors").is_file()
    rm = AutoModelForSequenceClassification.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert rm.config.num_labels == 1 and tok.chat_template
    assert rm.config.architectures == ["LlamaForSequenceClassification"]
    ids = tok(reward_model.rm_text(tok, "What is 1 + 2?", "<answer>3</answer>"), return_tensors="pt",
              add_special_tokens=False)
    with torch.no_grad():
        assert rm(**ids).logits.shape == (1, 1)
    # the RM data table: per prompt, its reference answer (label 1) and wrong answers (label 0)
    data = pd.read_parquet(data_out)
    assert list(data.columns) == reward_model.RM_COLUMNS
    train = pd.read_parquet(data_dir / "train.parquet").set_index("id")
    assert set(data.prompt_id) == set(train.index)
    assert len(data) == len(train) * (1 + fast_config().reward_model.negatives_per_prompt)
    for row in data.itertuples(index=False):
        answer = train.answer[row.prompt_id]
        assert row.prompt == train.prompt[row.prompt_id]
        assert is_correct(row.completion, answer) == (row.label == 1.0)
    assert (data.groupby("prompt_id").label.sum() == 1).all()
    assert metrics["rm/examples"] < len(data)  # held-out prompts are not trained on


def test_reward_model_pointwise_objective(data_dir, sft_result, work):
    cfg = fast_config(reward_model={"objective": "pointwise", "steps": 3})
    m = reward_model.run(cfg, str(data_dir / "train.parquet"), str(sft_result[0]), str(work / "rm-pw"),
                         str(work / "rm-pw.parquet"))
    assert 0.0 <= m["rm/heldout_accuracy"] <= 1.0 and math.isfinite(m["rm/final_loss"])
    assert load_reward_model(str(work / "rm-pw"))[0].config.num_labels == 1


# =========================================================================== rollout
def test_rollout_table_columns_and_shape(rollout_cfg, rollout_result, data_dir, trained_policy):
    out, metrics = rollout_result
    df = pd.read_parquet(out)
    tok = AutoTokenizer.from_pretrained(trained_policy)
    eos = tok.eos_token_id
    rc = rollout_cfg.rollout
    G, B = rc.group_size, rc.prompts_per_step
    assert set(ROLLOUT_COLUMNS) <= set(df.columns)
    assert len(df) == B * G
    assert (df.policy_version == "1.2").all()
    prompts = pd.read_parquet(data_dir / "train.parquet").set_index("id")
    for g, grp in df.groupby("group", sort=False):
        assert len(grp) == G and grp.prompt.nunique() == 1
        assert grp.index.tolist() == list(range(grp.index[0], grp.index[0] + G))  # consecutive
    assert df.group.nunique() == B
    assert (df.prompt == prompts.prompt[df.id].to_numpy()).all()
    assert df.finish_reason.isin(["stop", "length"]).all()
    for row in df.itertuples(index=False):
        ids = list(row.completion_ids)
        assert 1 <= len(ids) <= rc.max_new_tokens
        assert len(row.sampler_logprobs) == len(ids)
        assert all(lp <= 1e-6 and math.isfinite(lp) for lp in row.sampler_logprobs)
        assert (row.finish_reason == "stop") == (ids[-1] == eos)
        assert eos not in ids[:-1]
        assert row.completion == tok.decode(ids, skip_special_tokens=True)
        if row.finish_reason == "length":
            assert len(ids) == rc.max_new_tokens
    assert 0.0 <= metrics["rollout/accuracy"] <= 1.0
    assert metrics["rollout/accuracy"] == pytest.approx(df.correct.mean())


def test_rollout_temperature_schedule(rollout_cfg, rollout_result):
    df = pd.read_parquet(rollout_result[0])
    G = rollout_cfg.rollout.group_size
    lo, hi = TEMPS
    want = [lo + (hi - lo) * k / G for k in range(G)]
    assert want == pytest.approx([0.6, 0.75, 0.9, 1.05])
    got = df.temperature.to_numpy().reshape(-1, G)
    np.testing.assert_allclose(got, np.tile(want, (len(got), 1)), rtol=0, atol=1e-12)


def test_rollout_sampler_logprobs_are_those_of_the_tempered_policy(rollout_cfg, rollout_result, trained_policy):
    """Each sample index k was drawn from softmax(logits / τ_k): its log-probs say so."""
    df = pd.read_parquet(rollout_result[0])
    model = AutoModelForCausalLM.from_pretrained(trained_policy).eval()
    tok = AutoTokenizer.from_pretrained(trained_policy)
    G = rollout_cfg.rollout.group_size
    for i in list(range(G)) + [len(df) - 1]:  # one whole group (every τ_k) and the last row
        row = df.iloc[i]
        p = tok(row.prompt_text, add_special_tokens=False).input_ids
        c = list(row.completion_ids)
        with torch.no_grad():
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1 : len(p) - 1 + len(c)]
        want = F.log_softmax(logits / row.temperature, -1).gather(-1, torch.tensor(c).unsqueeze(-1)).squeeze(-1)
        np.testing.assert_allclose(np.asarray(row.sampler_logprobs), want.numpy(), atol=2e-4, rtol=0)
        assert row.temperature == pytest.approx(TEMPS[0] + (TEMPS[1] - TEMPS[0]) * (i % G) / G)


def test_rollout_in_bfloat16_samples_with_bf16_weights_and_the_update_recomputes_pi_old(data_dir, trained_policy,
                                                                                          work):
    """rollout.hf.dtype casts the sampler's weights; its log-probs are then not the float32 policy's, so the
    update takes π_old from its own float32 pass, not from the rollouts."""
    cfg = fast_config(rollout={"hf": {"dtype": "bfloat16"}}, reward={"rm_weight": 0.0})
    assert make_backend("hf", str(trained_policy), cfg.model, cfg.rollout).model.dtype == torch.bfloat16
    out = work / "rollout-bf16.parquet"
    rollout.run(cfg, str(data_dir / "train.parquet"), str(trained_policy), None, str(out))
    rows = pd.read_parquet(out)
    model, tok = load_policy(str(trained_policy), cfg.model)
    assert model.dtype == torch.float32
    ctx = Context.single()
    old = grpo_update._old_logprobs(cfg, model, tok, rows, 16, ctx)
    fp32 = grpo_update._logprobs(model, tok, rows, 16, ctx)
    assert all(torch.equal(a, b) for a, b in zip(old, fp32))
    sampler = [torch.tensor(list(lp)) for lp in rows.sampler_logprobs]
    assert max(float((a - b).abs().max()) for a, b in zip(fp32, sampler)) > 1e-3  # bf16 sampled: not fp32's


def test_rollout_rewards_are_the_weighted_sum_of_their_parts(rollout_result, rm_result):
    df = pd.read_parquet(rollout_result[0])
    w = WEIGHTS
    np.testing.assert_allclose(df.reward, w["rm_weight"] * df.reward_rm + w["correctness_weight"] * df.reward_correct
                               + w["format_weight"] * df.reward_format, rtol=0, atol=1e-9)
    # each part recomputed independently of the stage
    assert (df.reward_correct == [float(is_correct(c, a)) for c, a in zip(df.completion, df.answer)]).all()
    assert (df.correct == (df.reward_correct > 0.5)).all()
    assert (df.reward_format == [format_reward(c) for c in df.completion]).all()
    rm = AutoModelForSequenceClassification.from_pretrained(rm_result[0]).eval()
    tok = AutoTokenizer.from_pretrained(rm_result[0])
    for row in df.head(6).itertuples(index=False):
        text = tok.apply_chat_template([{"role": "user", "content": row.prompt},
                                        {"role": "assistant", "content": row.completion}], tokenize=False)
        with torch.no_grad():
            score = rm(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0]
        want = float(torch.sigmoid(score))  # reward.rm_squash (default): the RM's probability σ(r_φ)
        assert row.reward_rm == pytest.approx(want, abs=1e-4)
    assert df.reward_rm.std() > 0  # the reward model did score them


def test_rollout_advantages_are_group_relative(rollout_cfg, rollout_result):
    df = pd.read_parquet(rollout_result[0])
    G, eps = rollout_cfg.rollout.group_size, rollout_cfg.grpo.advantage.eps
    r = df.reward.to_numpy().reshape(-1, G)
    adv = df.advantage.to_numpy().reshape(-1, G)
    want = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + eps)  # population std
    want[(r == r[:, :1]).all(1)] = 0.0
    np.testing.assert_allclose(adv, want, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(adv.sum(1), 0.0, atol=1e-6)
    assert np.abs(adv).max() > 0.1


def test_rollout_all_equal_groups_get_exactly_zero_advantage(data_dir, untrained_policy, work):
    """An untrained policy never answers correctly: with only the correctness reward every group ties."""
    cfg = fast_config(reward={"rm_weight": 0, "correctness_weight": 1.0, "format_weight": 0},
                      rollout={"prompts_per_step": 4, "max_new_tokens": 4})
    out = work / "rollout-ties.parquet"
    m = rollout.run(cfg, str(data_dir / "train.parquet"), str(untrained_policy), None, str(out))
    df = pd.read_parquet(out)
    assert len(df) == 4 * cfg.rollout.group_size
    assert (df.reward == 0.0).all() and (df.reward_rm == 0.0).all()
    assert (df.advantage == 0.0).all() and not df.advantage.isna().any()
    assert m["rollout/zero_variance_groups"] == 1.0
    assert (df.temperature == cfg.rollout.temperature).all()  # no schedule configured


# =========================================================================== grpo_update
def _adam_step(policy_dir: Path) -> float:
    state = torch.load(policy_dir / OPTIMIZER_FILE, weights_only=True)["state"]
    steps = {float(s["step"]) for s in state.values()}
    assert len(steps) == 1
    return steps.pop()


def test_grpo_update_writes_a_new_policy_and_optimizer_state(rollout_cfg, update1, trained_policy):
    out, metrics = update1
    n_rows = rollout_cfg.rollout.prompts_per_step * rollout_cfg.rollout.group_size
    opt_steps = math.ceil(n_rows / rollout_cfg.grpo.minibatch_size) * rollout_cfg.grpo.epochs
    assert metrics["update/optimizer_steps"] == opt_steps
    assert all(math.isfinite(v) for v in metrics.values())
    assert (out / "model.safetensors").is_file() and (out / OPTIMIZER_FILE).is_file()
    before, after = state_dict_of(trained_policy), state_dict_of(out)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, changed
    assert _adam_step(out) == opt_steps
    assert metrics["update/kl"] >= 0 and 0 <= metrics["update/clip_fraction"] <= 1
    # the policy dir still opens with plain HF tools (optimizer.pt is ignored by them)
    AutoTokenizer.from_pretrained(out).apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)


def test_grpo_update_continues_the_optimizer_state(rollout_cfg, rollout_result, update1, work):
    first, m1 = update1
    out = work / "policy-2"
    m2 = grpo_update.run(rollout_cfg, [str(rollout_result[0])], str(first), None, str(out), step=1)
    assert _adam_step(out) == m1["update/optimizer_steps"] + m2["update/optimizer_steps"]
    s1 = torch.load(first / OPTIMIZER_FILE, weights_only=True)
    s2 = torch.load(out / OPTIMIZER_FILE, weights_only=True)
    assert s2["param_groups"][0]["lr"] == rollout_cfg.grpo.lr
    assert any(not torch.equal(s1["state"][k]["exp_avg_sq"], s2["state"][k]["exp_avg_sq"]) for k in s1["state"])
    assert any(not torch.equal(a, b) for a, b in zip(state_dict_of(first).values(), state_dict_of(out).values()))


def test_grpo_update_reference_is_used_when_beta_positive(rollout_cfg, rollout_result, trained_policy,
                                                          untrained_policy, work):
    """The KL term is measured against the reference given: ≈ 0 when it is the policy itself, large
    against another model. A tiny lr keeps the policy where it is, so the test does not depend on
    how far one optimizer step moves it (on high-temperature samples of rare tokens one step at a
    useful lr can already move the k3 estimate by ~1)."""
    still = rollout_cfg.model_copy(update={"grpo": rollout_cfg.grpo.model_copy(update={"lr": 1e-9})})
    rollouts = [str(rollout_result[0])]
    far = grpo_update.run(still, rollouts, str(trained_policy), str(untrained_policy), str(work / "p-far"))
    near = grpo_update.run(still, rollouts, str(trained_policy), str(trained_policy), str(work / "p-near"))
    assert near["update/kl"] < 1e-4
    assert far["update/kl"] > 0.1


def test_grpo_update_beta_zero_needs_no_reference(rollout_cfg, rollout_result, trained_policy, work):
    missing = work / "no-such-reference"
    cfg = rollout_cfg.model_copy(update={"grpo": rollout_cfg.grpo.model_copy(update={"beta": 0.0})})
    m = grpo_update.run(cfg, [str(rollout_result[0])], str(trained_policy), str(missing), str(work / "p-beta0"))
    assert (work / "p-beta0" / "model.safetensors").is_file()
    assert m["update/kl"] == 0.0
    # with β > 0 the same missing reference is an error naming it
    from components.modeling import ModelLoadError

    with pytest.raises(ModelLoadError, match=str(missing)):
        grpo_update.run(rollout_cfg, [str(rollout_result[0])], str(trained_policy), str(missing),
                        str(work / "p-beta-missing"))
    assert no_artifact(work / "p-beta-missing")


def test_grpo_update_max_kl_aborts_without_output(rollout_result, trained_policy, work):
    cfg = fast_config(grpo={"max_kl": 1e-9, "epochs": 2, "lr": 1e-3})
    out = work / "p-diverged"
    with pytest.raises(grpo_update.DivergenceError, match=r"grpo\.max_kl=1e-09"):
        grpo_update.run(cfg, [str(rollout_result[0])], str(trained_policy), None, str(out))
    assert no_artifact(out)


def test_grpo_update_max_kl_does_not_overwrite_a_previous_policy(rollout_result, update1, work):
    """A diverged update leaves the artifact at its output path as it was."""
    out = work / "p-kept"
    save_model(*load_policy(str(update1[0])), out)
    before = (out / "model.safetensors").read_bytes()
    cfg = fast_config(grpo={"max_kl": 1e-9, "epochs": 2, "lr": 1e-3})
    with pytest.raises(grpo_update.DivergenceError):
        grpo_update.run(cfg, [str(rollout_result[0])], str(update1[0]), None, str(out))
    assert (out / "model.safetensors").read_bytes() == before
    assert not list(work.glob(".p-kept.tmp-*"))


# =========================================================================== rm_replay
def _synthetic_rollouts(data_dir: Path, n_prompts: int = 20) -> pd.DataFrame:
    """Rollouts with 2 correct and 2 wrong completions per prompt (plus a duplicate row)."""
    prompts = pd.read_parquet(data_dir / "test.parquet").head(n_prompts)
    rows = []
    for r in prompts.itertuples(index=False):
        wrong = str(int(r.answer) + 1), str(int(r.answer) + 7)
        for text, ok in [(reference_completion(r.answer), True), (f"<think>add</think><answer>{r.answer}</answer>", True),
                         (reference_completion(wrong[0]), False), (f"{wrong[1]}", False)]:
            rows.append({"id": r.id, "prompt": r.prompt, "completion": text, "correct": ok})
    rows.append(dict(rows[0]))  # a duplicate sample is counted once
    return pd.DataFrame(rows)


def test_rm_replay_retrains_on_fresh_plus_historical_samples(data_dir, rm_result, work):
    rollouts = work / "replay-rollouts.parquet"
    write_parquet(_synthetic_rollouts(data_dir), rollouts)
    history = pd.read_parquet(rm_result[1])
    out, buf = work / "rm-replayed", work / "buffer.parquet"
    m = rm_replay.run(fast_config(), [str(rollouts)], str(rm_result[0]), [str(rm_result[1])], str(out), str(buf),
                      iteration=1)
    for key in ("replay/rm_accuracy_before", "replay/rm_accuracy_after"):
        assert 0.0 <= m[key] <= 1.0, m
    assert m["replay/heldout_pairs"] == 16  # 4 held-out prompts × (2 correct × 2 wrong)
    assert m["replay/fresh_samples"] == 80
    assert m["replay/replayed_samples"] == round(0.1 * len(history))
    assert m["replay/train_samples"] == 64 + round(0.1 * len(history))  # 16 of 20 prompts' fresh samples + replay
    # the buffer is the whole replay history with this iteration's samples added
    b = pd.read_parquet(buf)
    assert list(b.columns) == reward_model.RM_COLUMNS
    fresh, old = b[b.origin == "policy-iter1"], b[b.origin != "policy-iter1"]
    assert len(fresh) == 80 and len(b) == m["replay/history_size"] == 80 + len(history)
    assert set(fresh.label) == {0.0, 1.0} and fresh.label.mean() == 0.5
    assert not fresh.duplicated(["prompt_id", "completion"]).any()
    key = ["prompt_id", "completion", "label"]
    assert len(old.merge(history, on=key)) == len(old) == len(history)
    # the reward model was retrained: new weights, still a scalar classifier
    before = AutoModelForSequenceClassification.from_pretrained(rm_result[0]).state_dict()
    after = AutoModelForSequenceClassification.from_pretrained(out).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_rm_replay_historical_fraction_is_honoured(data_dir, rm_result, work):
    rollouts = work / "replay-rollouts-2.parquet"
    write_parquet(_synthetic_rollouts(data_dir, 10), rollouts)
    history = pd.read_parquet(rm_result[1])
    cfg = fast_config(replay={"historical_fraction": 0.5, "steps": 0})
    buf = work / "buffer-half.parquet"
    m = rm_replay.run(cfg, [str(rollouts)], str(rm_result[0]), [str(rm_result[1]), str(rm_result[1])],
                      str(work / "rm-half"), str(buf))
    assert m["replay/replayed_samples"] == round(0.5 * 2 * len(history))
    assert len(pd.read_parquet(buf)) == m["replay/history_size"] == 40 + 2 * len(history)
    none = fast_config(replay={"historical_fraction": 0.0, "steps": 0})
    m0 = rm_replay.run(none, [str(rollouts)], str(rm_result[0]), [str(rm_result[1])], str(work / "rm-none"),
                       str(work / "buffer-none.parquet"))
    assert m0["replay/replayed_samples"] == 0 and m0["replay/train_samples"] == 32  # 8 of 10 prompts × 4
    # no training steps: the accuracy is unchanged
    assert m0["replay/rm_accuracy_before"] == m0["replay/rm_accuracy_after"]


# =========================================================================== evaluate
@pytest.fixture(scope="module")
def eval_set(trained_test_set, work) -> Path:
    out = work / "eval.parquet"
    write_parquet(pd.read_parquet(trained_test_set).head(100), out)
    return out


def test_evaluate_trained_beats_untrained(eval_set, trained_policy, untrained_policy, work):
    cfg = fast_config()
    trained = evaluate.run(cfg, str(eval_set), str(trained_policy), str(work / "eval-trained.json"),
                           str(work / "eval-trained.parquet"))
    untrained = evaluate.run(cfg, str(eval_set), str(untrained_policy))
    assert trained["eval/num_prompts"] == untrained["eval/num_prompts"] == 100
    assert trained["eval/accuracy"] > untrained["eval/accuracy"]
    assert trained["eval/accuracy"] >= 0.1 and untrained["eval/accuracy"] <= 0.02
    assert json.loads((work / "eval-trained.json").read_text()) == pytest.approx({**trained, "kfp_grpo": 1})
    samples = pd.read_parquet(work / "eval-trained.parquet")
    assert len(samples) == 100
    assert (samples.correct == [is_correct(c, a) for c, a in zip(samples.completion, samples.answer)]).all()
    assert samples.correct.mean() == pytest.approx(trained["eval/accuracy"])
    well_formed = [format_reward(c) == 1.0 for c in samples.completion]
    assert trained["eval/format"] == pytest.approx(sum(well_formed) / len(well_formed))
    assert trained["eval/format"] > untrained["eval/format"]


def test_evaluate_majority_vote(eval_set, trained_policy):
    cfg = fast_config(evaluation={"maj_k": 3, "maj_temperature": 0.7})
    m = evaluate.run(cfg, str(eval_set), str(trained_policy))
    assert set(m) == {"eval/accuracy", "eval/format", "eval/num_prompts", "eval/maj@3"}
    assert 0.0 < m["eval/maj@3"] <= 1.0
    assert "eval/maj@3" not in evaluate.run(fast_config(), str(eval_set), str(trained_policy))


def test_majority_helper():
    assert evaluate.majority(["3", None, "4", "4", "3"]) == "3"  # tie: first seen
    assert evaluate.majority(["5", "4", "4"]) == "4"
    assert evaluate.majority([None, None]) is None
    assert evaluate.majority([extract_answer("<answer>07</answer>")]) == normalize_number("7")


# =========================================================================== CLI: bad inputs
def _json(**overrides) -> str:
    return json.dumps(_deep_merge(FAST, overrides))


def _one_error_line(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.mark.parametrize("overrides, words", [
    ({"rollout": {"group_size": 1}}, ["rollout.group_size"]),
    ({"grpo": {"beta": -0.5}}, ["grpo.beta"]),
    ({"grpo": {"eps_low": 0}}, ["grpo.eps_low"]),
    ({"grpo": {"bogus": 1}}, ["grpo.bogus", "unknown key"]),
    ({"rollout": {"temperature_range": [0, 1]}}, ["rollout.temperature_range"]),
])
def test_cli_invalid_config_exit_2(capsys, data_dir, trained_policy, rm_result, tmp_path, overrides, words):
    train, test = str(data_dir / "train.parquet"), str(data_dir / "test.parquet")
    out = tmp_path / "out"
    cj = _json(**overrides)
    calls = [
        (sft.main, ["--train", train, "--model", str(out)]),
        (reward_model.main, ["--train", train, "--policy", str(trained_policy), "--reward-model", str(out),
                             "--rm-data", str(tmp_path / "d.parquet")]),
        (rollout.main, ["--prompts", train, "--policy", str(trained_policy), "--rollouts", str(out)]),
        (grpo_update.main, ["--rollouts", train, "--policy", str(trained_policy), "--new-policy", str(out)]),
        (rm_replay.main, ["--rollouts", train, "--reward-model", str(rm_result[0]), "--history", str(rm_result[1]),
                          "--new-reward-model", str(out), "--buffer", str(tmp_path / "b.parquet")]),
        (evaluate.main, ["--test", test, "--policy", str(trained_policy), "--out", str(out)]),
    ]
    for main, args in calls:
        assert main(["--config-json", cj, *args]) == 2, main.__module__
        _one_error_line(capsys, *words)
        assert no_artifact(out) and no_artifact(tmp_path / "d.parquet") and no_artifact(tmp_path / "b.parquet")


def test_cli_config_file_errors(capsys, data_dir, tmp_path):
    out = tmp_path / "sft"
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpo:\n  beta: -1\n  eps_low: 0\nrollout: {group_size: 1}\n")
    assert sft.main(["--config", str(bad), "--train", str(data_dir / "train.parquet"), "--model", str(out)]) == 2
    _one_error_line(capsys, str(bad), "grpo.beta", "grpo.eps_low", "rollout.group_size")
    broken = tmp_path / "broken.yaml"
    broken.write_text("sft: {steps: [\n  1,\n")
    assert sft.main(["--config", str(broken), "--train", str(data_dir / "train.parquet"), "--model", str(out)]) == 2
    _one_error_line(capsys, str(broken), "not valid YAML")
    missing = tmp_path / "missing.yaml"
    assert sft.main(["--config", str(missing), "--train", str(data_dir / "train.parquet"), "--model", str(out)]) == 2
    _one_error_line(capsys, "config file not found", str(missing))
    assert no_artifact(out)


def test_cli_missing_model_dirs(capsys, data_dir, trained_policy, rollout_result, rm_result, tmp_path):
    train, test = str(data_dir / "train.parquet"), str(data_dir / "test.parquet")
    missing = str(tmp_path / "no-such-model")
    out = tmp_path / "out"
    cj = _json()
    calls = [
        (sft.main, ["--train", train, "--init", missing, "--model", str(out)]),
        (reward_model.main, ["--train", train, "--policy", missing, "--reward-model", str(out),
                             "--rm-data", str(tmp_path / "d.parquet")]),
        (rollout.main, ["--prompts", train, "--policy", missing, "--rollouts", str(out)]),
        (rollout.main, ["--prompts", train, "--policy", str(trained_policy), "--reward-model", missing,
                        "--rollouts", str(out)]),
        (rm_replay.main, ["--rollouts", str(rollout_result[0]), "--reward-model", missing, "--history",
                          str(rm_result[1]), "--new-reward-model", str(out), "--buffer", str(tmp_path / "b.parquet")]),
        (evaluate.main, ["--test", test, "--policy", missing, "--out", str(out)]),
    ]
    for main, args in calls:
        assert main(["--config-json", cj, *args]) == 2, (main.__module__, args)
        _one_error_line(capsys, missing)
        assert no_artifact(out) and no_artifact(tmp_path / "d.parquet") and no_artifact(tmp_path / "b.parquet")


def test_cli_unloadable_model_dirs(capsys, data_dir, untrained_policy, tmp_path):
    """A dir without config.json, and one with only pickle (.bin) weights (refused by default)."""
    model, tok = load_policy(str(untrained_policy))
    pickled = tmp_path / "pickled"
    save_model(model, tok, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, pickled / "pytorch_model.bin")
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes((untrained_policy / "model.safetensors").read_bytes())
    train, out = str(data_dir / "train.parquet"), tmp_path / "out"
    cj = _json()
    for d in (pickled, no_config):
        calls = [
            (sft.main, ["--train", train, "--init", str(d), "--model", str(out)]),
            (reward_model.main, ["--train", train, "--policy", str(d), "--reward-model", str(out),
                                 "--rm-data", str(tmp_path / "d.parquet")]),
            (rollout.main, ["--prompts", train, "--policy", str(d), "--rollouts", str(out)]),
            (evaluate.main, ["--test", train, "--policy", str(d), "--out", str(out)]),
        ]
        for main, args in calls:
            assert main(["--config-json", cj, *args]) == 2, (main.__module__, d)
            _one_error_line(capsys, str(d))
            assert no_artifact(out) and no_artifact(tmp_path / "d.parquet")


def test_cli_grpo_update_missing_inputs(capsys, rollout_result, trained_policy, tmp_path):
    out = tmp_path / "out"
    missing = str(tmp_path / "no-such-model")
    cj = _json()
    assert grpo_update.main(["--config-json", cj, "--rollouts", str(rollout_result[0]), "--policy", missing,
                             "--new-policy", str(out)]) == 2
    _one_error_line(capsys, missing)
    assert grpo_update.main(["--config-json", cj, "--rollouts", str(rollout_result[0]), "--policy",
                             str(trained_policy), "--reference", missing, "--new-policy", str(out)]) == 2
    _one_error_line(capsys, missing)
    gone = str(tmp_path / "no-rollouts.parquet")
    assert grpo_update.main(["--config-json", cj, "--rollouts", gone, "--policy", str(trained_policy),
                             "--new-policy", str(out)]) == 2
    _one_error_line(capsys, "rollouts not found", gone)
    assert no_artifact(out)


def test_cli_malformed_datasets(capsys, data_dir, trained_policy, rm_result, tmp_path):
    out = tmp_path / "out"
    cj = _json()
    train = pd.read_parquet(data_dir / "train.parquet")
    no_prompt = tmp_path / "no-prompt.parquet"
    write_parquet(train.drop(columns=["prompt"]).head(20), no_prompt)
    not_parquet = tmp_path / "garbage.parquet"
    not_parquet.write_text("this is not parquet")
    empty = tmp_path / "empty.parquet"
    write_parquet(train.head(0), empty)
    rollouts_no_ids = tmp_path / "bad-rollouts.parquet"
    write_parquet(pd.DataFrame({"prompt": ["x"], "completion": ["y"], "reward": [1.0]}), rollouts_no_ids)
    calls = [
        (sft.main, ["--train", str(no_prompt), "--model", str(out)], ["prompt", str(no_prompt)]),
        (sft.main, ["--train", str(not_parquet), "--model", str(out)], ["not a readable Parquet", str(not_parquet)]),
        (sft.main, ["--train", str(empty), "--model", str(out)], ["empty", str(empty)]),
        (reward_model.main, ["--train", str(no_prompt), "--policy", str(trained_policy), "--reward-model", str(out),
                             "--rm-data", str(tmp_path / "d.parquet")], ["prompt", str(no_prompt)]),
        (rollout.main, ["--prompts", str(no_prompt), "--policy", str(trained_policy), "--rollouts", str(out)],
         ["prompt", str(no_prompt)]),
        (evaluate.main, ["--test", str(no_prompt), "--policy", str(trained_policy), "--out", str(out)],
         ["prompt", str(no_prompt)]),
        (evaluate.main, ["--test", str(empty), "--policy", str(trained_policy), "--out", str(out)],
         ["empty", str(empty)]),
        (grpo_update.main, ["--rollouts", str(rollouts_no_ids), "--policy", str(trained_policy), "--new-policy", str(out)],
         ["completion_ids", str(rollouts_no_ids)]),
        (rm_replay.main, ["--rollouts", str(rollouts_no_ids), "--reward-model", str(rm_result[0]), "--history",
                          str(rm_result[1]), "--new-reward-model", str(out), "--buffer", str(tmp_path / "b.parquet")],
         ["id", str(rollouts_no_ids)]),
    ]
    for main, args, words in calls:
        assert main(["--config-json", cj, *args]) == 2, (main.__module__, args)
        _one_error_line(capsys, *words)
        assert no_artifact(out) and no_artifact(tmp_path / "d.parquet") and no_artifact(tmp_path / "b.parquet")


@pytest.fixture(scope="module")
def nan_rm(rm_result, work) -> Path:
    """A reward model whose score head is NaN: every score it gives is NaN."""
    rm, tok = load_reward_model(str(rm_result[0]))
    with torch.no_grad():
        rm.score.weight.fill_(float("nan"))
    out = work / "rm-nan"
    save_model(rm, tok, out)
    return out


def test_cli_nan_reward_exit_2(capsys, data_dir, trained_policy, nan_rm, tmp_path):
    out = tmp_path / "rollouts.parquet"
    rc = rollout.main(["--config-json", _json(rollout={"prompts_per_step": 2}), "--prompts",
                       str(data_dir / "train.parquet"), "--policy", str(trained_policy),
                       "--reward-model", str(nan_rm), "--rollouts", str(out)])
    assert rc == 2
    _one_error_line(capsys, "NaN", "reward")
    assert no_artifact(out)


def test_cli_nan_reward_ignored_when_rm_weight_is_zero(data_dir, trained_policy, nan_rm, tmp_path):
    cfg = fast_config(rollout={"prompts_per_step": 2}, reward={"rm_weight": 0.0})
    rollout.run(cfg, str(data_dir / "train.parquet"), str(trained_policy), str(nan_rm), str(tmp_path / "r.parquet"))
    assert np.isfinite(pd.read_parquet(tmp_path / "r.parquet").reward).all()


def test_cli_success_prints_metrics_json(capsys, eval_set, trained_policy, tmp_path):
    out = tmp_path / "metrics.json"
    assert evaluate.main(["--config-json", _json(), "--test", str(eval_set), "--policy", str(trained_policy),
                          "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out[captured.out.index("{"):])
    assert {**printed, "kfp_grpo": 1} == json.loads(out.read_text())
    assert captured.err == ""


def _run_module(stage: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", f"components.{stage}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_python_m_stage_bad_config_exit_2(data_dir, trained_policy, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout: {group_size: 1}\ngrpo: {beta: -0.1, eps_low: 0}\n")
    out = tmp_path / "rollouts.parquet"
    res = _run_module("rollout", "--config", str(bad), "--prompts", str(data_dir / "train.parquet"),
                      "--policy", str(trained_policy), "--rollouts", str(out))
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "rollout.group_size" in lines[0] and "grpo.beta" in lines[0] and "grpo.eps_low" in lines[0]
    assert "Traceback" not in res.stderr
    assert no_artifact(out)


def test_cli_usage_errors_are_argparse_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        sft.main(["--model", "x"])  # --train missing
    assert info.value.code == 2
    assert "--train" in capsys.readouterr().err


# =========================================================================== atomic writes
def test_atomic_dir_keeps_the_previous_artifact_when_the_body_raises(tmp_path):
    final = tmp_path / "model"
    with atomic_path(final) as tmp:
        (tmp / "weights").write_text("v1")
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in final.iterdir()) == [MARKER, "config.json", "weights"]
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(final) as tmp:
            (tmp / "weights").write_text("v2-partial")
            assert not final.samefile(tmp)
            raise RuntimeError("boom")
    assert (final / "weights").read_text() == "v1" and (final / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp left behind


def test_atomic_dir_replaces_completely_on_success(tmp_path):
    final = tmp_path / "model"
    with atomic_path(final) as tmp:
        (tmp / "old-only").write_text("v1")
        (tmp / "shared").write_text("v1")
    with atomic_path(final) as tmp:
        (tmp / "shared").write_text("v2")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "new").write_text("v2")
        assert (final / "old-only").exists()  # the old artifact stays readable until the rename
    assert sorted(str(p.relative_to(final)) for p in final.rglob("*")) == [MARKER, "shared", "sub", "sub/new"]
    assert (final / "shared").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_atomic_file_and_stale_temporaries(tmp_path):
    final = tmp_path / "metrics.json"
    write_json({"a": 1}, final)
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(final, is_dir=False) as tmp:
            tmp.write_text("partial")
            raise KeyboardInterrupt
    assert json.loads(final.read_text()) == {"a": 1, "kfp_grpo": 1}
    # a stage killed half-way leaves a .tmp- sibling; the next attempt removes it
    stale_dir = tmp_path / ".metrics.json.tmp-deadbeef"
    stale_dir.mkdir()
    (stale_dir / "x").write_text("junk")
    (tmp_path / ".metrics.json.tmp-cafebabe").write_text("junk")
    write_json({"a": 2}, final)
    assert json.loads(final.read_text()) == {"a": 2, "kfp_grpo": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    # the body's failure never creates the artifact when there was none
    with pytest.raises(ValueError):
        with atomic_path(tmp_path / "new.parquet", is_dir=False):
            raise ValueError("bad input")
    assert no_artifact(tmp_path / "new.parquet")


def test_outputs_never_replace_what_kfp_grpo_did_not_write(tmp_path, data_dir):
    """A user's directory or file at an output path is refused with one line and left as it was;
    what this project wrote there before (marker / Parquet metadata / JSON key) is replaced."""
    user_dir = tmp_path / "results"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("my other results")
    user_file = tmp_path / "mine.parquet"
    pd.DataFrame({"x": [1]}).to_parquet(user_file)
    before = user_file.read_bytes()
    for out in (user_dir, user_file):
        with pytest.raises(OutputPathError, match="did not write"):
            prepare_data.run(fast_config(), str(out), str(tmp_path / "test.parquet"))
    assert (user_dir / "notes.txt").read_text() == "my other results" and user_file.read_bytes() == before
    assert no_artifact(tmp_path / "test.parquet")
    with pytest.raises(OutputPathError, match="same path"):
        prepare_data.run(fast_config(), str(tmp_path / "a.parquet"), str(tmp_path / "a.parquet"))
    assert no_artifact(tmp_path / "a.parquet")
    # our own outputs are replaced on a second run
    for _ in range(2):
        prepare_data.run(fast_config(), str(tmp_path / "train.parquet"), str(tmp_path / "test.parquet"))
    with atomic_path(tmp_path / "model") as tmp:
        (tmp / "weights").write_text("v1")
    with atomic_path(tmp_path / "model") as tmp:
        (tmp / "weights").write_text("v2")
    assert (tmp_path / "model" / "weights").read_text() == "v2"


def test_tracked_stages_log_their_data_sets_and_sample_completions(cfg, data_dir, trained_policy, mlflow_uri,
                                                                   tmp_path):
    """Inside an MLflow run, prepare_data records the train/test tables as the run's input data sets and each
    rollout round logs a table of sample completions (two groups) that `mlflow.load_table` reads back."""
    import mlflow

    from components import prepare_data

    mlflow.set_tracking_uri(mlflow_uri)
    with mlflow.start_run() as prep:
        prepare_data.run(cfg, str(tmp_path / "train.parquet"), str(tmp_path / "test.parquet"))
    with mlflow.start_run() as roll:
        rollout.run(cfg, str(data_dir / "train.parquet"), str(trained_policy), None, str(tmp_path / "r.parquet"), step=2)
    inputs = mlflow.get_run(prep.info.run_id).inputs.dataset_inputs
    contexts = {d.dataset.name: next(t.value for t in d.tags if t.key == "mlflow.data.context") for d in inputs}
    assert contexts == {"train": "training", "test": "evaluation"}
    assert {d.dataset.name: json.loads(d.dataset.profile)["num_rows"] for d in inputs} == {
        "train": cfg.data.num_train, "test": cfg.data.num_test}
    table = mlflow.load_table("samples/round_002.json", run_ids=[roll.info.run_id])
    rows = pd.read_parquet(tmp_path / "r.parquet").head(2 * cfg.rollout.group_size)
    assert table.completion.tolist() == rows.completion.tolist()
    assert table.reward.tolist() == pytest.approx(rows.reward.tolist())
