"""Learning benchmark with spread: does the default make the model better, for every seed, and how
does kfp-grpo's accuracy grow with wall time next to TRL's GRPOTrainer?

    python -m benchmarks.learning                       # seeds 0,1,2: kfp-grpo run ×3, then kfp-grpo vs TRL ×3
    python -m benchmarks.learning --runner inprocess    # the runs through pipelines.inprocess (faster)
    python -m benchmarks.learning --seeds 0 --skip runs # only the side-by-side curves, one seed
    python -m benchmarks.learning --smoke --seeds 0 --runner inprocess   # seconds (tests/test_benchmarks.py)

(a) runs: the default config as `kfp-grpo run --set seed=N` runs it (the local KFP pipeline,
    each run in a fresh process and workdir, its MLflow store in that workdir), or the same plan
    in process (`pipelines.inprocess.run_in_process`, `--runner inprocess`); reported per seed
    and as mean ± std [min, max]: SFT (start) and final held-out accuracy, their difference,
    wall and CPU minutes.
(b) curves: kfp-grpo's rollout + update stages (benchmarks.ours) and TRL's GRPOTrainer
    (benchmarks.trl_runner) from the same SFT checkpoint per seed, with the default's settings
    read at run time (benchmarks.common.comparison_config lists what must change for TRL), for
    the default's number of rounds; held-out accuracy every `--eval-every` rounds with the clock
    paused; accuracy at equal wall time (the faster side's finish) per seed and on the mean.
    The order of the two sides alternates from seed to seed.

Writes benchmarks/results/<date>[-smoke]/learning.{json,md,png}; `--publish` copies the table
and plot into benchmarks/RESULTS.md. `--set KEY=VALUE` changes the default for both parts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, ROOT, SMOKE, Spec, accuracy_at, child_env, children_cpu_seconds, \
    comparison_config, default_config, fresh_dir, loadavg, machine, machine_line, parse_sets, prepare, publish, \
    run_side, spread, write_json
from benchmarks.report import SIDES, settings_line


# --------------------------------------------------------------------------- (a) runs of the default
def as_sets(overrides: dict[str, Any], prefix: str = "") -> list[str]:
    """A nested overrides dict → `--set` items (`grpo.lr=0.0002`); values as JSON, which YAML reads back."""
    items: list[str] = []
    for k, v in overrides.items():
        if isinstance(v, dict):
            items += as_sets(v, f"{prefix}{k}.")
        else:
            items.append(f"{prefix}{k}={json.dumps(v)}")
    return items


def pipeline_run(overrides: dict[str, Any], runner: str, workdir: Path) -> dict[str, Any]:
    """One run of the default with `overrides` in a fresh process; its accuracies, wall and CPU time."""
    workdir = fresh_dir(workdir)
    sets = sum((["--set", s] for s in as_sets(overrides)), [])
    if runner == "kfp":
        cmd = [sys.executable, "-m", "pipelines.cli", "run", "--workdir", str(workdir), *sets]
    else:
        cmd = [sys.executable, "-m", "benchmarks.learning", "--worker-inprocess", str(workdir), *sets]
    env = child_env()
    env.pop("MLFLOW_TRACKING_URI", None)  # the run's own store, in its workdir
    log = workdir.parent / f"{workdir.name}.log"
    print(f"[learning] {' '.join(cmd[1:])}  (log: {log})", flush=True)
    load0, w0, c0 = loadavg(), time.perf_counter(), children_cpu_seconds()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT.parent)).returncode
    wall, cpu = time.perf_counter() - w0, children_cpu_seconds() - c0
    if rc:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {rc}); see {log}")
    cfg = default_config(overrides)
    res = {"seed": cfg.seed, "runner": runner, "wall_s": wall, "cpu_s": cpu, "loadavg_start": load0,
           "loadavg_end": loadavg(), "log": str(log), **parent_run_accuracies(workdir, cfg)}
    print(f"[learning] seed {cfg.seed}: SFT {res['start']:.3f} → final {res['final']:.3f} in {wall / 60:.1f} min "
          f"({cpu / 60:.1f} CPU-min)", flush=True)
    return res


def parent_run_accuracies(workdir: Path, cfg) -> dict[str, Any]:
    """Start, final and per-iteration held-out accuracy from the run's MLflow parent run."""
    import mlflow

    from pipelines.local import embedded_tracking_uri

    c = mlflow.MlflowClient(embedded_tracking_uri(workdir))
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    runs = [r for r in c.search_runs([exp.experiment_id], f"tags.kfp_grpo.config_hash = '{cfg.hash()}'")
            if "mlflow.parentRunId" not in r.data.tags]
    if len(runs) != 1:
        raise RuntimeError(f"expected one parent run of config {cfg.hash()} in {workdir}, found {len(runs)}")
    run = runs[0]
    curve = [m.value for m in sorted(c.get_metric_history(run.info.run_id, "eval/accuracy"), key=lambda m: m.step)]
    return {"start": run.data.metrics["final/start_accuracy"], "final": run.data.metrics["final/accuracy"],
            "curve": curve, "run_id": run.info.run_id, "config_hash": cfg.hash()}


