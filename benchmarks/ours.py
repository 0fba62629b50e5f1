"""Side A: kfp-grpo's stages, in process — one round = `rollout.run` + `grpo_update.run`.

The stages are called exactly as the pipeline calls them (policy in, new policy
directory out), so a round includes the model loads/saves and Parquet I/O the stages
do. The stage functions are wrapped (not edited) to split each round into phases:

    generate   sampling (tokenise, generate, decode)          rollout stage
    score      rewards + advantages                           rollout stage
    logprobs   no-grad π_old / π_ref forward passes           update stage
    train      loss forward/backward/optimizer steps          update stage
    io         model load/save, Parquet read/write, the rest  both

    python -m benchmarks.ours --spec '<json>' --paths '<json>' --out ours.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from benchmarks.common import Phases, Spec, cpu_seconds, heldout_accuracy, loadavg, ours_config, param_count, \
    setup_torch, update_flops, write_json


def instrument(ph: Phases) -> None:
    """Wrap the stage internals with phase timers (module attributes, looked up at call time)."""
    from components import generation, grpo_update, modeling, rollout

    generation.HFBackend.generate = ph.wrap("generate", generation.HFBackend.generate)
    modeling.load_policy = ph.wrap("load", modeling.load_policy)  # make_backend imports it at call time
    rollout.rewards_for = ph.wrap("score", rollout.rewards_for)
    rollout.write_parquet = ph.wrap("parquet", rollout.write_parquet)
    rollout.read_parquet = ph.wrap("parquet", rollout.read_parquet)
    grpo_update.load_rollouts = ph.wrap("parquet", grpo_update.load_rollouts)
    grpo_update.load_policy = ph.wrap("load", grpo_update.load_policy)
    grpo_update.save_model = ph.wrap("save", grpo_update.save_model)
    logprobs = grpo_update._logprobs

    def counted_logprobs(model, tok, rows, batch_size):
        ph.calls["nograd_rows"] = ph.calls.get("nograd_rows", 0) + len(rows)
        return logprobs(model, tok, rows, batch_size)

    grpo_update._logprobs = ph.wrap("logprobs", counted_logprobs)


def round_tokens(tok, rollout_path: str) -> dict[str, int]:
    """Completion and prompt tokens of one round's rollouts (counted outside the clock)."""
    import pandas as pd

    df = pd.read_parquet(rollout_path, columns=["prompt_text", "completion_ids"])
    completion = int(sum(len(x) for x in df.completion_ids))
    lengths = {t: len(tok(t, add_special_tokens=False).input_ids) for t in set(df.prompt_text)}
    prompt = int(sum(lengths[t] for t in df.prompt_text))
    return {"completion_tokens": completion, "prompt_tokens": prompt, "rows": len(df)}


