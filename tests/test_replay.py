"""Reward-model replay: the RM trained on the policy's own samples, the RM as the reward, the staleness
and agreement metrics of every iteration, and the reward-hacking monitor — through the real plan
(`pipelines.inprocess`, real MLflow in a temp dir, a tiny real model)."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest

from components import monitor
from components.artifacts import read_rollouts
from components.config import ConfigError, parse_config
from components.reward_model import policy_rm_data, ranking_agreement
from components.rewards import format_reward, rewards_for
from tests.conftest import fast_config


# --------------------------------------------------------------------------- pure pieces
def test_reward_kind_picks_the_terms():
    completions, answers = ["<answer>5</answer>", "<answer>6</answer>"], ["5", "5"]
    scores = np.array([-3.0, 3.0])  # the RM prefers the wrong one
    mixed = rewards_for(parse_config({"reward": {"rm_weight": 0.2}}), completions, answers, scores).reward
    rm = rewards_for(parse_config({"reward": {"kind": "rm"}}), completions, answers, scores).reward
    ver = rewards_for(parse_config({"reward": {"kind": "verifier"}}), completions, answers, scores).reward
    assert mixed[0] > mixed[1]  # the verifier dominates the mixed reward
    assert rm[1] > rm[0]  # the RM alone decides: the wrong answer wins
    assert rm.tolist() == pytest.approx([0.5 / (1 + np.exp(3)) + 0.1, 0.5 / (1 + np.exp(-3)) + 0.1])
    assert ver.tolist() == pytest.approx([1.1, 0.1])


def test_reward_kind_is_validated():
    with pytest.raises(ConfigError, match="reward.*rm_weight"):
        parse_config({"reward": {"kind": "rm", "rm_weight": 0}})
    with pytest.raises(ConfigError, match="reward.*correctness_weight"):
        parse_config({"reward": {"kind": "verifier", "correctness_weight": 0}})
    with pytest.raises(ConfigError, match="reward.kind"):
        parse_config({"reward": {"kind": "learned"}})


def test_process_reward_model_config_is_validated():
    """A reward kind with an RM term under process supervision scores steps: it needs a PRM; a PRM needs the
    policy's own worked solutions. Each refusal names the keys to set."""
    with pytest.raises(ConfigError, match="grpo.supervision 'process' with reward.kind 'mixed'.*reward_model.objective"):
        parse_config({"grpo": {"supervision": "process"}})
    with pytest.raises(ConfigError, match="reward_model.*objective 'process'.*policy_samples"):
        parse_config({"reward_model": {"objective": "process"}})
    parse_config({"grpo": {"supervision": "process"}, "reward": {"kind": "verifier"}})
    cfg = parse_config({"grpo": {"supervision": "process"}, "reward": {"kind": "rm"},
                        "reward_model": {"objective": "process", "policy_samples": 4}})
    assert cfg.reward_model.objective == "process"
    parse_config({"reward_model": {"objective": "pairwise+pointwise"}})


def test_ranking_agreement_counts_pairs_within_groups():
    # group 0: correct 2.0 vs wrong 1.0 (agree) and 3.0 (disagree); group 1: no correct one
    acc, pairs = ranking_agreement([2.0, 1.0, 3.0, 5.0, 0.0], [True, False, False, False, False], [0, 0, 0, 1, 1])
    assert (acc, pairs) == (0.5, 2)
    acc, pairs = ranking_agreement([1.0, 1.0], [True, False], [0, 0])
    assert (acc, pairs) == (0.5, 1)  # a tie is half an agreement
    acc, pairs = ranking_agreement([1.0], [True], [0])
    assert np.isnan(acc) and pairs == 0


def test_monitor_flags_reward_up_while_accuracy_falls():
    flagged, why = monitor.reward_hacking([0.3, 0.4, 0.5, 0.6], [0.3, 0.25, 0.2, 0.15])
    assert flagged and "REWARD HACKING" in why
    assert not monitor.reward_hacking([0.3, 0.4, 0.5, 0.6], [0.3, 0.35, 0.4, 0.5])[0]  # both rise: learning
    assert not monitor.reward_hacking([0.6, 0.5, 0.4, 0.3], [0.3, 0.25, 0.2, 0.15])[0]  # both fall
    assert not monitor.reward_hacking([0.3], [0.3])[0]


