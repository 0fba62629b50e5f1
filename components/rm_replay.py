"""Stage: reward-model replay retraining (the last step of each outer iteration).

Fresh policy samples (every round of the iteration) are labelled by the task's verifier;
the RM continues training from its last weights on them plus a fraction (default 10%)
of the replay history (the RM's original data and every earlier iteration's samples).
The history with this iteration's samples added is written out for the next iteration.
The RM's pairwise accuracy on held-out fresh samples is measured before and after
retraining: the gap is the staleness that retraining removes.
"""

from __future__ import annotations

import pandas as pd

from components import tracking
from components.config import Config
from components.artifacts import as_paths, read_rollouts
from components.io import distinct_outputs, read_parquet, write_parquet
from components.modeling import load_reward_model, save_model
from components.reward_model import RM_COLUMNS, fit, make_pairs, pairwise_accuracy, split_by_prompt, step_metrics
from components.seeds import derived_seed
from components.stage_cli import stage_main

FRESH_HELDOUT = 0.2


def fresh_samples(rollouts: pd.DataFrame, iteration: int) -> pd.DataFrame:
    """Rollouts as RM rows labelled by the verifier (1 correct, 0 not), deduplicated."""
    rows = pd.DataFrame({"prompt_id": rollouts.id.astype(str), "prompt": rollouts.prompt,
                         "completion": rollouts.completion, "label": rollouts.correct.astype(float),
                         "origin": f"policy-iter{iteration}"})
    return rows.drop_duplicates(["prompt_id", "completion"]).reset_index(drop=True)


def run(cfg: Config, rollouts: str | list[str], reward_model: str, history: str | list[str], new_reward_model: str,
        buffer: str, iteration: int = 0) -> dict:
    """Retrain r_φ (the directory `reward_model`) on the iteration's rollouts + replayed history.

    `rollouts`: the iteration's rollout tables (every round); `history`: the replay history so
    far (the RM's initial data and every earlier iteration's samples). Writes the retrained RM
    to `new_reward_model` and the history with this iteration's samples added to `buffer`.
    """
    distinct_outputs(new_reward_model=new_reward_model, buffer=buffer)
    fresh = fresh_samples(read_rollouts(rollouts, ("id", "prompt", "completion", "correct")), iteration)
    earlier = [read_parquet(p, "replay history", RM_COLUMNS)[RM_COLUMNS] for p in as_paths(history)]
    historical = pd.concat(earlier, ignore_index=True) if earlier else pd.DataFrame(columns=RM_COLUMNS)
    replayed = historical.sample(frac=cfg.replay.historical_fraction,
                                 random_state=derived_seed(cfg.seed + iteration))
    fresh_train, fresh_held = split_by_prompt(fresh, FRESH_HELDOUT, cfg.seed + iteration)
    train = pd.concat([fresh_train, replayed], ignore_index=True)
    held_pairs = make_pairs(fresh_held, cfg.seed)
    rm, tok = load_reward_model(reward_model, cfg.model)
    max_len = cfg.reward_model.max_length
    before = pairwise_accuracy(rm, tok, held_pairs, max_len)
    process = cfg.reward_model.objective == "process"  # a PRM: its step verdicts on the fresh held-out samples too
    steps_before = step_metrics(rm, tok, fresh_held, max_len) if process else None
    if make_pairs(train, cfg.seed) or cfg.reward_model.objective in ("pointwise", "process"):
        fit(rm, tok, train, cfg, cfg.replay.steps, cfg.replay.lr, cfg.replay.batch_size, "rm_replay")
    else:
        print("[rm_replay] no (correct, incorrect) pair in the buffer: the reward model is kept as it was")
    after = pairwise_accuracy(rm, tok, held_pairs, max_len)
    metrics = {"replay/fresh_samples": len(fresh), "replay/replayed_samples": len(replayed),
               "replay/train_samples": len(train), "replay/history_size": len(historical) + len(fresh),
               "replay/heldout_pairs": len(held_pairs),
               "replay/rm_accuracy_before": before, "replay/rm_accuracy_after": after,
               "replay/fresh_correct_fraction": float(fresh.label.mean())}
    if steps_before is not None:
        steps_after = step_metrics(rm, tok, fresh_held, max_len)
        metrics.update({"replay/prm_step_auc_before": steps_before["step_auc"],
                        "replay/prm_step_auc_after": steps_after["step_auc"], "replay/heldout_steps": steps_after["steps"]})
    tracking.log_metrics(metrics, step=iteration)
    print(f"[rm_replay] iteration {iteration}: RM accuracy on fresh held-out pairs {before:.3f} → {after:.3f} "
          f"({len(held_pairs)} pairs; trained on {len(fresh_train)} fresh + {len(replayed)} replayed samples)",
          flush=True)
    save_model(rm, tok, new_reward_model)
    write_parquet(pd.concat([historical, fresh], ignore_index=True), buffer)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main(run, "Retrain the reward model on fresh policy samples + replayed history.", {
        "rollouts": "the iteration's rollout tables (Parquet, every round)",
        "reward_model": "current reward model directory",
        "history": "the replay history so far (Parquet: the RM's data, earlier iterations' samples)",
        "new_reward_model": "output: the retrained reward model directory",
        "buffer": "output: Parquet of the replay history with this iteration's samples",
        "iteration": "outer iteration (seeds the held-out split of fresh samples)"}, argv)


if __name__ == "__main__":
    raise SystemExit(main())
