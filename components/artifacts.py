"""The artifacts the stages hand each other: the rollout table, and the files beside model weights.

The rollout table (Parquet, one row per completion; written by `rollout`, read by
`grpo_update`, `rm_replay` and the pipeline's gathering of shards and rounds):

==================== =====================================================================
``id``                 the prompt's id (prompt table)
``prompt``             the problem text (no chat template)
``answer``             the reference answer (canonical number)
``prompt_text``        the prompt through the chat template: what the policy saw
``completion``         the completion's text
``completion_ids``     its token ids (EOS kept when it stopped on it); never empty
``sampler_logprobs``   the sampler's log-prob of each of those tokens
``temperature``        the temperature it was sampled at
``finish_reason``      "stop" (EOS) or "length"
``group``              which prompt's group of G it belongs to
``reward``             the weighted reward (components/rewards.py), finite
``reward_rm``          s(r_φ), the reward model's part
``reward_correct``     the verifier's part (1/0)
``reward_format``      the format part (1 / 0.5 / 0)
``correct``            the verifier's verdict
``advantage``          Â, finite (process supervision: the mean of the completion's token advantages)
``token_advantages``   process supervision: Â_t for each completion token; empty for outcome supervision
``policy_version``     "iteration.round" of the policy that sampled it
``step``               the global round index
==================== =====================================================================

Beside a policy's weights, `OPTIMIZER_FILE` holds the AdamW state the next round continues;
beside a reward model downloaded from the registry, `BUFFER_FILE` holds its replay history.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from components.io import read_parquet, write_parquet

OPTIMIZER_FILE = "optimizer.pt"
BUFFER_FILE = "replay_buffer.parquet"

ROLLOUT_COLUMNS = ("id", "prompt", "answer", "prompt_text", "completion", "completion_ids", "sampler_logprobs",
                   "temperature", "finish_reason", "group", "reward", "reward_rm", "reward_correct", "reward_format",
                   "correct", "advantage", "token_advantages", "policy_version", "step")
# what the update needs of a table (a hand-made table for `kfp-grpo stage grpo_update` may have only these)
UPDATE_COLUMNS = ("prompt_text", "completion_ids", "sampler_logprobs", "advantage", "reward")


def as_paths(paths: str | Path | list[str]) -> list[str]:
    """One path or several (a round sharded across pods, the rounds of an iteration) as a list."""
    return [str(paths)] if isinstance(paths, (str, Path)) else [str(p) for p in paths]


def write_rollouts(table: pd.DataFrame, path: str | Path) -> None:
    """Write a round's rollout table (atomically); it must have every column of the schema."""
    missing = [c for c in ROLLOUT_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"a rollout table lacks column(s) {missing}")
    write_parquet(table[list(ROLLOUT_COLUMNS)], path)


def read_rollouts(paths: str | Path | list[str], columns: tuple[str, ...] = UPDATE_COLUMNS) -> pd.DataFrame:
    """The rollout tables at `paths` (shards of a round, or rounds) as one table, checked.

    Each must have `columns`; completions must not be empty (no token to learn from: its
    loss would be 0/0) and rewards and advantages must be finite. Errors name the files
    and the first bad row.
    """
    paths = as_paths(paths)
    frames = [read_parquet(p, "rollouts", columns) for p in paths]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    where = ", ".join(paths)
    if table.empty:
        raise ValueError(f"no rollouts in {where}")
    if "completion_ids" in columns:
        empty = [i for i, ids in enumerate(table.completion_ids) if ids is None or len(ids) == 0]
        if empty:
            raise ValueError(f"rollouts {where}: {len(empty)} of {len(table)} completion(s) are empty "
                             f"(no completion tokens), first at row {empty[0]}")
    for col in ("advantage", "reward"):
        if col in columns:
            bad = [i for i, v in enumerate(pd.to_numeric(table[col], errors="coerce")) if not math.isfinite(v)]
            if bad:
                raise ValueError(f"rollouts {where}: {col} is NaN/inf in {len(bad)} row(s), first at row {bad[0]}")
    return table
