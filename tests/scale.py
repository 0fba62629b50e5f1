"""Shared by the GPU-scale tests (torchrun/FSDP, truncated IS, vLLM, TrainJob): the update's
config, rollouts with synthetic group-relative advantages, weight comparisons, GPU/vLLM marks.
The fixtures built from these (`scale_work`, `scale_rollouts`, `round1`) live in conftest.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from components.grpo import group_advantages
from components.modeling import load_policy
from tests.conftest import fast_config

ROOT = Path(__file__).resolve().parent.parent
NO_GPU = "requires GPU (not lent to this task)"
NO_VLLM = "vLLM not installed (CPU API check: bash tests/install_vllm_api.sh; PYTHONPATH=.vllm-api pytest -m vllm_api)"


def has_vllm() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
gpu_vllm = pytest.mark.skipif(not (torch.cuda.is_available() and has_vllm()), reason=NO_GPU + " and the gpu extra")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="requires 2 GPUs (not lent to this task)")



GRPO = {"minibatch_size": 31, "lr": 1e-3, "beta": 0.04, "loss_agg": "token"}


def update_cfg(**grpo):
    """Rollouts of 8 prompts × 4; the update: 31 + 1 outputs per step (the 1-output step leaves a rank empty)."""
    return fast_config(grpo={**GRPO, **grpo})


def synthetic_advantages(path: Path, seed: int = 0) -> None:
    """The untrained policy earns no reward (all advantages 0): give the rows seeded group-relative ones."""
    df = pd.read_parquet(path)
    r = np.random.default_rng(seed).random(len(df))
    df["reward"] = r
    df["advantage"] = group_advantages(torch.tensor(r), fast_config().rollout.group_size).numpy()
    df.to_parquet(path, index=False)


def state(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_policy(str(model_dir))[0].state_dict().items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)