def test_policy_rm_data_is_labelled_by_the_verifier(trained_policy, trained_test_set):
    cfg = fast_config(reward_model={"policy_samples": 4})
    prompts = pd.read_parquet(trained_test_set).head(20)
    data = policy_rm_data(cfg, prompts, str(trained_policy))
    answers = dict(zip(prompts.id.astype(str), prompts.answer))
    from components.rewards import is_correct

    assert len(data) > 20 and set(data.origin) == {"policy"}
    assert data.label.tolist() == [float(is_correct(c, answers[i])) for c, i in zip(data.completion, data.prompt_id)]
    assert 0 < data.label.mean() < 1  # the trained policy is right sometimes, not always
    assert not data.duplicated(["prompt_id", "completion"]).any()


@pytest.mark.parametrize("objective", ["pairwise+pointwise", "process"])
def test_reward_model_objectives_train_and_report(objective, trained_policy, trained_test_set, tmp_path):
    """The reward-model stage with both losses, and as a PRM on completions without steps (the default task: the
    whole completion is its one step), trains on the policy's samples and reports its held-out accuracy."""
    import math

    from components import reward_model

    cfg = fast_config(reward_model={"objective": objective, "steps": 5, "policy_samples": 4, "sample_prompts": 30})
    m = reward_model.run(cfg, str(trained_test_set), str(trained_policy), str(tmp_path / "rm"), str(tmp_path / "d"))
    assert math.isfinite(m["rm/final_loss"]) and m["rm/policy_examples"] > 0 and 0 <= m["rm/heldout_accuracy"] <= 1
    assert ("rm/heldout_step_auc" in m) == (objective == "process")


def test_process_supervision_refuses_an_outcome_reward_model_for_its_steps(data_dir, untrained_policy, tmp_path):
    """A reward model trained pairwise (or registered before objectives were recorded) cannot give step rewards:
    the rollout stage names the model and what to set, instead of scoring step prefixes with it."""
    from components import reward_model, rollout

    reward_model.run(fast_config(), str(data_dir / "train.parquet"), str(untrained_policy), str(tmp_path / "rm"),
                     str(tmp_path / "rm_data"))
    cfg = fast_config(grpo={"supervision": "process"}, reward={"kind": "rm"},
                      reward_model={"objective": "process", "policy_samples": 2})
    with pytest.raises(ValueError, match=r"rm is not a process reward model \(trained with objective pairwise\)"
                                         r".*reward_model.objective process"):
        rollout.run(cfg, str(data_dir / "train.parquet"), str(untrained_policy), str(tmp_path / "rm"),
                    str(tmp_path / "rollouts"))
    assert not (tmp_path / "rollouts").exists()


# --------------------------------------------------------------------------- through the plan
LEARNS = {"sft": {"steps": 300, "lr": 1e-3}, "reward_model": {"policy_samples": 4, "sample_prompts": 100},
          "rollout": {"prompts_per_step": 24}, "loop": {"iterations": 2, "steps_per_iteration": 1}}


def _parent_history(result: dict, key: str) -> list[tuple[int, float]]:
    c = mlflow.MlflowClient(result["tracking_uri"])
    return sorted((m.step, m.value) for m in c.get_metric_history(result["parent_run_id"], key))


