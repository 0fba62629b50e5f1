"""Warm task processes (`pipelines/zygote.py`) and the fast exit of a successful task: real kfp.local runs.

A task forked from the warm process must be indistinguishable from kfp.local's fresh
subprocess: same exit status (success, exception, sys.exit, killed), same output, same
fresh torch state (threads, default RNG), same pipeline results bit for bit; a run that is
interrupted or whose driver is killed leaves no process behind and resumes.
"""

# no `from __future__ import annotations`: kfp reads the test components' annotations as types

import contextlib
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components.config import load_config
from pipelines import local as local_run
from tests.conftest import subprocess_env as _env

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["sft.steps=20", "reward_model.steps=5", "replay.steps=5", "rollout.prompts_per_step=8",
         "loop.iterations=1", "loop.steps_per_iteration=1", "data.num_train=200", "data.num_test=40"]
TIMING = re.compile(r"seconds|per_s")  # metrics that measure time, not results

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="warm task processes need fork()")


def _small_config(**extra):
    import yaml

    from components.config import set_dotted

    overrides: dict = dict(extra)
    for item in SMALL:
        key, _, value = item.partition("=")
        set_dotted(overrides, key, yaml.safe_load(value))
    return load_config(None, overrides)


# =========================================================================== one task, both ways
def report() -> str:
    """What a task process finds when it starts: torch's threads, an unseeded and a seeded draw, a
    matmul, its argv and environment."""
    import json
    import os
    import sys

    import torch

    unseeded = torch.rand(4).tolist()
    torch.manual_seed(0)
    a, b = torch.randn(96, 96), torch.randn(96, 96)
    return json.dumps({"threads": torch.get_num_threads(), "unseeded": unseeded, "seeded": torch.rand(4).tolist(),
                       "matmul": (a @ b).sum().item(), "argv0": sys.argv[0], "cwd": os.getcwd(),
                       "runtime": os.environ.get("_KFP_RUNTIME"), "marker": os.environ.get("WARM_TEST_MARKER"),
                       "pid": os.getpid()})


def raises():
    raise ValueError("boom from the task")


def exits(code: int):
    import sys

    sys.exit(code)


def killed():
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def _tasks(tmp_path: Path, warm: bool):
    """kfp.local set up for single tasks, launched warm or plain; yields the launch and the exit
    codes kfp.local got."""
    from kfp import dsl, local
    from kfp.local import subprocess_task_handler as sth

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / f"kfp-{warm}"),
               raise_on_error=False)
    comps = {f.__name__: dsl.component(f, base_image="python:3.11", install_kfp_package=False)
             for f in (report, raises, exits, killed)}
    codes: list[int] = []
    with local_run.warm_task_processes(tmp_path / f"run-{warm}.log", warm) as launch:
        inner = sth.run_local_subprocess

        def spy(full_command, env_vars=None):
            code = inner(full_command=full_command, env_vars=env_vars)
            codes.append(code)
            return code

        sth.run_local_subprocess = spy
        try:
            yield comps, launch, codes
        finally:
            sth.run_local_subprocess = inner


def test_a_warm_task_exits_prints_and_starts_like_a_fresh_subprocess(tmp_path, monkeypatch, capfd):
    """For the same kfp.local commands, the warm process's children and plain subprocesses give the
    same exit codes (0, 1 for an exception, sys.exit's, 128 + 9 when killed), the same output, and
    a fresh torch state: same thread count, its own random seed, the same seeded draws and matmul
    bit for bit."""
    monkeypatch.setenv("WARM_TEST_MARKER", "set-by-the-driver")
    results = {}
    for warm in (True, False):
        with _tasks(tmp_path, warm) as (c, launch, codes):
            assert (launch.pool is not None) == warm
            reports = [json.loads(c["report"]().output)]
            if warm:
                reports.append(json.loads(c["report"]().output))  # a second child: no state carried over
            capfd.readouterr()
            c["raises"]()
            raised = capfd.readouterr().out
            c["exits"](code=3)
            capfd.readouterr()
            c["killed"]()
            killed_out = capfd.readouterr().out
            assert launch.pool is None or launch.pool.broken is None, launch.pool.broken
        assert "ValueError: boom from the task" in raised and "Traceback" in raised
        assert "Killed" in killed_out
        results[warm] = reports, codes
    (warm_reports, warm_codes), (plain_reports, plain_codes) = results[True], results[False]
    killed_code = 128 + signal.SIGKILL  # kfp runs python under `sh -ec`, which reports the signal so
    assert warm_codes == [0, 0, 1, 3, killed_code] and plain_codes == [0, 1, 3, killed_code]
    plain = plain_reports[0]
    assert warm_reports[0]["pid"] != warm_reports[1]["pid"]
    assert warm_reports[0]["unseeded"] != warm_reports[1]["unseeded"], "each child seeds itself, as a fresh process"
    for r in warm_reports:
        assert r["runtime"] == "true" and r["marker"] == "set-by-the-driver"
        same = ("threads", "seeded", "matmul", "argv0", "cwd", "runtime", "marker")
        assert {k: r[k] for k in same} == {k: plain[k] for k in same}