def _worker_inprocess(workdir: str, sets: list[str]) -> None:
    """`--worker-inprocess`: one in-process run of the plan (what pipeline_run starts for that runner)."""
    from pipelines.inprocess import run_in_process
    from pipelines.local import embedded_tracking_uri

    cfg = default_config(parse_sets(sets))
    run_in_process(cfg, Path(workdir), embedded_tracking_uri(Path(workdir)))


# --------------------------------------------------------------------------- (b) kfp-grpo vs TRL curves
def side_by_side(overrides: dict[str, Any], seeds: list[int], rounds: int | None, eval_every: int,
                 out: Path) -> dict[str, Any]:
    """Per seed: one SFT checkpoint, then kfp-grpo and TRL from it (alternating which goes first)."""
    per_seed, spec, hashes = {}, None, []
    for i, seed in enumerate(seeds):
        compared, changes = comparison_config(default_config({**overrides, "seed": seed}))
        spec = Spec(compared.to_json(), rounds=rounds or compared.loop.iterations * compared.loop.steps_per_iteration,
                    eval_every=eval_every, warmup_rounds=0, changes=changes)
        hashes.append(compared.hash())
        paths = prepare(compared)
        print(f"[learning] seed {seed}: SFT checkpoint {paths['sft']} (held-out accuracy "
              f"{paths['sft_accuracy']:.3f})", flush=True)
        sides = {}
        for side in (("ours", "trl") if i % 2 == 0 else ("trl", "ours")):
            module = "benchmarks.ours" if side == "ours" else "benchmarks.trl_runner"
            path = out / f"{side}-seed{seed}.json"
            path.unlink(missing_ok=True)
            sides[side] = run_side(module, spec, paths, path, out / "work" / f"{side}-seed{seed}")
        per_seed[str(seed)] = {"sft_accuracy": paths["sft_accuracy"], "sft_seconds": paths.get("sft_seconds"),
                               "order": list(sides), **{k: compare_entry(v) for k, v in sides.items()}}
        t_equal = min(per_seed[str(seed)][k]["wall"] for k in sides)
        per_seed[str(seed)]["t_equal"] = t_equal
        for k in sides:
            per_seed[str(seed)][k]["at_equal"] = accuracy_at(sides[k]["curve"], t_equal)
    settings = {**spec.settings(), "seed": ", ".join(map(str, seeds)), "config_hash": ", ".join(hashes)} if spec else {}
    return {"settings": settings, "changes": spec.changes if spec else [],
            "rounds": spec.rounds if spec else 0, "eval_every": eval_every, "per_seed": per_seed}


def compare_entry(side: dict) -> dict[str, Any]:
    """What the learning report keeps of one side's run."""
    curve = side["curve"]
    return {"curve": curve, "final": curve[-1]["accuracy"], "best": max(p["accuracy"] for p in curve),
            "wall": sum(r["wall"] for r in side["rounds"]), "cpu": sum(r["cpu"] for r in side["rounds"]),
            "loadavg": [side["loadavg_start"], side["loadavg_end"]]}


