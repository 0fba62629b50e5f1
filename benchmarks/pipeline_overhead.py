"""Pipeline overhead: where the wall time of a local `kfp-grpo run` goes.

Runs `pipelines.local.run_local` (what `kfp-grpo run` calls) in this process, with
every task subprocess traced by `benchmarks/_trace/sitecustomize.py`, and splits the
run's wall time (from this process's start, so the CLI's imports count) into:

    stage compute   components.<stage>.run, minus its model load/save and Parquet I/O
    model load/save components.modeling.load_policy / load_reward_model / save_model
    artifact I/O    Parquet/JSON reads and writes, MLflow artifact copies (registry)
    task start      fork/exec of the task process until the interpreter runs
    task imports    interpreter start until the task body starts (kfp executor, torch, transformers, mlflow)
    task tracking   the task body outside the stage (config, MLflow nested run, metric logging)
    task exit       the task body's end until the process is reaped (executor output, shutdown)
    driver          everything outside the task processes (CLI imports, compile, kfp.local orchestration)

Everything but "stage compute" is overhead.

    python -m benchmarks.pipeline_overhead --workdir W --out overhead.json [--quick|--smoke] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, SMOKE, loadavg, versions, write_json

TRACE_DIR = ROOT / "_trace"
QUICK = {
    "data": {"num_train": 400, "num_test": 100},
    "sft": {"steps": 30},
    "reward_model": {"steps": 10},
    "rollout": {"prompts_per_step": 16},
    "replay": {"steps": 10},
    "loop": {"iterations": 1, "steps_per_iteration": 1},
}
CATEGORIES = ("stage compute", "model load/save", "artifact I/O", "task start", "task imports", "task tracking",
              "task exit", "driver")


def env_for_trace(trace: Path) -> dict[str, str]:
    """Environment that makes task processes import the tracer."""
    path = os.environ.get("PYTHONPATH", "")
    return {"KFP_GRPO_BENCH_TRACE": str(trace),
            "PYTHONPATH": str(TRACE_DIR) + (os.pathsep + path if path else "")}


def _proc_start() -> float:
    try:
        with open("/proc/self/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as fh:
            btime = next(int(ln.split()[1]) for ln in fh if ln.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration):
        return time.time()


def task_name(cmd: list[str]) -> str:
    """The pipeline task's name, from the output paths in its executor input."""
    try:
        ex = json.loads(cmd[cmd.index("--executor_input") + 1])
        out = ex["outputs"]
        path = out.get("outputFile") or next(iter(out["artifacts"].values()))["artifacts"][0]["uri"]
        return Path(path).parent.name
    except (ValueError, KeyError, IndexError, StopIteration, json.JSONDecodeError):
        fn = cmd[cmd.index("--function_to_execute") + 1] if "--function_to_execute" in cmd else "?"
        return fn


def run(cfg, workdir: Path, trace: Path) -> dict:
    from kfp.local import status
    from kfp.local import subprocess_task_handler as sth

    from pipelines.local import run_local

    tasks: list[dict] = []
    original = sth.SubprocessTaskHandler.run  # what launches a task, through warm processes or not

    @functools.wraps(original)
    def traced(handler):
        seq = str(len(tasks))
        rec = {"seq": seq, "task": task_name(handler.full_command), "t0": time.time()}
        handler.env_vars = {**(handler.env_vars or {}), "KFP_GRPO_BENCH_SEQ": seq}
        result = original(handler)
        rec.update(t1=time.time(), rc=0 if result == status.Status.SUCCESS else 1)
        tasks.append(rec)
        return result

    sth.SubprocessTaskHandler.run = traced
    try:
        summary = run_local(cfg, workdir, {"init_policy_uri": "", "init_reward_uri": ""})
    finally:
        sth.SubprocessTaskHandler.run = original
    return {"tasks": tasks, "summary": {k: v for k, v in summary.items() if k != "text"}}