# =========================================================================== fast exit (plain subprocesses)
def fast_exit_task(marks: str, fail: bool):
    """Ends with exit_fast_on_success() as the pipeline's components do; records what ran at exit."""
    import atexit
    import os
    import sys

    from pipelines.runtime import exit_fast_on_success

    class Teardown:
        fd = os.open(marks, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

        def __del__(self, write=os.write):  # at teardown, builtins and modules may be gone
            write(self.fd, b"teardown\n")

    sys.modules["__main__"].__dict__["_teardown_probe"] = Teardown()  # finalised only by a full teardown
    atexit.register(lambda: open(marks, "a").write("atexit\n"))
    exit_fast_on_success()
    if fail:
        raise RuntimeError("the task failed after arming the fast exit")


def test_fast_exit_skips_the_teardown_of_a_successful_task_only(tmp_path):
    """A plain task process that succeeded runs its atexit handlers and skips the interpreter's
    teardown; one that raised keeps the normal exit: teardown, status 1, the task fails."""
    from kfp import dsl, local
    from kfp.local import subprocess_task_handler as sth

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"),
               raise_on_error=False)
    task = dsl.component(fast_exit_task, base_image="python:3.11", install_kfp_package=False)
    codes: list[int] = []
    plain = sth.run_local_subprocess

    def spy(full_command, env_vars=None):
        codes.append(plain(full_command, env_vars))
        return codes[-1]

    sth.run_local_subprocess = spy
    try:
        for fail in (False, True):
            task(marks=str(tmp_path / f"marks-{fail}"), fail=fail)
    finally:
        sth.run_local_subprocess = plain
    assert codes == [0, 1]
    assert (tmp_path / "marks-False").read_text().split() == ["atexit"]  # no teardown after success
    assert sorted((tmp_path / "marks-True").read_text().split()) == ["atexit", "teardown"]


# =========================================================================== whole pipeline runs
def _outputs(workdir: Path) -> dict[str, object]:
    """Every output file of a local run (content hash; Metrics without timings), by task/output."""
    import hashlib

    out: dict[str, object] = {}
    (run_dir,) = (workdir / "kfp").iterdir()
    for path in sorted(run_dir.rglob("*")):
        if not path.is_file() or path.name == "executor_output.json":  # holds this run's own paths
            continue
        key = str(path.relative_to(run_dir))
        if path.parent.name == "metrics" or path.name == "metrics":
            out[key] = {k: v for k, v in json.loads(path.read_text()).items() if not TIMING.search(k)}
        else:
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def test_a_warm_run_equals_a_plain_run(tmp_path, monkeypatch):
    """`kfp-grpo run` through the warm process and with plain subprocesses (same config and seed):
    every dataset, model file and metric is identical, and so is the outcome."""
    monkeypatch.chdir(tmp_path)
    cfg = _small_config()
    init = {"init_policy_uri": "", "init_reward_uri": ""}
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # each run: its own embedded store
    warm = local_run.run_local(cfg, tmp_path / "warm", init, warm_tasks=True)
    assert "[zygote]" in Path(warm["logs"], "run.log").read_text()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # (MLflow exports the URI it was set to)
    plain = local_run.run_local(cfg, tmp_path / "plain", init, warm_tasks=False)
    assert "[zygote]" not in Path(plain["logs"], "run.log").read_text()
    a, b = _outputs(tmp_path / "warm"), _outputs(tmp_path / "plain")
    assert len(a) > 20 and any(k.endswith(".safetensors") for k in a)
    assert a == b
    for key in ("start_accuracy", "challenger_accuracy", "promoted", "policy_version"):
        assert warm[key] == plain[key], key


