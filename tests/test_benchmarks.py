"""The benchmark harness, end to end on its tiny `--smoke` setting, so that it cannot break silently.

`python -m benchmarks.run` (kfp-grpo vs TRL step throughput) and `python -m benchmarks.learning`
(the default's runs over seeds, accuracy vs wall time) run as a user runs them, each side in its
own process; the phases they report come from the stages' returned metrics, and must be positive
and add up to no more than the time they split. ~2 minutes on 2 busy cores.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from benchmarks.common import LIBRARIES, PHASES, ROOT, SMOKE

pytest.importorskip("trl")


@pytest.fixture(autouse=True, scope="module")
def sft_cache(tmp_path_factory):
    """The SFT checkpoints of this module's runs, shared by its tests, not in benchmarks/results/cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("KFP_GRPO_BENCH_CACHE", str(tmp_path_factory.mktemp("sft-cache")))
    yield
    mp.undo()


def _check_phases(side: str, rounds: list[dict], expected: set[str]) -> None:
    for r in rounds:
        for kind in ("wall", "cpu"):
            phases = r[f"phase_{kind}"]
            assert set(phases) == expected, (side, phases)
            assert all(v > 0 for v in phases.values()), (side, kind, r["round"], phases)
            covered = sum(phases.values()) + r.get(f"other_{kind}", 0.0)
            assert sum(phases.values()) <= r[kind] + 1e-6 and covered == pytest.approx(r[kind]), (side, kind, r)
        assert r["rows"] > 0 and r["completion_tokens"] >= r["rows"] and r["prompt_tokens"] > 0


def _check_versions(recorded: dict, markdown: str) -> None:
    assert set(LIBRARIES) <= set(recorded) and all(recorded[k] for k in LIBRARIES), recorded
    for lib in LIBRARIES:
        assert f"{lib} {recorded[lib]}" in markdown