def cpu_seconds() -> float:
    """User + system CPU time of this process and of every process it waited for (task processes,
    and the warm task process with the tasks it forked)."""
    import resource

    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def _union(spans: list[tuple[float, float]]) -> float:
    """Total length of the union of intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def analyse(tasks: list[dict], trace: Path, t_start: float, t_end: float) -> dict:
    """Split the run's wall time into CATEGORIES, in total and per task."""
    events: dict[str, list[dict]] = {}
    for f in trace.glob("*.jsonl"):
        recs = [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()]
        start = next((r for r in recs if r["ev"] == "start"), None)
        if start and start.get("seq") is not None:
            events.setdefault(start["seq"], []).extend(recs)
    rows = []
    for t in tasks:
        recs = events.get(t["seq"], [])
        start = next((r for r in recs if r["ev"] == "start"), None)
        spans = [r for r in recs if r["ev"] == "span"]
        body = [r for r in spans if r["cat"] == "task" and r["depth"] == 0]
        stages = [r for r in spans if r["cat"] == "stage" and r["depth"] == 0]
        wall = t["t1"] - t["t0"]
        row = {"task": t["task"], "wall": wall, "stage": stages[0]["name"] if stages else None}
        if start is None or not body:  # not traced (e.g. a task without a stage): all overhead
            row.update({c: 0.0 for c in CATEGORIES[:-1]})
            row["task tracking"] = wall
            rows.append(row)
            continue
        proc = max(t["t0"], min(start["proc_start"], start["t"]))
        b0, b1 = min(r["t0"] for r in body), max(r["t1"] for r in body)
        registry = [r for r in spans if r["cat"] == "registry"]  # logging a model loads it: counted here only
        model_io = _union([(r["t0"], r["t1"]) for r in spans if r["cat"] == "model_io" and not any(
            g["t0"] <= r["t0"] and r["t1"] <= g["t1"] for g in registry)])
        data_io = _union([(r["t0"], r["t1"]) for r in spans if r["cat"] in ("data_io", "registry")])
        stage = sum(r["t1"] - r["t0"] for r in stages)
        # module imports inside the task body (run_task imports components.<stage> lazily)
        body_import = _union([(r["t0"], r["t1"]) for r in spans if r["cat"] == "import" and r["depth"] == 0
                              and b0 <= r["t0"] and r["t1"] <= b1 and not any(
                                  s["t0"] <= r["t0"] and r["t1"] <= s["t1"] for s in stages)])
        stage_io = _union([(r["t0"], r["t1"]) for r in spans if r["cat"] in ("model_io", "data_io", "registry")
                           and any(s["t0"] <= r["t0"] and r["t1"] <= s["t1"] for s in stages)])
        row.update({
            "task start": max(0.0, start["t"] - t["t0"]),
            "task imports": max(0.0, b0 - start["t"]) + body_import,
            "stage compute": stage - stage_io,
            "model load/save": model_io,
            "artifact I/O": data_io,
            "task tracking": max(0.0, (b1 - b0) - stage - (model_io + data_io - stage_io) - body_import),
            "task exit": max(0.0, t["t1"] - b1),
        })
        row["_proc_start_lag"] = proc - t["t0"]
        rows.append(row)
    total = t_end - t_start
    sums = {c: sum(r.get(c, 0.0) for r in rows) for c in CATEGORIES[:-1]}
    sums["driver"] = total - sum(r["wall"] for r in rows)
    compute = sums["stage compute"]
    return {"total_wall": total, "categories": sums, "tasks": rows, "overhead_fraction": 1 - compute / total,
            "stage_compute": compute}


def mlflow_stage_seconds(uri: str) -> dict[str, float]:
    """Σ `<stage>/seconds` over the nested MLflow runs (the stages' own timing), per stage."""
    import mlflow

    c = mlflow.MlflowClient(uri)
    out: dict[str, float] = {}
    for exp in c.search_experiments():
        for r in c.search_runs([exp.experiment_id], max_results=1000):
            stage = r.data.tags.get("kfp_grpo.stage")
            if stage and f"{stage}/seconds" in r.data.metrics:
                out[stage] = out.get(stage, 0.0) + r.data.metrics[f"{stage}/seconds"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a reduced config (1 iteration × 1 round, short SFT/RM)")
    size.add_argument("--smoke", action="store_true", help="the benchmarks' tiny smoke-test config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (as kfp-grpo)")
    a = p.parse_args()
    t_start = _proc_start()
    import yaml

    from components.config import _deep_merge, load_config, set_dotted

    over = dict(QUICK) if a.quick else dict(SMOKE) if a.smoke else {}
    for item in a.set:
        key, _, value = item.partition("=")
        extra: dict = {}
        set_dotted(extra, key, yaml.safe_load(value))
        over = _deep_merge(over, extra)
    cfg = load_config(None, over)
    workdir = Path(a.workdir)
    trace = workdir.with_name(workdir.name + "-trace")  # beside the run's work directory, which kfp-grpo claims
    for d in (workdir, trace):
        shutil.rmtree(d, ignore_errors=True)
    trace.mkdir(parents=True)
    os.environ.update(env_for_trace(trace))
    load0 = loadavg()
    res = run(cfg, workdir, trace)
    t_end = time.time()
    out = analyse(res["tasks"], trace, t_start, t_end)
    label = "tiny.yaml" + (" reduced (--quick)" if a.quick else " tiny (--smoke)" if a.smoke else "") \
        + (f" with {json.dumps(over)}" if over else "")
    out.update(config=label, overrides=over, loadavg_start=load0, loadavg_end=loadavg(), versions=versions(),
               summary=res["summary"], pipeline_seconds=res["summary"].get("seconds"), cpu_seconds=cpu_seconds())
    try:
        out["mlflow_stage_seconds"] = mlflow_stage_seconds(res["summary"]["tracking_uri"])
    except Exception as err:  # cross-check only
        out["mlflow_stage_seconds_error"] = str(err)
    write_json(out, a.out)
    print(f"[bench pipeline] {out['total_wall']:.1f}s wall, {out['cpu_seconds']:.1f} CPU-s, stage compute "
          f"{out['stage_compute']:.1f}s, overhead {100 * out['overhead_fraction']:.1f}%", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