def test_rm_as_reward_through_the_plan_logs_staleness_every_iteration(tmp_path):
    """reward.kind rm: the policy's reward is σ(r_φ) + format only (the verifier only labels); every iteration
    logs the RM's accuracy on the new policy's samples before/after retraining and its agreement with the
    verifier on the MLflow run; the monitor's verdict is on the run and in the result."""
    from pipelines.inprocess import run_in_process

    cfg = fast_config(**LEARNS, reward={"kind": "rm", "rm_weight": 1.0})
    result = run_in_process(cfg, tmp_path / "work")
    res = result["results"]
    assert res["reward-model"]["rm/policy_examples"] > 0
    for i in range(2):
        rollouts = read_rollouts(str(tmp_path / "work" / f"rollout-i{i}-m0" / "rollouts"))
        expected = 1.0 * rollouts.reward_rm + 0.1 * rollouts.completion.map(format_reward)
        assert rollouts.reward.to_numpy() == pytest.approx(expected.to_numpy())
        assert rollouts.reward_rm.nunique() > 1  # really scored by the RM
        assert res[f"rm-replay-i{i}"]["replay/heldout_pairs"] > 0
    for key in ("replay/rm_accuracy_before", "replay/rm_accuracy_after", "rollout/rm_agreement"):
        history = _parent_history(result, key)
        assert [s for s, _ in history] == [0, 1], (key, history)
        assert all(0 <= v <= 1 for _, v in history)
    c = mlflow.MlflowClient(result["tracking_uri"])
    run = c.get_run(result["parent_run_id"])
    assert run.data.metrics["monitor/reward_hacking"] in (0.0, 1.0)
    assert run.data.tags["reward_hacking"] == res["promote"]["reward_hacking_reason"]
    assert "rounds" in res["promote"]["reward_hacking_reason"]


def test_verifier_reward_scores_nothing_of_the_rm_into_the_reward(tmp_path):
    from pipelines.inprocess import run_in_process

    cfg = fast_config(**{**LEARNS, "loop": {"iterations": 1, "steps_per_iteration": 1}}, reward={"kind": "verifier"})
    result = run_in_process(cfg, tmp_path / "work")
    rollouts = read_rollouts(str(tmp_path / "work" / "rollout-i0-m0" / "rollouts"))
    expected = rollouts.reward_correct + 0.1 * rollouts.reward_format
    assert rollouts.reward.to_numpy() == pytest.approx(expected.to_numpy())
    assert rollouts.reward_rm.nunique() > 1  # still scored, for the agreement monitor
    assert "rollout/rm_agreement" in result["results"]["rollout-i0-m0"]


def test_replay_benchmark_smoke(tmp_path):
    """`python -m benchmarks.replay --smoke`: the four variants from one SFT model and RM, per-iteration rows,
    the report, and one MLflow parent run per variant in the benchmark's store."""
    import json

    from benchmarks import replay

    assert replay.main(["--smoke", "--seeds", "0", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "replay.json").read_text())
    runs = res["per_seed"]["0"]
    assert set(runs) == set(replay.VARIANTS)
    assert all(len(e["iterations"]) == 2 for e in runs.values())
    assert len({e["sft"] for e in runs.values()}) == 1 and len({json.dumps(e["rm_initial"]) for e in runs.values()}) == 1
    md = (tmp_path / "replay.md").read_text()
    assert md.count("| (a) RM frozen |") == 3 and "## Goals" in md  # 2 iterations + the summary over seeds
    sup = res["supervision"]["0"]  # part 2: outcome vs process supervision on the multi-step task
    assert set(sup) == {"outcome", "process", "process-prm"}
    assert sup["outcome"]["sft"] == sup["process"]["sft"] == sup["process-prm"]["sft"]
    assert sup["process-prm"]["rm_initial"] != sup["process"]["rm_initial"]  # its own (process) reward model
    assert all(len(e["iterations"]) == 2 for e in sup.values()) and "Outcome vs process" in md
    c = mlflow.MlflowClient(res["tracking_uri"])
    parents = {r.info.run_id for r in c.search_runs([c.get_experiment_by_name("kfp-grpo-replay-bench").experiment_id])
               if "mlflow.parentRunId" not in r.data.tags}
    assert parents == {e["run_id"] for e in runs.values()} | {e["run_id"] for e in sup.values()}


# --------------------------------------------------------------------------- process supervision
def test_step_labels_follow_the_first_mistake():
    from components.rewards import step_labels

    good = "<think>37 + 48 = 85\n85 + 12 = 97</think><answer>97</answer>"
    assert [v for _, v in step_labels(good, "97")] == [1.0, 1.0, 1.0]
    carry = "<think>37 + 48 = 75\n75 + 12 = 87</think><answer>87</answer>"  # the second step holds, on a wrong value
    assert [v for _, v in step_labels(carry, "97")] == [0.0, 0.0, 0.0]
    late = "<think>37 + 48 = 85\n85 + 12 = 96</think><answer>96</answer>"
    assert [v for _, v in step_labels(late, "97")] == [1.0, 0.0, 0.0]
    assert [v for _, v in step_labels("<answer>97</answer>", "97")] == [1.0]