# --------------------------------------------------------------------------- summary, report, plot
def summarize(res: dict[str, Any]) -> None:
    """Mean ± spread over seeds, and the goals, into `res`."""
    goals = []
    runs = res.get("runs")
    if runs:
        res["runs_summary"] = {k: spread([r[k] for r in runs]) for k in ("start", "final", "wall_s", "cpu_s")}
        res["runs_summary"]["gain"] = spread([r["final"] - r["start"] for r in runs])
        worst = min(r["final"] - r["start"] for r in runs)
        goals.append(f"every seed gains ≥ +15 points over SFT (#11): {'met' if worst >= 0.15 else 'NOT met'} — "
                     f"smallest gain {100 * worst:+.1f} points")
    cmp_ = res.get("curves")
    if cmp_ and cmp_["per_seed"]:
        seeds = list(cmp_["per_seed"].values())
        cmp_["summary"] = {side: {k: spread([s[side][k] for s in seeds]) for k in ("at_equal", "final", "wall", "cpu")}
                           for side, _, _ in SIDES}
        cmp_["summary"]["sft_accuracy"] = spread([s["sft_accuracy"] for s in seeds])
        o, t = cmp_["summary"]["ours"]["at_equal"]["mean"], cmp_["summary"]["trl"]["at_equal"]["mean"]
        goals.append(f"kfp-grpo ≥ TRL's accuracy at equal wall time, on the mean (#11, #15): "
                     f"{'met' if o >= t else 'NOT met'} — {o:.3f} vs {t:.3f}")
    res["goals"] = goals


def _pm(s: dict[str, Any], scale: float = 1.0, nd: int = 3) -> str:
    std = "" if s["std"] is None else f" ± {s['std'] * scale:.{nd}f}"
    return f"{s['mean'] * scale:.{nd}f}{std} [{s['min'] * scale:.{nd}f}, {s['max'] * scale:.{nd}f}]"