def test_benchmark_run_smoke(tmp_path):
    """Throughput harness: both sides run (kfp-grpo split A-B-A around TRL), every reported phase is > 0,
    phases never add up to more than the step, the report and plot are written."""
    from benchmarks import run

    out = tmp_path / "run"
    assert run.main(["--smoke", "--skip", "pipeline", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    spec_rounds = res["spec"]["rounds"]
    assert [r["round"] for r in res["sides"]["ours"]["rounds"]] == list(range(1, spec_rounds + 1))
    _check_phases("ours", res["sides"]["ours"]["rounds"], set(PHASES))
    _check_phases("trl", res["sides"]["trl"]["rounds"], set(PHASES) - {"io"})  # TRL keeps everything in memory
    for side in ("ours", "trl"):
        t = res["throughput"][side]
        for kind in ("wall", "cpu"):
            assert t[kind]["step_tok_s"] > 0 and t[kind]["update_flops_s"] > 0
            assert sum(t[kind]["phases_per_round"].values()) == pytest.approx(t[kind]["step_s_mean"])
        r0 = res["sides"][side]["rounds"][0]
        assert r0["rows"] == res["settings"]["completions_per_step"]
    assert res["settings"]["G"] == SMOKE["rollout"]["group_size"]  # the default + --smoke, read at run time
    assert all(" → " in c for c in res["changes"])
    md = (out / "results.md").read_text()
    _check_versions(res["machine"]["versions"], md)
    assert "| io |" in md and (out / "throughput.png").stat().st_size > 0
    assert res["goals"] and res["goals"][0].startswith("step throughput")


def test_benchmark_learning_smoke(tmp_path):
    """Learning harness: one in-process run of the (tiny) default, then kfp-grpo and TRL from one SFT
    checkpoint with an accuracy curve each; spread, equal-wall-time accuracy and the plot are reported."""
    from benchmarks import learning

    out = tmp_path / "learning"
    assert learning.main(["--smoke", "--seeds", "0", "--runner", "inprocess", "--out", str(out)]) == 0
    res = json.loads((out / "learning.json").read_text())
    (run,) = res["runs"]
    iterations = res["overrides"]["loop"]["iterations"]
    assert run["seed"] == 0 and len(run["curve"]) == iterations + 1 and run["curve"][0] == run["start"]
    assert 0 <= run["final"] <= 1 and run["final"] == run["curve"][-1]
    assert run["wall_s"] > 0 and run["cpu_s"] > 0
    assert res["runs_summary"]["final"]["n"] == 1 and res["runs_summary"]["final"]["std"] is None
    seed = res["curves"]["per_seed"]["0"]
    rounds = res["curves"]["rounds"]
    for side in ("ours", "trl"):
        curve = seed[side]["curve"]
        assert [p["round"] for p in curve] == list(range(rounds + 1)) and curve[0]["accuracy"] == seed["sft_accuracy"]
        assert all(a["wall"] < b["wall"] for a, b in zip(curve, curve[1:]))
        assert seed[side]["wall"] == pytest.approx(curve[-1]["wall"])
    assert seed["t_equal"] == min(seed["ours"]["wall"], seed["trl"]["wall"])
    md = (out / "learning.md").read_text()
    _check_versions(res["machine"]["versions"], md)
    assert len(res["goals"]) == 2 and (out / "learning.png").stat().st_size > 0


def _trace_module():
    spec = importlib.util.spec_from_file_location("bench_trace", ROOT / "_trace" / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # inactive: $KFP_GRPO_BENCH_TRACE is not set here
    return module


def test_pipeline_trace_targets_exist():
    """Every function the pipeline-overhead tracer wraps still exists under that name (they were renamed once)."""
    assert "KFP_GRPO_BENCH_TRACE" not in os.environ
    for module, functions in _trace_module()._TARGETS.items():
        mod = importlib.import_module(module)
        missing = [f for f in functions if not callable(getattr(mod, f, None))]
        assert not missing, f"{module} has no {missing}: update benchmarks/_trace/sitecustomize.py"


def test_pipeline_trace_times_a_task(tmp_path, cfg):
    """A pipeline task's process, traced as in benchmarks.pipeline_overhead: the task body, the stage and
    its Parquet writes are recorded as spans."""
    from benchmarks.common import child_env
    from benchmarks.pipeline_overhead import env_for_trace

    trace = tmp_path / "trace"
    trace.mkdir()
    env = {**child_env(), **env_for_trace(trace)}
    env["PYTHONPATH"] = env["PYTHONPATH"] + os.pathsep + str(ROOT.parent)
    code = ("import sys; from components import prepare_data; from pipelines.runtime import run_task; "
            "run_task(prepare_data.run, 'prepare-data', sys.argv[1], train=sys.argv[2], test=sys.argv[3])")
    subprocess.run([sys.executable, "-c", code, cfg.to_json(), str(tmp_path / "train.parquet"),
                    str(tmp_path / "test.parquet")], check=True, env=env, cwd=str(ROOT.parent))
    spans = [json.loads(ln) for f in trace.glob("*.jsonl") for ln in f.read_text().splitlines()]
    seen = {(s.get("cat"), s.get("name")) for s in spans}
    assert {("task", "run_task"), ("stage", "prepare_data"), ("data_io", "write_parquet")} <= seen, seen
    assert any(s["ev"] == "start" for s in spans)


def test_pipeline_overhead_smoke(tmp_path):
    """`benchmarks.pipeline_overhead --smoke` (what `benchmarks.run` runs for its overhead table): a real
    `kfp-grpo run` of the smoke config, traced; the breakdown covers the run and names every task."""
    import subprocess
    import sys

    out = tmp_path / "pipeline.json"
    res = subprocess.run([sys.executable, "-m", "benchmarks.pipeline_overhead", "--smoke", "--workdir",
                          str(tmp_path / "work"), "--out", str(out)], cwd=ROOT.parent, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert 0 < data["stage_compute"] < data["total_wall"] and 0 < data["overhead_fraction"] < 1
    assert {"start-tracking", "sft", "promote"} <= {t["task"] for t in data["tasks"]}, data["tasks"]
