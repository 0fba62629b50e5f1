"""Turn the JSON results of `python -m benchmarks.run` into results.md and PNG plots."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks.common import PHASES, machine_line, update_flops
from benchmarks.pipeline_overhead import CATEGORIES

SIDES = (("ours", "kfp-grpo", "tab:blue"), ("trl", "TRL GRPOTrainer", "tab:orange"))


# --------------------------------------------------------------------------- numbers
def throughput(side: dict, warmup: int, beta: float) -> dict[str, Any]:
    """Aggregate throughput over the measured rounds (those after the first `warmup`)."""
    rounds = [r for r in side["rounds"] if r["round"] > warmup] or side["rounds"]
    tok = sum(r["completion_tokens"] for r in rounds)
    rows = sum(r["rows"] for r in rounds)
    flops = sum(update_flops(side["n_params"], r["prompt_tokens"] + r["completion_tokens"], beta > 0) for r in rounds)
    out: dict[str, Any] = {"rounds": len(rounds), "completion_tokens": tok, "rows": rows,
                           "tokens_per_round": statistics.fmean(r["prompt_tokens"] + r["completion_tokens"]
                                                                for r in rounds),
                           "update_flops_per_round": flops / len(rounds)}
    for kind in ("wall", "cpu"):
        total = sum(r[kind] for r in rounds)
        phases = [p for p in PHASES if p in rounds[0][f"phase_{kind}"]]  # TRL has no io phase
        ph = {p: sum(r[f"phase_{kind}"][p] for r in rounds) for p in phases}
        if f"other_{kind}" in rounds[0]:  # TRL: its train phase is the rest of the round
            ph["other"] = sum(r[f"other_{kind}"] for r in rounds)
        update = ph["logprobs"] + ph["train"]
        out[kind] = {
            "step_s_median": statistics.median(r[kind] for r in rounds),
            "step_s_mean": total / len(rounds),
            "step_tok_s": tok / total,
            "step_rows_s": rows / total,
            "compute_tok_s": tok / max(total - ph.get("io", 0.0), 1e-9),
            "rollout_tok_s": tok / max(ph["generate"], 1e-9),
            "update_tok_s": tok / max(update, 1e-9),
            "phases_per_round": {p: v / len(rounds) for p, v in ph.items()},
            "update_s_per_round": update / len(rounds),
            "update_flops_s": flops / max(update, 1e-9),
        }
    return out


# --------------------------------------------------------------------------- markdown
def _f(x: float, nd: int = 1) -> str:
    return f"{x:,.{nd}f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b else "n/a"


def settings_line(s: dict[str, Any], changes: list[str]) -> str:
    """The settings both sides ran with, as one paragraph (shared with benchmarks.learning)."""
    line = (f"Settings (both sides; the default config read at run time, compared as config {s['config_hash']}): "
            f"reward = "
            f"{s['correctness_weight']}·correct + {s['format_weight']}·format (components.rewards, no reward model); "
            f"G = {s['G']}, {s['prompts_per_step']} prompts per step ({s['completions_per_step']} completions), "
            f"minibatch {s['minibatch']} completions, μ = {s['epochs']} ({s['optimizer_steps_per_step']} optimizer "
            f"steps per step), max completion {s['max_new_tokens']} tokens, temperature {s['temperature']}, "
            f"top-p {s['top_p']}, AdamW lr {s['lr']} (linear warm-up over {s['warmup_steps']} steps, weight decay "
            f"{s['weight_decay']}, grad-norm clip {s['max_grad_norm']}), β = {s['beta']} (π_ref: {s['reference']}), "
            f"ε = {s['eps_low']}/{s['eps_high']}, loss `{s['loss_agg']}` (TRL `{s['trl_loss_type']}`), advantages "
            f"{s['advantage']}, seed {s['seed']}, torch threads {s['threads']}, {s['dtype']}.")
    if changes:
        line += (" Changed from the default so that both sides run the same algorithm: "
                 + "; ".join(f"`{c}`" for c in changes) + ".")
    return line


def markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    lines = [f"# kfp-grpo vs TRL GRPOTrainer: step throughput — {res['date']}", "",
             machine_line(res["machine"], res.get("loadavg_end"))
             + " Other jobs may share the CPU: wall-clock numbers carry that noise, the CPU-time rows much less.",
             f"Command: `{res['command']}` ({res['elapsed_min']:.1f} min). Seeds: {res['seeds']}."
             + (f" Note: {res['note']}." if res.get("note") else ""), "",
             settings_line(s, res.get("changes", [])), "",
             f"Model: {res['n_params'] / 1e6:.2f}M parameters, from one SFT checkpoint ({s['sft_steps']} steps, "
             f"held-out accuracy {res['sft_accuracy']:.3f}). One step = one rollout of {s['completions_per_step']} "
             f"completions + the update on them; {s['rounds']} steps per side (kfp-grpo's split around TRL's: A-B-A), "
             f"the first {res['warmup_rounds']} not counted. Learning (accuracy vs wall time, 3 seeds): "
             "`python -m benchmarks.learning`.", ""]
    t = res.get("throughput")
    if t:
        o, r = t["ours"], t["trl"]
        lines += ["## Throughput of a GRPO step", "",
                  "| metric | kfp-grpo | TRL GRPOTrainer | kfp-grpo / TRL |", "|---|---:|---:|---:|"]
        rows = [
            ("step seconds, median (wall)", o["wall"]["step_s_median"], r["wall"]["step_s_median"], 2, True),
            ("**step throughput, completion tokens/s (wall)**", o["wall"]["step_tok_s"], r["wall"]["step_tok_s"], 0,
             False),
            ("**step throughput, completion tokens/CPU-s**", o["cpu"]["step_tok_s"], r["cpu"]["step_tok_s"], 0, False),
            ("step throughput, completions/s (wall)", o["wall"]["step_rows_s"], r["wall"]["step_rows_s"], 1, False),
            ("rollout tokens/s (generate phase, wall)", o["wall"]["rollout_tok_s"], r["wall"]["rollout_tok_s"], 0,
             False),
            ("update tokens/s (logprobs + train phases, wall)", o["wall"]["update_tok_s"], r["wall"]["update_tok_s"],
             0, False),
            ("step tokens/s without the io phase (wall)", o["wall"]["compute_tok_s"], r["wall"]["compute_tok_s"], 0,
             False),
        ]
        for name, a, b, nd, inverse in rows:
            lines.append(f"| {name} | {_f(a, nd)} | {_f(b, nd)} | {_ratio(b, a) if inverse else _ratio(a, b)} |")
        lines += ["", "Seconds per step by phase (mean over measured steps):", "",
                  "| phase | kfp-grpo wall | TRL wall | kfp-grpo CPU | TRL CPU |", "|---|---:|---:|---:|---:|"]

        def cell(side: dict, kind: str, p: str) -> str:
            v = side[kind]["phases_per_round"].get(p)
            return "—" if v is None else f"{v:.3f}"

        for p in PHASES + ("other",):
            lines.append(f"| {p} | {cell(o, 'wall', p)} | {cell(r, 'wall', p)} | {cell(o, 'cpu', p)} | "
                         f"{cell(r, 'cpu', p)} |")
        lines.append(f"| **step** | **{o['wall']['step_s_mean']:.3f}** | **{r['wall']['step_s_mean']:.3f}** | "
                     f"**{o['cpu']['step_s_mean']:.3f}** | **{r['cpu']['step_s_mean']:.3f}** |")
        lines += ["", "kfp-grpo's phases are the stages' own timings (`rollout/seconds_*`, `update/seconds_*` in the "
                  "metrics they return); TRL's are its methods, timed in a subclass. generate: tokenise + sample + "
                  "decode; score: rewards and advantages; logprobs: no-grad π_old/π_ref forward passes; train: loss "
                  "forward/backward + optimizer (TRL: + its Trainer loop, the rest of the step); io: kfp-grpo's stages "
                  "load and save the model and optimizer and read/write Parquet each step (TRL keeps everything in "
                  "memory: —); other: the rest of kfp-grpo's stage calls. Tokens are completion tokens (EOS "
                  f"included): {o['completion_tokens'] / o['rows']:.2f} per completion for kfp-grpo, "
                  f"{r['completion_tokens'] / r['rows']:.2f} for TRL.", ""]
    b = res.get("baseline")
    if b and t:
        bo, bt = b["throughput"]["ours"], b["throughput"]["trl"]
        o, r = t["ours"], t["trl"]
        lines += [f"### Before → after (baseline: {b['label']})", "",
                  "Each column is its own run (its own TRL measurement beside it); per-CPU-second numbers are the "
                  "ones to compare across runs.", "", "| | before | after | change |", "|---|---:|---:|---:|"]
        for name, kind, key in (("kfp-grpo step tokens/CPU-s", "cpu", "step_tok_s"),
                                ("kfp-grpo rollout tokens/CPU-s", "cpu", "rollout_tok_s"),
                                ("kfp-grpo update tokens/CPU-s", "cpu", "update_tok_s"),
                                ("kfp-grpo step tokens/s (wall)", "wall", "step_tok_s")):
            lines.append(f"| {name} | {bo[kind][key]:,.0f} | {o[kind][key]:,.0f} | "
                         f"{_ratio(o[kind][key], bo[kind][key])} |")
        for kind, label in (("cpu", "per CPU-second"), ("wall", "wall-clock")):
            lines.append(f"| kfp-grpo / TRL, {label} | {bo[kind]['step_tok_s'] / bt[kind]['step_tok_s']:.2f}× | "
                         f"{o[kind]['step_tok_s'] / r[kind]['step_tok_s']:.2f}× | |")
        lines.append("")
    p = res.get("pipeline")
    if p:
        total = p["total_wall"]
        lines += [f"## Pipeline overhead (`kfp-grpo run`, {len(p['tasks'])} tasks)", "",
                  f"Config: {p['config']}.", "",
                  f"Wall time {total:.1f} s (from process start, as `kfp-grpo run`); stage compute "
                  f"{p['stage_compute']:.1f} s → **overhead {100 * p['overhead_fraction']:.1f}%**. "
                  f"Load average {p['loadavg_start']} → {p['loadavg_end']}.", "",
                  "| where the time goes | seconds | share |", "|---|---:|---:|"]
        for c in CATEGORIES:
            v = p["categories"][c]
            lines.append(f"| {c} | {v:.1f} | {100 * v / total:.1f}% |")
        lines += ["", "Per task (seconds):", "",
                  "| task | wall | stage compute | imports | tracking | exit | model load/save | overhead |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in p["tasks"]:
            w = row["wall"]
            lines.append(f"| {row['task']} | {w:.1f} | {row['stage compute']:.1f} | {row['task imports']:.1f} | "
                         f"{row['task tracking']:.1f} | {row['task exit']:.1f} | {row['model load/save']:.2f} | "
                         f"{100 * (1 - row['stage compute'] / w):.0f}% |")
        if p.get("mlflow_stage_seconds"):
            lines += ["", "Cross-check, Σ `<stage>/seconds` logged by the stages to MLflow: "
                      + ", ".join(f"{k} {v:.1f}" for k, v in sorted(p["mlflow_stage_seconds"].items())) + "."]
        lines += ["", "imports: interpreter start → task body, plus the stage module imported inside it (torch, "
                  "transformers, mlflow, kfp); tracking: config parsing, MLflow nested run, metric logging; exit: "
                  "executor output + interpreter shutdown; driver: the CLI process (imports, compile, kfp.local "
                  "orchestration) outside task processes.", ""]
    f = res.get("flops")
    if f and t:
        o, r = t["ours"], t["trl"]
        peak_cpu = f.get("peak_flops_cpu")
        lines += ["## Distance to the hardware limit (update)", "",
                  f"fp32 `torch.mm` peak measured in this run ({f['device']}, {f['threads']} thread(s), best of "
                  f"{', '.join(str(k) for k in f['by_size'])}² matrices): **{f['peak_flops'] / 1e9:.1f} GFLOP/s** "
                  "wall-clock" + (f", **{peak_cpu / 1e9:.1f} GFLOP per CPU-second**" if peak_cpu else "") + ".",
                  "", "| | kfp-grpo | TRL |", "|---|---:|---:|",
                  f"| update model FLOPs per step: (6 + 2·[β > 0])·N·T (N = {res['n_params']:,}, T = "
                  f"{o['tokens_per_round']:,.0f} / {r['tokens_per_round']:,.0f} prompt+completion tokens) | "
                  f"{o['update_flops_per_round'] / 1e9:.1f} GFLOP | {r['update_flops_per_round'] / 1e9:.1f} GFLOP |",
                  f"| update seconds per step (logprobs + train, wall) | {o['wall']['update_s_per_round']:.2f} | "
                  f"{r['wall']['update_s_per_round']:.2f} |",
                  f"| achieved, GFLOP per wall-second | {o['wall']['update_flops_s'] / 1e9:.1f} | "
                  f"{r['wall']['update_flops_s'] / 1e9:.1f} |",
                  f"| achieved, GFLOP per CPU-second | {o['cpu']['update_flops_s'] / 1e9:.1f} | "
                  f"{r['cpu']['update_flops_s'] / 1e9:.1f} |"]
        if peak_cpu:
            lines.append(f"| **share of the matmul peak (per CPU-second)** | "
                         f"**{100 * o['cpu']['update_flops_s'] / peak_cpu:.0f}%** | "
                         f"**{100 * r['cpu']['update_flops_s'] / peak_cpu:.0f}%** |")
        lines.append(f"| share of the matmul peak (wall-clock) | "
                     f"{100 * o['wall']['update_flops_s'] / f['peak_flops']:.0f}% | "
                     f"{100 * r['wall']['update_flops_s'] / f['peak_flops']:.0f}% |")
        lines += ["", "Model FLOPs of the algorithm (the 6·N·T convention, as MFU): the trained forward + backward "
                  "and the π_ref forward when β > 0, the same for both sides. Work an implementation adds (TRL "
                  "recomputes π_old; kfp-grpo reuses the sampler's log-probs and checks one minibatch) or saves "
                  "(kfp-grpo runs a group's shared prompt once per minibatch; it skips the π_ref pass while π_ref = "
                  "π_θ) shows in the seconds, not in the FLOPs.", ""]
    lines += ["## Goals", ""]
    for g in res.get("goals", []):
        lines.append(f"- {g}")
    lines += ["", "Plots: " + ", ".join(f"[{n}]({n})" for n in res.get("plots", [])), ""]
    lines += [f"![{n}]({n})" for n in res.get("plots", [])] + [""]
    return "\n".join(lines)


def goals(res: dict[str, Any]) -> list[str]:
    """The issues' bars (#15: ≥ 2× TRL's step throughput, local-run overhead ≤ 20%), met or not."""
    out = []
    t, p = res.get("throughput"), res.get("pipeline")
    if t:
        w = t["ours"]["wall"]["step_tok_s"] / t["trl"]["wall"]["step_tok_s"]
        c = t["ours"]["cpu"]["step_tok_s"] / t["trl"]["cpu"]["step_tok_s"]
        verdict = "met" if min(w, c) >= 2 else "NOT met"
        out.append(f"step throughput ≥ 2× TRL (wall and per CPU-second): {verdict} — {w:.2f}× wall-clock, "
                   f"{c:.2f}× per CPU-second")
    if p:
        o = p["overhead_fraction"]
        out.append(f"pipeline overhead ≤ 20% of a local run: {'met' if o <= 0.2 else 'NOT met'} — {100 * o:.1f}%")
    return out


# --------------------------------------------------------------------------- plots
def plots(res: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    t = res.get("throughput")
    if t:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        keys, labels = ["step_tok_s", "rollout_tok_s", "update_tok_s"], ["step", "rollout", "update"]
        for i, (side, name, color) in enumerate(SIDES):
            axes[0].bar([j + 0.4 * i for j in range(len(keys))], [t[side]["wall"][k] for k in keys], width=0.4,
                        label=name, color=color)
        axes[0].set_xticks([j + 0.2 for j in range(len(keys))], labels)
        axes[0].set_ylabel("completion tokens / s (wall)")
        axes[0].set_title("throughput")
        axes[0].legend()
        bottom = [0.0, 0.0]
        colors = ("tab:green", "tab:gray", "tab:purple", "tab:red", "tab:brown", "tab:olive")
        for p, color in zip(PHASES + ("other",), colors):
            vals = [t[s]["wall"]["phases_per_round"].get(p, 0.0) for s, _, _ in SIDES]
            axes[1].bar(["kfp-grpo", "TRL"], vals, bottom=bottom, label=p, color=color)
            bottom = [b + v for b, v in zip(bottom, vals)]
        axes[1].set_ylabel("seconds per step (wall)")
        axes[1].set_title("where a step's time goes")
        axes[1].legend(fontsize=8)
        f = res.get("flops")
        if f:
            vals = [t["ours"]["wall"]["update_flops_s"] / 1e9, t["trl"]["wall"]["update_flops_s"] / 1e9,
                    f["peak_flops"] / 1e9]
            axes[2].bar(["kfp-grpo update", "TRL update", "matmul peak"], vals,
                        color=["tab:blue", "tab:orange", "tab:gray"])
            axes[2].set_yscale("log")
            axes[2].set_ylabel("GFLOP/s (fp32)")
            axes[2].set_title("achieved vs measured peak")
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=110)
        plt.close(fig)
        names.append("throughput.png")
    p = res.get("pipeline")
    if p:
        fig, axes = plt.subplots(1, 2, figsize=(15, 5), gridspec_kw={"width_ratios": [3, 1]})
        tasks = p["tasks"]
        colors = dict(zip(CATEGORIES, ("tab:green", "tab:red", "tab:brown", "tab:gray", "tab:orange", "tab:purple",
                                       "tab:pink", "tab:olive")))
        left = [0.0] * len(tasks)
        for c in CATEGORIES[:-1]:
            vals = [r.get(c, 0.0) for r in tasks]
            axes[0].barh([r["task"] for r in tasks], vals, left=left, color=colors[c], label=c)
            left = [a + b for a, b in zip(left, vals)]
        axes[0].invert_yaxis()
        axes[0].set_xlabel("seconds")
        axes[0].set_title("per task")
        axes[0].legend(fontsize=8, loc="lower right")
        bottom = 0.0
        for c in CATEGORIES:
            v = p["categories"][c]
            axes[1].bar(["run"], [v], bottom=bottom, color=colors[c], label=c)
            bottom += v
        axes[1].set_ylabel("seconds")
        axes[1].set_title(f"whole run: {100 * p['overhead_fraction']:.0f}% overhead")
        fig.tight_layout()
        fig.savefig(out / "pipeline_overhead.png", dpi=110)
        plt.close(fig)
        names.append("pipeline_overhead.png")
    return names


def render(res: dict[str, Any], out: Path) -> Path:
    """Goals, plots and results.md for `res` in `out`; returns the Markdown file."""
    res["goals"] = goals(res)
    res["plots"] = plots(res, out)
    (out / "results.md").write_text(markdown(res))
    return out / "results.md"


def load(path: Path) -> dict[str, Any]:
    return json.loads((path / "results.json").read_text())
