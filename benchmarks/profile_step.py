"""Profile one GRPO step of kfp-grpo (rollout + update stages, in process) with the torch profiler
and cProfile; the tables that pointed at the speed-ups listed in benchmarks/README.md.

    python -m benchmarks.profile_step [--steps 2] [--out DIR]

Writes DIR/profile_torch.txt (top torch ops by self CPU time) and DIR/profile_python.txt
(top Python functions by cumulative time). For a flame graph of either side use py-spy:

    py-spy record -o ours.svg -- python -m benchmarks.run --quick --skip trl --skip pipeline
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import time
from pathlib import Path

from benchmarks.common import RESULTS, comparison_config, default_config, parse_sets, prepare, setup_torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / f"profile-{time.strftime('%Y-%m-%d')}"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change the default config")
    a = p.parse_args()
    cfg = comparison_config(default_config(parse_sets(a.set)))[0]  # the settings benchmarks.run measures
    paths = prepare(cfg)
    setup_torch(cfg.torch_threads)
    import torch

    from components import grpo_update, rollout
    out = Path(a.out)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    def step(r: int, policy: str) -> str:
        roll, new = str(work / f"rollout-{r}.parquet"), str(work / f"policy-{r}")
        rollout.run(cfg, paths["train"], policy, None, roll, step=r)
        grpo_update.run(cfg, [roll], policy, paths["sft"], new, step=r)
        return new

    policy = step(0, paths["sft"])  # warm-up
    prof = cProfile.Profile()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tp:
        prof.enable()
        for r in range(1, a.steps + 1):
            policy = step(r, policy)
        prof.disable()
    (out / "profile_torch.txt").write_text(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(60)
    (out / "profile_python.txt").write_text(s.getvalue())
    print(f"wrote {out / 'profile_torch.txt'} and {out / 'profile_python.txt'}")


if __name__ == "__main__":
    main()
