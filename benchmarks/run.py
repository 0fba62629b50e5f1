"""Step throughput of kfp-grpo vs TRL GRPOTrainer, pipeline overhead and FLOP/s, in one command.

    python -m benchmarks.run                 # 6 steps per side + the default's local pipeline
    python -m benchmarks.run --quick         # 3 steps per side + a reduced pipeline
    python -m benchmarks.run --smoke --skip pipeline   # seconds (tests/test_benchmarks.py)

Settings come from the default config at run time (`--set KEY=VALUE` changes it, for both
sides and the pipeline). Writes benchmarks/results/<date>[-quick|-smoke]/results.md,
results.json, throughput.png and pipeline_overhead.png; `--publish` copies the table into
benchmarks/RESULTS.md. Learning (accuracy vs wall time over seeds): `python -m benchmarks.learning`.

Each side runs in its own fresh Python process (same threads, same environment); kfp-grpo's
steps are split around TRL's (A-B-A) so drifting machine load weighs on both alike. The SFT
checkpoint both start from is made once per setting and cached in benchmarks/results/cache/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks import report
from benchmarks.common import RESULTS, ROOT, Spec, child_env, comparison_config, default_config, loadavg, machine, \
    matmul_peak, parse_sets, prepare, publish, run_side, write_json

ROUNDS = {"full": 6, "quick": 3, "smoke": 2}


def _baseline(path: Path) -> dict:
    base = report.load(path)
    return {"label": f"{base['date']}, `{base['command']}`" + (f" — {base['note']}" if base.get("note") else ""),
            "throughput": base["throughput"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="3 steps per side and a reduced pipeline")
    size.add_argument("--smoke", action="store_true", help="a tiny config and 2 steps per side (seconds)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change the default config (both sides and the pipeline), as kfp-grpo run --set")
    p.add_argument("--rounds", type=int, help="steps per side")
    p.add_argument("--skip", action="append", default=[], choices=["ours", "trl", "pipeline"],
                   help="leave a part out (repeatable)")
    p.add_argument("--out", help="output folder (default benchmarks/results/<date>[-quick|-smoke])")
    p.add_argument("--publish", action="store_true", help="copy the table and plots into benchmarks/RESULTS.md")
    p.add_argument("--report-only", metavar="DIR", help="re-render results.md and plots from DIR/results.json")
    p.add_argument("--baseline", metavar="DIR", help="add a before → after table against DIR/results.json")
    a = p.parse_args(argv)
    if a.report_only:
        out = Path(a.report_only)
        res = report.load(out)
        if a.baseline:
            res["baseline"] = _baseline(Path(a.baseline))
        md = report.render(res, out)
        print(f"[bench] wrote {md}")
        if a.publish:
            print(f"[bench] published to {publish(md.read_text(), 'throughput', [out / n for n in res['plots']])}")
        return 0
    started = time.perf_counter()
    kind = "smoke" if a.smoke else "quick" if a.quick else "full"
    overrides = parse_sets(a.set)
    compared, changes = comparison_config(default_config(overrides, smoke=a.smoke))
    rounds = a.rounds or ROUNDS[kind]
    spec = Spec(compared.to_json(), rounds=rounds, eval_every=0, warmup_rounds=1 if rounds > 1 else 0,
                changes=changes)
    date = time.strftime("%Y-%m-%d")
    out = Path(a.out) if a.out else RESULTS / (date + ("" if kind == "full" else f"-{kind}"))
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.run" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    info = machine()
    print(f"[bench] {info['cpu']}, load {info['loadavg']}; results → {out}", flush=True)

    flops = matmul_peak(compared.torch_threads, seconds=0.3 if a.smoke else 3.0)
    print(f"[bench] fp32 matmul peak on {flops['threads']} thread(s): {flops['peak_flops'] / 1e9:.1f} GFLOP/s",
          flush=True)
    paths = prepare(compared)
    print(f"[bench] SFT checkpoint {paths['sft']} (held-out accuracy {paths['sft_accuracy']:.3f})", flush=True)

    res: dict = {"date": date, "command": command, "machine": info, "seeds": [compared.seed],
                 "settings": spec.settings(), "changes": changes, "spec": asdict(spec), "flops": flops,
                 "sft_accuracy": paths["sft_accuracy"], "warmup_rounds": spec.warmup_rounds}
    sides = {}
    work = out / "work"
    (out / "ours.json").unlink(missing_ok=True)
    both = "ours" not in a.skip and "trl" not in a.skip
    # A-B-A: kfp-grpo's first half, all of TRL, kfp-grpo's second half (its stages restart from disk)
    half = spec.rounds // 2 if both and spec.rounds >= 2 else None
    if "ours" not in a.skip:
        sides["ours"] = run_side("benchmarks.ours", spec, paths, out / "ours.json", work / "ours", half)
    if "trl" not in a.skip:
        sides["trl"] = run_side("benchmarks.trl_runner", spec, paths, out / "trl.json", work / "trl")
    if half:
        sides["ours"] = run_side("benchmarks.ours", spec, paths, out / "ours.json", work / "ours")
    if sides:
        res["n_params"] = next(iter(sides.values()))["n_params"]
        res["sides"] = sides
        res["trl_optim"] = sides.get("trl", {}).get("optim")
    if both:
        res["throughput"] = {k: report.throughput(v, spec.warmup_rounds, compared.grpo.beta) for k, v in sides.items()}
    if "pipeline" not in a.skip:
        cmd = [sys.executable, "-m", "benchmarks.pipeline_overhead", "--workdir", str(work / "pipeline"),
               "--out", str(out / "pipeline.json")] + ([f"--{kind}"] if kind != "full" else [])
        for item in a.set:
            cmd += ["--set", item]
        print("[bench] running the local pipeline (kfp-grpo run) for the overhead breakdown", flush=True)
        subprocess.run(cmd, check=True, env=child_env(), cwd=str(ROOT.parent))
        res["pipeline"] = json.loads((out / "pipeline.json").read_text())
    if a.baseline:
        res["baseline"] = _baseline(Path(a.baseline))
    res["loadavg_end"] = loadavg()
    res["elapsed_min"] = (time.perf_counter() - started) / 60
    md = report.render(res, out)
    write_json(res, out / "results.json")
    print(f"[bench] wrote {md}", flush=True)
    if a.publish:
        print(f"[bench] published to {publish(md.read_text(), 'throughput', [out / n for n in res['plots']])}")
    for g in res["goals"]:
        print(f"[bench] {g}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