def run(spec: Spec, paths: dict, out: str, work: str, until: int | None = None) -> dict:
    """Rounds up to `until` (default all). When `out` holds an unfinished run, continue it: the
    orchestrator splits this side around the TRL run (A-B-A) so both see the same mean machine load."""
    import pandas as pd

    setup_torch(spec.threads)
    from components import grpo_update, rollout
    from components.modeling import load_policy

    cfg = ours_config(spec)
    ph = Phases()
    instrument(ph)
    work_dir = Path(work)
    previous = json.loads(Path(out).read_text()) if Path(out).exists() else None
    if previous is None or previous.get("done", True):
        previous = None
        shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir(parents=True)
    test = pd.read_parquet(paths["test"])
    sft = paths["sft"]
    model, tok = load_policy(sft, cfg.model)  # imported before instrument(): not timed
    n_params = param_count(model)
    del model
    policy, clock = sft, 0.0
    curve = [{"round": 0, "wall": 0.0, "accuracy": paths["sft_accuracy"]}]
    rounds: list[dict] = []
    load_start = loadavg()
    if previous:
        rounds, curve, load_start = previous["rounds"], previous["curve"], previous["loadavg_start"]
        policy, clock = previous["policy"], sum(r["wall"] for r in rounds)
    end = min(until or spec.rounds, spec.rounds)
    for r in range(len(rounds), end):
        roll = str(work_dir / f"rollout-{r}.parquet")
        new = str(work_dir / f"policy-{r}")
        ph.take()
        w0, c0 = time.perf_counter(), cpu_seconds()
        rm = rollout.run(cfg, paths["train"], policy, None, roll, step=r, policy_version=str(r))
        w1, c1 = time.perf_counter(), cpu_seconds()
        pr = ph.take()
        um = grpo_update.run(cfg, [roll], policy, sft, new, step=r)
        w2, c2 = time.perf_counter(), cpu_seconds()
        pu = ph.take()
        if policy != sft:
            shutil.rmtree(policy, ignore_errors=True)
        policy = new
        clock += w2 - w0
        rec = {
            "round": r + 1, "wall": w2 - w0, "cpu": c2 - c0,
            "rollout_stage_wall": w1 - w0, "update_stage_wall": w2 - w1,
            "rollout_stage_cpu": c1 - c0, "update_stage_cpu": c2 - c1,
            **round_tokens(tok, roll),
            "nograd_rows": pu["calls"].get("nograd_rows", 0),
            "reward_mean": rm["rollout/reward_mean"], "rollout_accuracy": rm["rollout/accuracy"],
            "kl": um["update/kl"], "clip_fraction": um["update/clip_fraction"],
            "optimizer_steps": um["update/optimizer_steps"],
        }
        for kind in ("wall", "cpu"):
            a, b = pr[kind], pu[kind]
            gen, score, lp = a.get("generate", 0.0), a.get("score", 0.0), b.get("logprobs", 0.0)
            upd_io = sum(b.get(k, 0.0) for k in ("load", "save", "parquet"))
            train = rec[f"update_stage_{kind}"] - lp - upd_io
            io = rec[f"rollout_stage_{kind}"] - gen - score + upd_io
            rec[f"phase_{kind}"] = {"generate": gen, "score": score, "logprobs": lp, "train": train, "io": io}
            rec[f"io_{kind}"] = {k: a.get(k, 0.0) + b.get(k, 0.0) for k in ("load", "save", "parquet")}
        rec["nograd_passes"] = rec["nograd_rows"] / max(rec["rows"], 1)  # full-batch equivalents
        rec["nograd_tokens"] = round((rec["prompt_tokens"] + rec["completion_tokens"])
                                     * rec["nograd_rows"] / max(rec["rows"], 1))
        rounds.append(rec)
        print(f"[bench ours] round {r + 1}/{spec.rounds}: {rec['wall']:.2f}s "
              f"(gen {rec['phase_wall']['generate']:.2f}, logprobs {rec['phase_wall']['logprobs']:.2f}, "
              f"train {rec['phase_wall']['train']:.2f}, io {rec['phase_wall']['io']:.2f})", flush=True)
        if (r + 1) % spec.eval_every == 0 or r + 1 == spec.rounds:
            m, t = load_policy(policy, cfg.model)
            curve.append({"round": r + 1, "wall": clock, "accuracy": heldout_accuracy(m, t, test, spec.eval_max_new_tokens)})
            print(f"[bench ours] held-out accuracy after {r + 1} rounds ({clock:.1f}s): {curve[-1]['accuracy']:.3f}",
                  flush=True)
    result = {"side": "kfp-grpo", "n_params": n_params, "rounds": rounds, "curve": curve, "policy": policy,
              "loadavg_start": load_start, "loadavg_end": loadavg(), "done": end == spec.rounds}
    for rec in rounds:
        rec["update_flops"] = update_flops(n_params, rec["prompt_tokens"] + rec["completion_tokens"],
                                           rec["nograd_tokens"])
    write_json(result, out)
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--spec", required=True)
    p.add_argument("--paths", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--until", type=int, help="stop after this many rounds (continue later with the same --out)")
    a = p.parse_args()
    run(Spec.from_json(a.spec), json.loads(a.paths), a.out, a.work, a.until)


if __name__ == "__main__":
    main()
