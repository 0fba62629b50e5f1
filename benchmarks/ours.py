"""Side A: kfp-grpo's stages, in process — one round = `rollout.run` + `grpo_update.run`.

The stages are called as the pipeline calls them (policy directory in, new policy directory
out, so a round includes the model loads/saves and Parquet I/O the stages do; seeded as a
pipeline task is; π_ref wired as `pipelines.plan` wires it: the policy at the start of each
iteration, or the SFT model). The phases of a round are the stages' own timings, read from
the metrics they return — nothing is patched:

    generate   rollout/seconds_generate   tokenise + sample + decode
    score      rollout/seconds_score      rewards + group advantages
    logprobs   update/seconds_logprobs    no-grad π_old / π_ref forward passes
    train      update/seconds_train       loss forward/backward + optimizer steps
    io         rollout/seconds_io + update/seconds_io   model/optimizer load + save, Parquet

Whatever a round spends outside those (the rest of the stage calls) is reported as `other`.

    python -m benchmarks.ours --spec '<json>' --paths '<json>' --out ours.json --work DIR [--until N]
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from benchmarks.common import PHASES, SideLog, Spec, cpu_seconds, fresh_dir, heldout_accuracy, param_count, \
    setup_torch, side_main, write_json


def round_tokens(tok, rollout_path: str) -> dict[str, int]:
    """Completion and prompt tokens of one round's rollouts (counted outside the clock)."""
    import pandas as pd

    df = pd.read_parquet(rollout_path, columns=["prompt_text", "completion_ids"])
    completion = int(sum(len(x) for x in df.completion_ids))
    lengths = {t: len(tok(t, add_special_tokens=False).input_ids) for t in set(df.prompt_text)}
    prompt = int(sum(lengths[t] for t in df.prompt_text))
    return {"completion_tokens": completion, "prompt_tokens": prompt, "rows": len(df)}


def stage_phases(rollout_metrics: dict, update_metrics: dict, kind: str) -> dict[str, float]:
    """A round's phases from the metrics the two stages returned (`kind`: "seconds" or "cpu_seconds")."""
    both = {**rollout_metrics, **update_metrics}
    out = {p: both.get(f"rollout/{kind}_{p}", 0.0) + both.get(f"update/{kind}_{p}", 0.0) for p in PHASES}
    missing = [p for p in PHASES if f"rollout/{kind}_{p}" not in both and f"update/{kind}_{p}" not in both]
    if missing:
        raise KeyError(f"the stages did not report {kind} for phase(s) {missing}")
    return out


def run(spec: Spec, paths: dict, out: str, work: str, until: int | None = None) -> dict:
    """Rounds up to `until` (default all). When `out` holds an unfinished run, continue it: the
    orchestrator may split this side around the TRL run (A-B-A) so both see the same mean machine load."""
    import pandas as pd

    cfg = spec.cfg
    setup_torch(cfg.torch_threads)
    from components import grpo_update, rollout
    from components.modeling import load_policy, load_tokenizer
    from pipelines.runtime import seed_everything

    previous = json.loads(Path(out).read_text()) if Path(out).exists() else None
    if previous is None or previous["done"]:
        previous = None
        fresh_dir(work)
    test = pd.read_parquet(paths["test"])
    sft = paths["sft"]
    log = SideLog("kfp-grpo", spec, paths["sft_accuracy"], previous)
    policy, reference = (previous["policy"], previous["reference"]) if previous else (sft, sft)
    n_params = previous["n_params"] if previous else param_count(load_policy(sft, cfg.model)[0])
    tok = load_tokenizer(sft)
    per_iteration = cfg.loop.steps_per_iteration

    def evaluate() -> float:
        model, t = load_policy(policy, cfg.model)
        return heldout_accuracy(model, t, test, cfg)

    end = min(until or spec.rounds, spec.rounds)
    for r in range(len(log.rounds), end):
        if r % per_iteration == 0:  # a new outer iteration: π_ref as pipelines.plan wires it
            reference = policy if cfg.grpo.reference == "iteration" else sft
        roll, new = str(Path(work) / f"rollout-{r}.parquet"), str(Path(work) / f"policy-{r}")
        w0, c0 = time.perf_counter(), cpu_seconds()
        seed_everything(cfg.seed)
        rm = rollout.run(cfg, paths["train"], policy, None, roll, step=r,
                         policy_version=f"{r // per_iteration}.{r % per_iteration}")
        w1, c1 = time.perf_counter(), cpu_seconds()
        seed_everything(cfg.seed)
        um = grpo_update.run(cfg, [roll], policy, reference, new, step=r)
        w2, c2 = time.perf_counter(), cpu_seconds()
        _prune(work, keep={new, reference})
        policy = new
        stats = {"rollout_stage_wall": w1 - w0, "update_stage_wall": w2 - w1,
                 "rollout_stage_cpu": c1 - c0, "update_stage_cpu": c2 - c1,
                 "reward_mean": rm["rollout/reward_mean"], "rollout_accuracy": rm["rollout/accuracy"],
                 "kl": um["update/kl"], "clip_fraction": um["update/clip_fraction"],
                 "optimizer_steps": um["update/optimizer_steps"]}
        log.add_round(w2 - w0, c2 - c0, stage_phases(rm, um, "seconds"), stage_phases(rm, um, "cpu_seconds"),
                      round_tokens(tok, roll), stats, evaluate)
        Path(roll).unlink()
    result = log.result(n_params=n_params, policy=policy, reference=reference, done=end == spec.rounds)
    write_json(result, out)
    return result


def _prune(work: str, keep: set[str]) -> None:
    """Delete the policy directories of earlier rounds that no later round reads."""
    for d in Path(work).glob("policy-*"):
        if str(d) not in keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    side_main(run, with_until=True)
