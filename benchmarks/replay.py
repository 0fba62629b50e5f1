"""Reward-model replay ablation: does retraining the reward model on fresh policy samples (with 10%
replayed history) keep a policy that optimises the learned reward model honest?

    python -m benchmarks.replay                    # seeds 0,1: four variants each + outcome vs process, in process
    python -m benchmarks.replay --parts replay     # only the replay ablation
    python -m benchmarks.replay --seeds 0 --smoke  # seconds (tests/test_benchmarks.py)

Per seed, one SFT checkpoint and one initial reward model (the run of variant (c) trains them; the
other variants reuse them, `pipelines.inprocess.run_in_process(reuse=...)`), then the loop of the
default config (BENCH below makes it smaller) with the policy optimised against:

(a) `frozen`   the RM as the reward, never retrained (replay.steps 0);
(b) `fresh`    the RM as the reward, retrained on the iteration's samples only (historical_fraction 0);
(c) `replay`   the RM as the reward, retrained on fresh samples + 10% history (the default replay);
(d) `verifier` the verifier as the reward (the upper bound; the RM is still retrained and measured).

Per iteration: the RM's pairwise accuracy on held-out fresh samples of the new policy before and
after retraining, its agreement with the verifier on the rounds' rollouts, the rollout reward and
the verifier's accuracy on the rollouts, and held-out (greedy) accuracy. Every run is an MLflow
parent run in one store (`<out>/replay-work/mlflow.db`, experiment `kfp-grpo-replay-bench`).

Part 2 (`--parts supervision`): outcome vs process supervision (`grpo.supervision`) on the multi-step
task (pipelines/configs/multistep.yaml), the verifier as the reward, one SFT model per seed for both.

Writes benchmarks/results/<date>[-smoke]/replay.{json,md,png}; `--publish` copies the report and plot into
benchmarks/RESULTS.md and benchmarks/plots/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, SMOKE, default_config, fresh_dir, loadavg, machine, machine_line, \
    parse_sets, publish, spread, write_json

# The loop is smaller than the default's (one round per iteration, 128 prompts a round) so that
# 4 variants × 2 seeds fit in minutes on 2 CPU cores; the reward model learns from the SFT policy's
# own samples (8 per prompt, every training prompt) as well as synthetic wrong answers, 1200 steps at
# lr 3e-4 (at 1e-3 it stayed near 0.79 on the policy's held-out pairs; README "Reward-model replay").
BENCH = {
    "rollout": {"prompts_per_step": 128},
    "grpo": {"minibatch_size": 128},
    "reward_model": {"policy_samples": 8, "sample_prompts": 2000, "steps": 1200, "lr": 3e-4},
    "loop": {"iterations": 4, "steps_per_iteration": 1},
    "tracking": {"experiment": "kfp-grpo-replay-bench"},
}
VARIANTS: dict[str, dict[str, Any]] = {
    "replay": {"reward": {"kind": "rm"}},  # first: it trains the SFT model and RM the others reuse
    "frozen": {"reward": {"kind": "rm"}, "replay": {"steps": 0}},
    "fresh": {"reward": {"kind": "rm"}, "replay": {"historical_fraction": 0.0}},
    "verifier": {"reward": {"kind": "verifier"}},
}
SUPERVISION_SMOKE = {"data": {"num_train": 64, "num_test": 16}, "sft": {"steps": 5, "batch_size": 8},
                     "reward_model": {"steps": 2, "batch_size": 8}, "replay": {"steps": 2, "batch_size": 8},
                     "rollout": {"group_size": 4, "prompts_per_step": 4}, "grpo": {"minibatch_size": 8},
                     "loop": {"iterations": 2}}
LABELS = {"frozen": "(a) RM frozen", "fresh": "(b) RM retrained, fresh only", "replay": "(c) RM retrained, fresh + 10% history",
          "verifier": "(d) verifier as the reward"}
SHARED = ("prepare-data", "sft", "evaluate-sft", "reward-model")

# Part 2: outcome vs process supervision on the multi-step task (pipelines/configs/multistep.yaml; the verifier
# as the reward): the same SFT model per seed, the advantage per completion or per token.
MULTISTEP = Path(__file__).resolve().parent.parent / "pipelines" / "configs" / "multistep.yaml"
SUPERVISION: dict[str, dict[str, Any]] = {"outcome": {"grpo": {"supervision": "outcome"}},
                                          "process": {"grpo": {"supervision": "process"}},
                                          # the step rewards from a learned process reward model, retrained each
                                          # iteration on the policy's samples (its own reward-model task)
                                          "process-prm": {"grpo": {"supervision": "process"},
                                                          "reward": {"kind": "rm", "rm_weight": 1.0},
                                                          "reward_model": {"objective": "process", "policy_samples": 8,
                                                                           "sample_prompts": 1000}}}
OWN_REWARD_MODEL = {"process-prm"}  # variants that train their own reward model (the others share the first's)


def variant_config(overrides: dict[str, Any], name: str, seed: int):
    from components.config import _deep_merge

    over = _deep_merge(_deep_merge(overrides, VARIANTS[name]), {"seed": seed, "promote": {
        "model_prefix": f"replay-bench-{name}"}})
    return default_config(over)


def per_iteration(results: dict[str, dict], cfg) -> list[dict[str, float]]:
    """The benchmark's numbers per outer iteration, from the tasks' metrics."""
    rows = []
    for i in range(cfg.loop.iterations):
        rounds = [results[f"rollout-i{i}-m{m}"] for m in range(cfg.loop.steps_per_iteration)]
        replay = results[f"rm-replay-i{i}"]
        mean = lambda k: sum(r.get(k, float("nan")) for r in rounds) / len(rounds)  # noqa: E731
        rows.append({"iteration": i, "rm_before": replay["replay/rm_accuracy_before"],
                     "rm_after": replay["replay/rm_accuracy_after"], "pairs": replay["replay/heldout_pairs"],
                     "agreement": mean("rollout/rm_agreement"), "reward": mean("rollout/reward_mean"),
                     "rollout_accuracy": mean("rollout/accuracy"),
                     "heldout": results[f"evaluate-i{i}"]["eval/accuracy"]})
    return rows


def run_variant(cfg: Any, workdir: Path, shared: tuple[Path, dict[str, dict]] | None,
                label: str) -> tuple[dict[str, Any], float, tuple[Path, dict[str, dict]]]:
    """One variant's run in process in a fresh `workdir`, reusing the SFT model and initial RM of the
    seed's first variant (`shared`); returns its result, its wall seconds and what later variants reuse."""
    from pipelines.inprocess import run_in_process

    print(f"[replay] {label} ...", flush=True)
    began = time.perf_counter()
    res = run_in_process(cfg, fresh_dir(workdir), reuse=shared)
    wall = time.perf_counter() - began
    if shared is None:
        shared = (workdir, {t: res["results"][t] for t in SHARED})
    return res, wall, shared


