"""In-process iterative GRPO on the tiny default (used by the end-to-end learning test).

This is Algorithm 1 wired by hand with the stage functions, the way the KFP pipeline
wires them with artifacts: data → SFT → RM → I × (M × (rollout → update) → RM replay
→ evaluate).
"""

from __future__ import annotations

import time
from pathlib import Path

from components import evaluate, grpo_update, prepare_data, reward_model, rm_replay, rollout, sft
from components.config import Config


def run_loop(cfg: Config, work: Path) -> dict:
    t0 = time.perf_counter()
    train, test = str(work / "train.parquet"), str(work / "test.parquet")
    prepare_data.run(cfg, train, test)
    sft.run(cfg, train, str(work / "sft"))
    sft_acc = evaluate.run(cfg, test, str(work / "sft"))["eval/accuracy"]
    reward_model.run(cfg, train, str(work / "sft"), str(work / "rm0"), str(work / "rm0.parquet"))
    policy, ref, rm, history = str(work / "sft"), str(work / "sft"), str(work / "rm0"), [str(work / "rm0.parquet")]
    accs, step = [], 0
    for it in range(cfg.loop.iterations):
        ref = policy if cfg.grpo.reference == "iteration" else str(work / "sft")
        rollouts = []
        for m in range(cfg.loop.steps_per_iteration):
            out = str(work / f"rollout-{it}-{m}.parquet")
            rollout.run(cfg, train, policy, rm, out, step=step, policy_version=f"{it}.{m}")
            new_policy = str(work / f"policy-{it}-{m}")
            grpo_update.run(cfg, [out], policy, ref, new_policy, step=step)
            policy, step = new_policy, step + 1
            rollouts.append(out)
        rm_replay.run(cfg, rollouts, rm, history, str(work / f"rm{it + 1}"), str(work / f"buffer{it + 1}.parquet"), it)
        rm, history = str(work / f"rm{it + 1}"), history + [str(work / f"buffer{it + 1}.parquet")]
        accs.append(evaluate.run(cfg, test, policy, step=it)["eval/accuracy"])
    return {"sft_accuracy": sft_acc, "accuracies": accs, "seconds": time.perf_counter() - t0, "policy": policy}