def test_a_task_that_raises_fails_a_warm_run_with_its_error(tmp_path, monkeypatch):
    """A run-time setting that start-tracking rejects: the warm run fails in that task, with its error
    in the task's log and the one-line reason."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _small_config(cluster={"stages": {"prepare_data": {"retries": 0}}})  # no retry after 30 s
    with pytest.raises(local_run.PipelineFailed, match="FAILURE. Inner task failed: .start-tracking"):
        local_run.run_local(cfg, tmp_path, {"init_policy_uri": "", "init_reward_uri": "", "grpo_beta": -1.0},
                            warm_tasks=True)
    (log,) = glob.glob(str(tmp_path / "logs" / "*" / "start-tracking.log"))
    assert "grpo.beta: Input should be greater than or equal to 0" in Path(log).read_text()
    assert "[zygote]" in Path(log).with_name("run.log").read_text()
    assert not list((tmp_path / "kfp").glob("*/prepare-data"))


# =========================================================================== interrupt, kill, resume
def _descendants(pid: int) -> set[int]:
    """pid's descendant processes (Linux /proc)."""
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for children in glob.glob(f"/proc/{p}/task/*/children"):
            with contextlib.suppress(OSError):
                kids = {int(c) for c in Path(children).read_text().split()}
                todo += list(kids - found)
                found |= kids
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.add(pid)
    return alive


def _start_run(workdir: Path, *extra: str, sets: list[str] = SMALL) -> tuple[subprocess.Popen, Path]:
    log = workdir.with_suffix(".log")
    argv = [sys.executable, "-m", "pipelines.cli", "run", "--workdir", str(workdir)]
    for item in sets:
        argv += ["--set", item]
    # as a run started from a terminal: a test run started in the background (`cmd &`, nohup) inherits
    # an ignored SIGINT, which Python then keeps ignoring, and Ctrl-C would never reach the run
    proc = subprocess.Popen([*argv, *extra], cwd=ROOT, env=_env(), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return proc, log


def _wait_for_task(proc: subprocess.Popen, workdir: Path, task: str, log: Path) -> set[int]:
    """Wait until `task` runs; return the run's processes then (the warm process and the task's)."""
    deadline = time.time() + 240
    while not glob.glob(str(workdir / "logs" / "*" / f"{task}.log")):
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    time.sleep(0.5)
    procs = _descendants(proc.pid)
    assert len(procs) >= 2, "the warm process and the task's child"
    return procs


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_stops_a_warm_run_without_leftovers_and_it_resumes(tmp_path):
    """SIGINT to the run's process group (Ctrl-C) while sft runs: the run fails as 'interrupted',
    no process of it is left, and `--resume` completes it without rerunning finished tasks."""
    workdir = tmp_path / "run"
    sets = [item for item in SMALL if not item.startswith("sft.steps=")] + ["sft.steps=400"]  # still running at ^C
    proc, log = _start_run(workdir, sets=sets)
    procs = _wait_for_task(proc, workdir, "sft", log)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 1
    text = log.read_text()
    assert "interrupted" in text, text[-3000:]
    time.sleep(0.5)
    assert not _alive(procs), f"left running: {_alive(procs)}"
    parent = re.search(r"--resume ([0-9a-f]{32})", text).group(1)
    resumed = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--workdir", str(workdir),
                              *[a for item in sets for a in ("--set", item)], "--resume", parent],
                             cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    newest = sorted((workdir / "logs").iterdir())[-1]  # the resumed run's task logs
    ran = {p.stem for p in newest.glob("*.log")}
    assert "prepare-data" not in ran and "sft" in ran, ran  # a cache hit, and the interrupted task again


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_driver_leaves_no_warm_process_or_task_behind(tmp_path):
    """SIGKILL to `kfp-grpo run` alone (not its group): the warm process sees its driver gone and
    ends itself and the running task within seconds."""
    workdir = tmp_path / "run"
    proc, log = _start_run(workdir)
    procs = _wait_for_task(proc, workdir, "sft", log)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 20
    while _alive(procs) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(procs), f"left running: {_alive(procs)}"
