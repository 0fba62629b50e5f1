"""One command for the whole benchmark: kfp-grpo vs TRL GRPOTrainer, plus pipeline overhead.

    python -m benchmarks.run            # full (~15-20 min on 2 CPU cores)
    python -m benchmarks.run --quick    # smoke-size (~3 min)

Writes benchmarks/results/<date>[-quick]/results.md, results.json and PNG plots:
throughput.png (step/rollout/update tokens/s, per-phase seconds, achieved FLOP/s vs
the matmul peak), accuracy_vs_wall.png, pipeline_overhead.png.

Each side runs in its own fresh Python process (same threads, same environment), one
after the other; the SFT checkpoint both start from is made once and cached in
benchmarks/results/cache/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks import report
from benchmarks.common import RESULTS, ROOT, TRL_LOSS, Spec, loadavg, machine, matmul_peak, prepare, write_json

QUICK = dict(rounds=4, eval_every=2)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(ROOT.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _side(module: str, spec: Spec, paths: dict, out: Path, work: Path, until: int | None = None) -> dict:
    cmd = [sys.executable, "-m", module, "--spec", spec.to_json(), "--paths", json.dumps(paths),
           "--out", str(out), "--work", str(work)] + (["--until", str(until)] if until else [])
    print(f"[bench] running {module} (steps up to {until or spec.rounds} of {spec.rounds})", flush=True)
    subprocess.run(cmd, check=True, env=_env(), cwd=str(ROOT.parent))
    return json.loads(out.read_text())


def _baseline(path: Path) -> dict:
    base = json.loads((path / "results.json").read_text())
    return {"label": f"{base['date']}, `{base['command']}`" + (f" — {base['note']}" if base.get("note") else ""),
            "throughput": base["throughput"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few steps and a reduced pipeline (~3 min)")
    p.add_argument("--out", help="output folder (default benchmarks/results/<date>[-quick])")
    p.add_argument("--rounds", type=int, help="GRPO steps per side")
    p.add_argument("--threads", type=int, help="torch threads for both sides (default 1, as tiny.yaml)")
    p.add_argument("--skip", action="append", default=[], choices=["ours", "trl", "pipeline"],
                   help="leave a part out (repeatable)")
    p.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                   help="kfp-grpo-only config override for the comparison (reported)")
    p.add_argument("--pipeline-set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the pipeline-overhead run")
    p.add_argument("--report-only", metavar="DIR", help="re-render results.md and plots from DIR/results.json")
    p.add_argument("--baseline", metavar="DIR", help="add a before → after table against DIR/results.json "
                                                     "(a run of this benchmark on the code before a change)")
    a = p.parse_args(argv)
    if a.report_only:
        out = Path(a.report_only)
        res = json.loads((out / "results.json").read_text())
        if a.baseline:
            res["baseline"] = _baseline(Path(a.baseline))
        res["goals"] = report.goals(res)
        res["plots"] = report.plots(res, out)
        (out / "results.md").write_text(report.markdown(res))
        print(f"[bench] wrote {out / 'results.md'}")
        return 0
    started = time.perf_counter()
    spec = Spec(**(QUICK if a.quick else {}))
    if a.rounds:
        spec.rounds = a.rounds
    if a.threads:
        spec.threads = a.threads
    if a.ours_set:
        import yaml

        from components.config import set_dotted

        for item in a.ours_set:
            k, _, v = item.partition("=")
            set_dotted(spec.extra, k, yaml.safe_load(v))
    date = time.strftime("%Y-%m-%d")
    out = Path(a.out) if a.out else RESULTS / (date + ("-quick" if a.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.run" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    info = machine()
    print(f"[bench] {info['cpu']}, load {info['loadavg']}; results → {out}", flush=True)

    flops = matmul_peak(spec.threads)
    print(f"[bench] fp32 matmul peak on {spec.threads} thread(s): {flops['peak_flops'] / 1e9:.1f} GFLOP/s", flush=True)
    paths = prepare(spec)
    print(f"[bench] SFT checkpoint {paths['sft']} (held-out accuracy {paths['sft_accuracy']:.3f})", flush=True)

    res: dict = {"date": date, "command": command, "spec": asdict(spec), "machine": info, "flops": flops,
                 "sft_accuracy": paths["sft_accuracy"], "trl_loss": TRL_LOSS[spec.loss],
                 "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}
    sides = {}
    work = out / "work"
    (out / "ours.json").unlink(missing_ok=True)
    both = "ours" not in a.skip and "trl" not in a.skip
    # A-B-A: kfp-grpo's first half, all of TRL, kfp-grpo's second half (its stages restart from disk),
    # so a machine whose load drifts during the run weighs on both sides alike.
    half = spec.rounds // 2 if both and spec.rounds >= 2 else None
    if "ours" not in a.skip:
        sides["ours"] = _side("benchmarks.ours", spec, paths, out / "ours.json", work / "ours", half)
    if "trl" not in a.skip:
        sides["trl"] = _side("benchmarks.trl_runner", spec, paths, out / "trl.json", work / "trl")
    if half:
        sides["ours"] = _side("benchmarks.ours", spec, paths, out / "ours.json", work / "ours")
    if sides:
        any_side = next(iter(sides.values()))
        res["n_params"] = any_side["n_params"]
        res["curves"] = {k: v["curve"] for k, v in sides.items()}
    if "trl" in sides:
        res["trl_optim"] = sides["trl"].get("optim")
    if len(sides) == 2:
        res["throughput"] = {k: report.throughput(v, spec.warmup_rounds) for k, v in sides.items()}
        res["learning"] = report.learning(sides["ours"], sides["trl"])
    if "pipeline" not in a.skip:
        cmd = [sys.executable, "-m", "benchmarks.pipeline_overhead", "--workdir", str(work / "pipeline"),
               "--out", str(out / "pipeline.json")] + (["--quick"] if a.quick else [])
        for item in a.pipeline_set:
            cmd += ["--set", item]
        print("[bench] running the local pipeline (kfp-grpo run) for the overhead breakdown", flush=True)
        subprocess.run(cmd, check=True, env=_env(), cwd=str(ROOT.parent))
        res["pipeline"] = json.loads((out / "pipeline.json").read_text())
    if a.baseline:
        res["baseline"] = _baseline(Path(a.baseline))
    res["loadavg_end"] = loadavg()
    res["elapsed_min"] = (time.perf_counter() - started) / 60
    res["goals"] = report.goals(res)
    res["plots"] = report.plots(res, out)
    (out / "results.md").write_text(report.markdown(res))
    write_json(res, out / "results.json")
    print(f"[bench] wrote {out / 'results.md'}", flush=True)
    for g in res["goals"]:
        print(f"[bench] {g}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