def test_process_advantages_reach_the_loss_token_by_token():
    """Rollout's per-token advantages (grpo.process_advantages over the verifier's step rewards) become the
    update's [N, T] advantages, and the loss's gradient on each token follows its own advantage: the tokens of
    a wrong step get a lower advantage than those of the right step before it."""
    import torch

    from components.grpo import grpo_loss
    from components.grpo_update import _tensors
    from components.modeling import build_tiny_tokenizer
    from components.rollout import process_token_advantages

    tok = build_tiny_tokenizer()
    texts = ["<think>1 + 2 = 3\n3 + 4 = 8</think><answer>8</answer>",   # right step, then a wrong one
             "<think>1 + 2 = 3\n3 + 4 = 7</think><answer>7</answer>"]
    ids = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in texts]
    rows = pd.DataFrame({"completion": texts, "completion_ids": ids, "answer": ["7", "7"]})
    token_adv, step_metrics = process_token_advantages(tok, rows, 2, 1e-4)
    assert step_metrics == {"rollout/step_accuracy": pytest.approx(4 / 6)}
    first_step_end = ids[0].index(tok.convert_tokens_to_ids("\n"))
    wrong, right = token_adv
    assert wrong[first_step_end + 1] < wrong[first_step_end] and wrong[0] == wrong[first_step_end]
    assert min(right) > max(wrong[:-1]) and wrong[-1] == right[-1] == 0.0  # EOS: after the last step

    rows = rows.assign(prompt_text=["q", "q"], sampler_logprobs=[[0.0] * len(i) for i in ids], advantage=[0.0, 0.0],
                       token_advantages=token_adv)
    t = _tensors(tok, rows, torch.device("cpu"))
    assert t["advantages"].shape == t["completion_ids"].shape
    logp = torch.zeros(t["advantages"].shape, requires_grad=True)
    loss, _ = grpo_loss(logp, logp.detach(), None, t["advantages"], t["completion_mask"], beta=0.0)
    loss.backward()
    n = t["completion_mask"].sum(-1, keepdim=True)
    assert torch.allclose(-logp.grad * 2 * n, t["advantages"] * t["completion_mask"], atol=1e-5)


MULTISTEP = {"data": {"num_train": 400, "num_test": 40, "arithmetic": {"num_operations": 2}},
             "sft": {"steps": 300, "lr": 1e-3, "with_reasoning": True},
             "rollout": {"max_new_tokens": 32, "prompts_per_step": 8}, "evaluation": {"max_new_tokens": 32},
             "grpo": {"supervision": "process", "minibatch_size": 16, "lr": 1e-4}, "reward": {"kind": "verifier"},
             "loop": {"iterations": 1, "steps_per_iteration": 2}}


@pytest.fixture(scope="module")
def multistep_run(tmp_path_factory):
    """One in-process run of the plan on the multi-step task with process supervision (the verifier's step
    labels): (work directory, result). Its SFT policy writes worked solutions, some steps right, some wrong."""
    from pipelines.inprocess import run_in_process

    work = tmp_path_factory.mktemp("multistep") / "work"
    return work, run_in_process(fast_config(**MULTISTEP), work)


def test_process_supervision_through_the_plan(multistep_run):
    work, result = multistep_run
    rollouts = read_rollouts(str(work / "rollout-i0-m0" / "rollouts"),
                             ("completion", "completion_ids", "token_advantages", "advantage"))
    assert [len(a) for a in rollouts.token_advantages] == [len(i) for i in rollouts.completion_ids]
    assert any(len(set(a[:-1])) > 1 for a in rollouts.token_advantages)  # advantages vary within a completion
    assert rollouts.completion.str.contains(" = ").mean() > 0.5  # the policy writes its steps
    assert 0 <= result["results"]["rollout-i0-m0"]["rollout/step_accuracy"] <= 1
    assert result["results"]["grpo-update-i0-m1"]