def run_seed(overrides: dict[str, Any], seed: int, work: Path, only: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    shared: tuple[Path, dict[str, dict]] | None = None
    for name in VARIANTS:
        if name not in only and name != "replay":
            continue
        cfg = variant_config(overrides, name, seed)
        res, wall, shared = run_variant(cfg, work / f"seed{seed}-{name}", shared, f"seed {seed}: {LABELS[name]}")
        r = res["results"]
        out[name] = {"sft": r["evaluate-sft"]["eval/accuracy"], "rm_initial": r["reward-model"],
                     "iterations": per_iteration(r, cfg), "wall_s": wall, "run_id": res["parent_run_id"],
                     "reward_hacking": r["promote"]["reward_hacking"],
                     "monitor": r["promote"]["reward_hacking_reason"], "config_hash": cfg.hash()}
        e = out[name]
        curve = " → ".join(f"{x['heldout']:.3f}" for x in e["iterations"])
        print(f"[replay] seed {seed} {name}: held-out {e['sft']:.3f} → {curve}; {e['monitor']} ({wall:.0f}s)",
              flush=True)
    return out


def run_supervision(overrides: dict[str, Any], seed: int, work: Path) -> dict[str, Any]:
    from components.config import _deep_merge, load_config

    out: dict[str, Any] = {}
    shared: tuple[Path, dict[str, dict]] | None = None
    for name, variant in SUPERVISION.items():
        cfg = load_config(MULTISTEP, _deep_merge(_deep_merge(overrides, variant), {"seed": seed}))
        reuse = shared if shared is None or name not in OWN_REWARD_MODEL else \
            (shared[0], {t: m for t, m in shared[1].items() if t != "reward-model"})
        res, wall, first = run_variant(cfg, work / f"seed{seed}-supervision-{name}", reuse,
                                       f"seed {seed}: {name} supervision on the multi-step task")
        shared = shared or first
        r = res["results"]
        rows = []
        mean = lambda rounds, k: sum(x.get(k, float("nan")) for x in rounds) / len(rounds)  # noqa: E731
        for i in range(cfg.loop.iterations):
            rounds = [r[f"rollout-i{i}-m{m}"] for m in range(cfg.loop.steps_per_iteration)]
            rows.append({"iteration": i, "heldout": r[f"evaluate-i{i}"]["eval/accuracy"],
                         "rollout_accuracy": mean(rounds, "rollout/accuracy"),
                         "step_accuracy": mean(rounds, "rollout/step_accuracy"),
                         "prm_step_accuracy": mean(rounds, "rollout/prm_step_accuracy"),
                         "prm_step_auc_before": r[f"rm-replay-i{i}"].get("replay/prm_step_auc_before", float("nan"))})
        out[name] = {"sft": r["evaluate-sft"]["eval/accuracy"], "iterations": rows, "wall_s": wall,
                     "run_id": res["parent_run_id"], "config_hash": cfg.hash(),
                     "rm_initial": {k: v for k, v in r["reward-model"].items() if k.startswith("rm/")}}
        curve = " → ".join(f"{x['heldout']:.3f}" for x in rows)
        print(f"[replay] seed {seed} {name} supervision: held-out {out[name]['sft']:.3f} → {curve} ({wall:.0f}s)",
              flush=True)
    return out


# --------------------------------------------------------------------------- report
def summarize(res: dict[str, Any]) -> None:
    res["goals"] = []
    sup = list(res.get("supervision", {}).values())
    if sup:
        res["supervision_summary"] = {name: spread([s[name]["iterations"][-1]["heldout"] for s in sup])
                                      for name in SUPERVISION}
    seeds = list(res["per_seed"].values())
    if not seeds:
        return
    res["summary"] = {name: {
        "final_heldout": spread([s[name]["iterations"][-1]["heldout"] for s in seeds]),
        "mean_heldout": spread([sum(x["heldout"] for x in s[name]["iterations"]) / len(s[name]["iterations"])
                                for s in seeds]),
        "rm_before": spread([sum(x["rm_before"] for x in s[name]["iterations"]) / len(s[name]["iterations"])
                             for s in seeds]),
        "hacking_flags": sum(bool(s[name]["reward_hacking"]) for s in seeds)}
        for name in VARIANTS if all(name in s for s in seeds)}
    sm, goals = res["summary"], res["goals"]
    if {"frozen", "fresh", "replay"} <= set(sm):
        c, a, b = (sm[k]["final_heldout"]["mean"] for k in ("replay", "frozen", "fresh"))
        goals.append(f"(c) replay holds final held-out accuracy above (a) frozen: {'met' if c > a else 'NOT met'} "
                     f"— {c:.3f} vs {a:.3f}")
        goals.append(f"(c) replay at least (b) fresh only: {'met' if c >= b else 'NOT met'} — {c:.3f} vs {b:.3f}")
        goals.append(f"(a) frozen shows the exploitation (monitor flag): {sm['frozen']['hacking_flags']} of "
                     f"{len(seeds)} seeds")


def _f(x: float) -> str:
    return "n/a" if x != x else f"{x:.3f}"


def markdown(res: dict[str, Any]) -> str:
    lines = [f"# Reward-model replay ablation — {res['date']}", "", machine_line(res["machine"], res.get("loadavg_end")),
             f"Command: `{res['command']}` ({res['elapsed_min']:.1f} min). Seeds: {res['seeds']}. Config: the "
             f"embedded default with `{json.dumps(res['overrides'])}` and per variant `{json.dumps(VARIANTS)}`.", "",
             "RM before/after: pairwise accuracy on held-out fresh samples of the iteration's policy (before / "
             "after retraining on them); agreement: the RM's pairwise agreement with the verifier on the rounds' "
             "rollouts (within a prompt's group); reward: the rollout reward the policy optimises (σ(r_φ)+0.1·format "
             "for (a)–(c), correct+0.1·format for (d)); rollout acc: the verifier on the rollouts; held-out: greedy "
             "pass@1 on the held-out problems.", ""]
    for seed, s in res["per_seed"].items():
        rm = s[next(iter(s))]["rm_initial"]
        lines += [f"## Seed {seed} (SFT held-out {s[next(iter(s))]['sft']:.3f})", "",
                  f"Initial RM (shared by the variants): pairwise accuracy {_f(rm['rm/heldout_accuracy_policy'])} on "
                  f"{rm['rm/heldout_policy_pairs']:.0f} held-out pairs of the SFT policy's own samples, "
                  f"{_f(rm['rm/heldout_accuracy'])} on all held-out pairs; sampling {rm['rm/sample_seconds']:.0f} s, "
                  f"training {rm['rm/train_seconds']:.0f} s.", "",
                  "| variant | iteration | RM before | RM after | pairs | agreement | reward | rollout acc | held-out |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, e in s.items():
            for x in e["iterations"]:
                lines.append(f"| {LABELS[name]} | {x['iteration']} | {_f(x['rm_before'])} | {_f(x['rm_after'])} | "
                             f"{x['pairs']:.0f} | {_f(x['agreement'])} | {_f(x['reward'])} | "
                             f"{_f(x['rollout_accuracy'])} | {_f(x['heldout'])} |")
        lines += ["", "Monitor and wall time: " + "; ".join(
            f"{name}: {e['monitor']} ({e['wall_s']:.0f} s)" for name, e in s.items()), ""]
    if res.get("supervision"):
        lines += ["## Outcome vs process supervision (multi-step task)", "",
                  f"`pipelines/configs/multistep.yaml` (a + b + c, solutions in steps; the verifier as the reward) "
                  f"with `{json.dumps(res['supervision_overrides'])}`; per seed one SFT model for all variants, "
                  f"and per variant `{json.dumps(SUPERVISION)}` (process-prm trains its own reward model: a process "
                  "reward model on the SFT policy's samples, whose step scores are the step rewards). Step accuracy: "
                  "the fraction of the rollouts' steps the verifier judges right (process runs only); PRM step acc: "
                  "how often the PRM's σ(score) > 0.5 agrees with the verifier on those steps; PRM AUC: on held-out "
                  "samples, the fraction of (right, wrong) step pairs the PRM orders right (after its first training; "
                  "then each iteration on the new policy's fresh samples before retraining).", "",
                  "| seed | supervision | SFT held-out | held-out per iteration | rollout acc per iteration | "
                  "step acc | PRM step acc | PRM AUC | wall s |", "|---|---|---:|---|---|---|---|---|---:|"]
        for seed, s in res["supervision"].items():
            for name, e in s.items():
                it = e["iterations"]
                auc = e.get("rm_initial", {}).get("rm/heldout_step_auc", float("nan"))
                auc_text = "n/a" if auc != auc else f"{auc:.3f}; " + " → ".join(_f(x.get("prm_step_auc_before",
                                                                                        float("nan"))) for x in it)
                lines.append(f"| {seed} | {name} | {e['sft']:.3f} | {' → '.join(_f(x['heldout']) for x in it)} | "
                             f"{' → '.join(_f(x['rollout_accuracy']) for x in it)} | "
                             f"{' → '.join(_f(x['step_accuracy']) for x in it)} | "
                             f"{' → '.join(_f(x.get('prm_step_accuracy', float('nan'))) for x in it)} | "
                             f"{auc_text} | {e['wall_s']:.0f} |")
        lines += ["", "Final held-out accuracy, mean ± std over seeds: " + "; ".join(
            f"{k} {_pm(v)}" for k, v in res["supervision_summary"].items()), ""]
    if not res["per_seed"]:
        return "\n".join(lines + [""])
    lines += ["## Summary over seeds", "", "| variant | final held-out | mean held-out over iterations | "
              "RM accuracy before retraining (mean) | hacking flags |", "|---|---|---|---|---:|"]
    for name, sm in res["summary"].items():
        lines.append(f"| {LABELS[name]} | {_pm(sm['final_heldout'])} | {_pm(sm['mean_heldout'])} | "
                     f"{_pm(sm['rm_before'])} | {sm['hacking_flags']} |")
    lines += ["", "## Goals", ""] + [f"- {g}" for g in res["goals"]] + [""]
    lines += [f"![{n}]({n})" for n in res.get("plots", [])] + [""]
    return "\n".join(lines)


def _pm(s: dict[str, Any]) -> str:
    std = "" if s["std"] is None else f" ± {s['std']:.3f}"
    return f"{s['mean']:.3f}{std}"


def plot(res: dict[str, Any], out: Path) -> list[str]:
    if not res.get("summary"):
        return []
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("heldout", "held-out accuracy"), ("rollout_accuracy", "verifier accuracy on rollouts"),
            ("reward", "rollout reward (optimised)"), ("rm_before", "RM accuracy on fresh samples, before")]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4))
    colors = {"frozen": "tab:red", "fresh": "tab:orange", "replay": "tab:blue", "verifier": "tab:green"}
    for ax, (key, title) in zip(axes, keys):
        for name in res["summary"]:
            seeds = [s[name]["iterations"] for s in res["per_seed"].values()]
            for it in seeds:
                ax.plot([x["iteration"] for x in it], [x[key] for x in it], color=colors[name], alpha=0.25)
            n = min(len(it) for it in seeds)
            ax.plot(range(n), [sum(it[i][key] for it in seeds) / len(seeds) for i in range(n)], color=colors[name],
                    linewidth=2.5, marker="o", label=LABELS[name])
        ax.set_title(title)
        ax.set_xlabel("outer iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "replay.png", dpi=100)
    plt.close(fig)
    return ["replay.png"]


def main(argv: list[str] | None = None) -> int:
    from components.config import _deep_merge
    from pipelines.local import embedded_tracking_uri

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1", help="comma-separated (default 0,1)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="subset of " + ",".join(VARIANTS))
    p.add_argument("--parts", default="replay,supervision", help="replay (the ablation), supervision "
                   "(outcome vs process on the multi-step task), or both")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change the benchmark config")
    p.add_argument("--smoke", action="store_true", help="a tiny config (seconds; tests/test_replay.py)")
    p.add_argument("--publish", action="store_true", help="copy the report and plot into benchmarks/RESULTS.md")
    p.add_argument("--out", help="output folder (default benchmarks/results/<date>[-smoke])")
    a = p.parse_args(argv)
    started = time.perf_counter()
    overrides = _deep_merge(BENCH, parse_sets(a.set))
    if a.smoke:
        overrides = _deep_merge(_deep_merge(overrides, SMOKE), {"loop": {"iterations": 2}})
    seeds = [int(s) for s in a.seeds.split(",")]
    date = time.strftime("%Y-%m-%d")
    out = Path(a.out) if a.out else RESULTS / (date + ("-smoke" if a.smoke else ""))
    out.mkdir(parents=True, exist_ok=True)
    work = out / "replay-work"
    work.mkdir(exist_ok=True)
    uri = embedded_tracking_uri(work)
    overrides = _deep_merge(overrides, {"tracking": {"tracking_uri": uri}})
    args = " ".join(argv if argv is not None else sys.argv[1:])
    res: dict[str, Any] = {"date": date, "machine": machine(), "seeds": seeds,
                           "overrides": {k: v for k, v in overrides.items() if k != "tracking"},
                           "command": f"python -m benchmarks.replay {args}".rstrip(), "tracking_uri": uri,
                           "per_seed": {}}
    only = a.variants.split(",")
    parts = a.parts.split(",")
    if "supervision" in parts:
        sup = _deep_merge(SUPERVISION_SMOKE if a.smoke else {}, parse_sets(a.set))
        sup = _deep_merge(sup, {"tracking": {"tracking_uri": uri, "experiment": BENCH["tracking"]["experiment"]}})
        res["supervision_overrides"] = {k: v for k, v in sup.items() if k != "tracking"}
        res["supervision"] = {str(seed): run_supervision(sup, seed, work) for seed in seeds}
    for seed in seeds if "replay" in parts else []:
        res["per_seed"][str(seed)] = run_seed(overrides, seed, work, only)
    res["loadavg_end"] = loadavg()
    res["elapsed_min"] = (time.perf_counter() - started) / 60
    summarize(res)
    res["plots"] = plot(res, out)
    md = markdown(res)
    (out / "replay.md").write_text(md)
    write_json(res, out / "replay.json")
    print(md, flush=True)
    if a.publish:
        print(f"[replay] published to {publish(md, 'replay', [out / n for n in res['plots']])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