def markdown(res: dict[str, Any]) -> str:
    lines = [f"# Learning on the default config — {res['date']}", "",
             machine_line(res["machine"], res.get("loadavg_end")),
             f"Command: `{res['command']}` ({res['elapsed_min']:.1f} min). Seeds: {res['seeds']}. "
             f"Config: the embedded default" + (f" with `{json.dumps(res['overrides'])}`" if res["overrides"] else "")
             + f" (hash {res['config_hash']} for seed {res['seeds'][0]})."
             + (f" Note: {res['note']}." if res.get("note") else ""), "",
             "Mean ± sample std [min, max] over seeds. Held-out accuracy is greedy pass@1 on the run's "
             f"{res['num_test']} held-out problems (one seed's 95% binomial interval at 50% accuracy: ±"
             f"{196 * (0.25 / res['num_test']) ** 0.5:.1f} points).", ""]
    runs = res.get("runs")
    if runs:
        s = res["runs_summary"]
        runner = {"kfp": "`kfp-grpo run --set seed=N` (the local KFP pipeline)",
                  "inprocess": "`pipelines.inprocess.run_in_process` (the same plan, in one process)"}[res["runner"]]
        lines += ["## 1. The default, end to end", "", f"Runner: {runner}.", "",
                  "| seed | SFT (start) | final | gain | per iteration | wall min | CPU min |",
                  "|---|---:|---:|---:|---|---:|---:|"]
        for r in runs:
            gain = 100 * (r["final"] - r["start"])
            lines.append(f"| {r['seed']} | {r['start']:.3f} | {r['final']:.3f} | {gain:+.1f} "
                         f"| {' → '.join(f'{a:.3f}' for a in r['curve'])} | {r['wall_s'] / 60:.1f} | "
                         f"{r['cpu_s'] / 60:.1f} |")
        lines += [f"| **mean ± std [min, max]** | {_pm(s['start'])} | {_pm(s['final'])} | "
                  f"{_pm(s['gain'], 100, 1)} | | {_pm(s['wall_s'], 1 / 60, 1)} | {_pm(s['cpu_s'], 1 / 60, 1)} |", "",
                  "Wall and CPU time of the whole command (process start to exit, every task process included).", ""]
    c = res.get("curves")
    if c and c["per_seed"]:
        s = c["summary"]
        lines += ["## 2. kfp-grpo vs TRL GRPOTrainer from the same SFT checkpoint", "",
                  settings_line(c["settings"], c["changes"]), "",
                  f"{c['rounds']} rounds per side (one rollout of {c['settings']['completions_per_step']} completions "
                  f"+ the update on it), held-out accuracy every {c['eval_every']} round(s) with the clock paused. "
                  "kfp-grpo: its rollout and update stages in one process, each round a policy directory in and "
                  "out (model load/save and Parquet included, process start-up and MLflow not); TRL: "
                  "`GRPOTrainer.train()`, models in memory. Equal wall time = the faster side's finish, per seed.", "",
                  "| seed | SFT | first | t equal (s) | kfp-grpo at t | TRL at t | kfp-grpo final (wall s) | "
                  "TRL final (wall s) |", "|---|---:|---|---:|---:|---:|---:|---:|"]
        names = {side: name for side, name, _ in SIDES}
        for seed, e in c["per_seed"].items():
            lines.append(f"| {seed} | {e['sft_accuracy']:.3f} | {names[e['order'][0]]} | {e['t_equal']:.0f} | "
                         f"{e['ours']['at_equal']:.3f} | {e['trl']['at_equal']:.3f} | {e['ours']['final']:.3f} "
                         f"({e['ours']['wall']:.0f}) | {e['trl']['final']:.3f} ({e['trl']['wall']:.0f}) |")
        lines += [f"| **mean ± std [min, max]** | {_pm(s['sft_accuracy'])} | | | {_pm(s['ours']['at_equal'])} | "
                  f"{_pm(s['trl']['at_equal'])} | {_pm(s['ours']['final'])} | {_pm(s['trl']['final'])} |", "",
                  f"Training wall time: kfp-grpo {_pm(s['ours']['wall'], 1, 1)} s, TRL {_pm(s['trl']['wall'], 1, 1)} "
                  f"s; CPU: kfp-grpo {_pm(s['ours']['cpu'], 1, 1)} s, TRL {_pm(s['trl']['cpu'], 1, 1)} s.", ""]
    lines += ["## Goals", ""] + [f"- {g}" for g in res.get("goals", [])] + [""]
    lines += [f"![{n}]({n})" for n in res.get("plots", [])] + [""]
    return "\n".join(lines)


