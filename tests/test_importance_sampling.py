"""The truncated importance-sampling correction, on rollouts whose sampler log-probs match
(temperature 1) or differ from (temperature 0.7) the trainer's."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from components import grpo_update
from components.config import parse_config
from components.modeling import completion_logprobs, encode_prompts, load_policy, pad_right
from tests.scale import state, update_cfg


# =========================================================================== truncated IS
def update_delta(cfg, rollouts_path: Path, policy: Path, out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    metrics = grpo_update.run(cfg, [str(rollouts_path)], str(policy), None, str(out))
    before, after = state(policy), state(out)
    return metrics, {k: after[k] - before[k] for k in before}


def rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum((a[k] - b[k]).pow(2).sum() for k in a).sqrt()
    return float(num / sum(b[k].pow(2).sum() for k in b).sqrt())


@pytest.mark.parametrize("tau, mismatch", [(1.0, False), (0.7, True)])
def test_importance_sampling_cap_acts_only_on_a_sampler_trainer_mismatch(scale_work, scale_rollouts, untrained_policy, tau,
                                                                         mismatch):
    """Sampler log-probs are those of the tempered distribution: at τ=1 they are the trainer's (up to float
    noise) and the capped IS weight min(π_old/π_behavior, cap) is 1; at τ=0.7 they differ and it reweights."""
    rows = pd.read_parquet(scale_rollouts[tau])
    model, tok = load_policy(str(untrained_policy))
    enc = encode_prompts(tok, rows.prompt_text.tolist())
    ids, mask = pad_right([list(x) for x in rows.completion_ids], tok.pad_token_id)
    with torch.no_grad():
        trainer, _ = completion_logprobs(model, enc["input_ids"], enc["attention_mask"], ids, mask)
    sampler = torch.zeros_like(trainer)
    for i, lp in enumerate(rows.sampler_logprobs):
        sampler[i, : len(lp)] = torch.tensor(list(lp))
    gap = ((trainer - sampler).abs() * mask).sum() / mask.sum()
    assert (gap > 0.05) if mismatch else (gap < 1e-4), float(gap)

    base = dict(minibatch_size=32, beta=0.0, loss_agg="sequence")  # one optimizer step
    plain, d_plain = update_delta(update_cfg(**base), scale_rollouts[tau], untrained_policy, scale_work / f"is-off-{tau}")
    capped, d_capped = update_delta(update_cfg(**base, importance_sampling_cap=2.0), scale_rollouts[tau], untrained_policy,
                                    scale_work / f"is-on-{tau}")
    if mismatch:
        assert capped["update/loss"] != pytest.approx(plain["update/loss"], rel=1e-3)
        assert capped["update/grad_norm"] != pytest.approx(plain["update/grad_norm"], rel=1e-3)
        assert rel_diff(d_capped, d_plain) > 0.1
    else:
        assert capped["update/loss"] == pytest.approx(plain["update/loss"], rel=1e-4, abs=1e-7)
        assert capped["update/grad_norm"] == pytest.approx(plain["update/grad_norm"], rel=1e-4)
        assert rel_diff(d_capped, d_plain) < 1e-3


def test_importance_sampling_is_off_by_default():
    assert parse_config({}).grpo.importance_sampling_cap is None