def test_step_prefixes_carry_the_verifier_step_labels():
    from components.reward_model import step_prefixes

    data = pd.DataFrame({"prompt_id": ["1", "1"], "prompt": ["q", "q"], "origin": "policy", "label": [0.0, 1.0],
                         "completion": ["<think>37 + 48 = 75\n75 + 12 = 87</think><answer>87</answer>",
                                        "<think>37 + 48 = 85\n85 + 12 = 97</think><answer>97</answer>"]})
    steps = step_prefixes(data)
    assert steps.completion.tolist() == ["<think>37 + 48 = 75\n", "<think>37 + 48 = 75\n75 + 12 = 87</think>",
                                         data.completion[0], "<think>37 + 48 = 85\n",
                                         "<think>37 + 48 = 85\n85 + 12 = 97</think>", data.completion[1]]
    assert steps.label.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]  # the whole completion: its own label


PRM = {"reward": {"kind": "rm", "rm_weight": 1.0},
       "reward_model": {"objective": "process", "policy_samples": 8, "sample_prompts": 200, "steps": 150,
                        "batch_size": 32, "heldout_fraction": 0.25}}


def test_a_learned_prm_scores_right_steps_above_wrong_ones_and_its_scores_become_the_step_rewards(multistep_run,
                                                                                                   tmp_path):
    """reward_model.objective process on the multi-step SFT policy's own worked solutions: on held-out prompts'
    samples, the PRM scores the steps the verifier judges right above the wrong ones; with reward.kind rm under
    process supervision, its scores of each step's prefix are the step rewards the token advantages come from."""
    import torch

    from components import reward_model
    from components.grpo import process_advantages
    from components.modeling import build_tiny_tokenizer, load_reward_model
    from components.rewards import rm_term
    from components.rollout import process_token_advantages, step_scorer

    work, _ = multistep_run
    cfg = fast_config(**{**MULTISTEP, **PRM})
    metrics = reward_model.run(cfg, str(work / "prepare-data" / "train"), str(work / "sft" / "model"),
                               str(tmp_path / "prm"), str(tmp_path / "rm_data"))
    print(f"\nPRM: {metrics['rm/heldout_steps']} held-out steps, right-above-wrong {metrics['rm/heldout_step_auc']:.3f}, "
          f"accuracy {metrics['rm/heldout_step_accuracy']:.3f}; training {metrics['rm/train_seconds']:.0f}s")
    assert metrics["rm/heldout_steps"] >= 100
    assert metrics["rm/heldout_step_auc"] >= 0.7  # measured 0.81 (974 steps)

    rm, rm_tok = load_reward_model(str(tmp_path / "prm"))
    tok = build_tiny_tokenizer()
    texts = ["<think>1 + 2 = 3\n3 + 4 = 8</think><answer>8</answer>",   # right step, then a wrong one
             "<think>1 + 2 = 3\n3 + 4 = 7</think><answer>7</answer>"]
    ids = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in texts]
    rows = pd.DataFrame({"prompt": ["What is 1 + 2 + 4?"] * 2, "completion": texts, "completion_ids": ids,
                         "answer": ["7", "7"]})
    token_adv, step_metrics = process_token_advantages(tok, rows, 2, 1e-4, step_scorer(cfg, rm, rm_tok), (1.0, 0.0))
    assert 0 <= step_metrics["rollout/prm_step_accuracy"] <= 1
    prefixes = [[t[:t.index("\n") + 1], t[:t.index("<answer>")], t] for t in texts]
    scores = [torch.tensor(rm_term(reward_model.score(rm, rm_tok, rows.prompt[:1].tolist() * 3, p, 64).numpy(), True))
              for p in prefixes]
    ends = [torch.tensor([i.index(tok.convert_tokens_to_ids("\n")), i.index(tok.convert_tokens_to_ids("</think>")),
                          len(i) - 2]) for i in ids]
    expected = process_advantages(scores, ends, [len(i) for i in ids], 1e-4)
    for got, want in zip(token_adv, expected):
        assert got == pytest.approx(want.tolist(), abs=1e-5)