def plot(res: dict[str, Any], out: Path) -> list[str]:
    """learning.png: accuracy per iteration of the runs; accuracy vs wall time, both systems, per seed and mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, c = res.get("runs"), res.get("curves")
    panels = [p for p in ("runs", "curves") if res.get(p) and (p == "runs" or c["per_seed"])]
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "runs":
            for r in runs:
                ax.plot(range(len(r["curve"])), r["curve"], marker="o", alpha=0.4, label=f"seed {r['seed']}")
            n = min(len(r["curve"]) for r in runs)
            ax.plot(range(n), [sum(r["curve"][i] for r in runs) / len(runs) for i in range(n)], color="black",
                    linewidth=2.5, label="mean")
            ax.set_xticks(range(max(len(r["curve"]) for r in runs)))
            ax.set_xlabel("outer iteration (0 = SFT)")
            ax.set_title(f"the default, end to end ({res['runner']} runner)")
        else:
            for side, name, color in SIDES:
                seeds = [e[side] for e in c["per_seed"].values()]
                for e in seeds:
                    ax.step([p["wall"] for p in e["curve"]], [p["accuracy"] for p in e["curve"]], where="post",
                            color=color, alpha=0.3, marker=".")
                end = min(e["wall"] for e in seeds)
                grid = [end * k / 100 for k in range(101)]
                ax.plot(grid, [sum(accuracy_at(e["curve"], t) for e in seeds) / len(seeds) for t in grid],
                        color=color, linewidth=2.5, label=f"{name} (mean of {len(seeds)})")
            ax.set_xlabel("training wall time (s, evaluation excluded)")
            ax.set_title("from the same SFT checkpoint (thin: one seed)")
        ax.set_ylabel("held-out accuracy (greedy pass@1)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "learning.png", dpi=110)
    plt.close(fig)
    return ["learning.png"]


def render(res: dict[str, Any], out: Path) -> Path:
    """Summary, goals, plot and learning.md for `res` in `out`; returns the Markdown file."""
    summarize(res)
    res["plots"] = plot(res, out)
    (out / "learning.md").write_text(markdown(res))
    return out / "learning.md"


# --------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated (default 0,1,2)")
    p.add_argument("--runner", choices=["kfp", "inprocess"], default="kfp",
                   help="(a): kfp-grpo run (the local KFP pipeline) or pipelines.inprocess (faster)")
    p.add_argument("--skip", action="append", default=[], choices=["runs", "curves"], help="leave (a) or (b) out")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change the default config")
    p.add_argument("--rounds", type=int, help="(b): rounds per side (default: the default's iterations × rounds)")
    p.add_argument("--eval-every", type=int, default=1, help="(b): evaluate every k rounds (default 1)")
    p.add_argument("--smoke", action="store_true", help="a tiny config (seconds; tests/test_benchmarks.py)")
    p.add_argument("--out", help="output folder (default benchmarks/results/<date>[-smoke])")
    p.add_argument("--publish", action="store_true", help="copy the table and plot into benchmarks/RESULTS.md")
    p.add_argument("--report-only", metavar="DIR", help="re-render learning.md and the plot from DIR/learning.json")
    p.add_argument("--worker-inprocess", metavar="WORKDIR", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker_inprocess:
        _worker_inprocess(a.worker_inprocess, a.set)
        return 0
    if a.report_only:
        out = Path(a.report_only)
        res = json.loads((out / "learning.json").read_text())
        md = render(res, out)
        print(f"[learning] wrote {md}")
        if a.publish:
            print(f"[learning] published to {publish(md.read_text(), 'learning', [out / n for n in res['plots']])}")
        return 0
    started = time.perf_counter()
    from components.config import _deep_merge

    overrides = _deep_merge(SMOKE, parse_sets(a.set)) if a.smoke else parse_sets(a.set)
    seeds = [int(s) for s in a.seeds.split(",")]
    date = time.strftime("%Y-%m-%d")
    out = Path(a.out) if a.out else RESULTS / (date + ("-smoke" if a.smoke else ""))
    out.mkdir(parents=True, exist_ok=True)
    cfg = default_config({**overrides, "seed": seeds[0]})
    args = " ".join(argv if argv is not None else sys.argv[1:])
    res: dict[str, Any] = {
        "date": date, "machine": machine(), "seeds": seeds, "runner": a.runner, "overrides": overrides,
        "config_hash": cfg.hash(), "num_test": cfg.data.num_test,
        "command": f"python -m benchmarks.learning {args}".rstrip()}
    print(f"[learning] {res['machine']['cpu']}, load {res['machine']['loadavg']}; results → {out}", flush=True)
    if "runs" not in a.skip:
        res["runs"] = [pipeline_run({**overrides, "seed": s}, a.runner, out / "learning-work" / f"run-seed{s}")
                       for s in seeds]
    if "curves" not in a.skip:
        res["curves"] = side_by_side(overrides, seeds, a.rounds, a.eval_every, out / "learning-work")
    res["loadavg_end"] = loadavg()
    res["elapsed_min"] = (time.perf_counter() - started) / 60
    md = render(res, out)
    write_json(res, out / "learning.json")
    print(md.read_text(), flush=True)
    if a.publish:
        print(f"[learning] published to {publish(md.read_text(), 'learning', [out / n for n in res['plots']])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
