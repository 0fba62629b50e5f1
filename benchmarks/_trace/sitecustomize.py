"""Timing trace for the pipeline-overhead benchmark (inactive unless $KFP_GRPO_BENCH_TRACE is set).

`benchmarks.pipeline_overhead` puts this directory on PYTHONPATH, so every pipeline task
process imports it at interpreter start. It records, into
``$KFP_GRPO_BENCH_TRACE/<pid>.jsonl``, the process start time and the spans of:

    task      pipelines.runtime.run_task / gather / accumulate, pipelines.warm_start.sft_task /
              reward_model_task, pipelines.parent_run.start_parent_run / promote_task (the task body)
    stage     components.<stage>.run (outermost only)
    model_io  components.modeling.load_policy / load_reward_model / save_model
    data_io   components.io.read_parquet / write_parquet / write_json
    registry  components.tracking.log_policy / log_reward_model / download_model (MLflow model logging, copies)
    import    executing one of these modules (outermost only: includes torch/transformers imports)

The functions are wrapped in their modules right after the module executes, so later
``from module import name`` imports get the wrapped version. Nothing in components/ or
pipelines/ is edited. A task forked from `kfp-grpo run`'s warm process (pipelines/zygote.py)
inherits the wrapped modules; its start record is its fork time.
"""

import os

# module → {function: category}; tests/test_benchmarks.py checks that every one of them exists
_STAGES = ("prepare_data", "sft", "reward_model", "rollout", "grpo_update", "rm_replay", "evaluate", "promote")
_TARGETS = {
    "pipelines.runtime": {"run_task": "task", "gather": "task", "accumulate": "task"},
    "pipelines.warm_start": {"sft_task": "task", "reward_model_task": "task"},
    "pipelines.parent_run": {"start_parent_run": "task", "promote_task": "task"},
    "components.modeling": {"load_policy": "model_io", "load_reward_model": "model_io", "save_model": "model_io"},
    "components.io": {"read_parquet": "data_io", "write_parquet": "data_io", "write_json": "data_io"},
    "components.tracking": {"log_policy": "registry", "log_reward_model": "registry", "download_model": "registry"},
    **{f"components.{s}": {"run": "stage"} for s in _STAGES},
}

_DIR = os.environ.get("KFP_GRPO_BENCH_TRACE")

if _DIR:
    import functools
    import importlib.abc
    import importlib.util
    import json
    import sys
    import time

    _T_IMPORT = time.time()
    _FILE = os.path.join(_DIR, f"{os.getpid()}.jsonl")
    _DEPTH: dict = {}

    _FORKED: list = []  # a task forked from a warm process: its start record, written with its first span

    def _emit(rec: dict) -> None:
        if _FORKED:  # by now the child has the task's environment (KFP_GRPO_BENCH_SEQ)
            t = _FORKED.pop()
            _FORKED.clear()
            _emit({"ev": "start", "pid": os.getpid(), "seq": os.environ.get("KFP_GRPO_BENCH_SEQ"),
                   "proc_start": t, "t": t, "argv0": "fork"})
        with open(_FILE, "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    def _forked() -> None:
        global _FILE
        _FILE = os.path.join(_DIR, f"{os.getpid()}.jsonl")
        _FORKED[:] = [time.time()]

    os.register_at_fork(after_in_child=_forked)

    def _proc_start() -> float:
        """Process start (epoch seconds) from /proc: clock ticks since boot + boot time."""
        try:
            with open("/proc/self/stat") as fh:
                ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
            with open("/proc/stat") as fh:
                btime = next(int(ln.split()[1]) for ln in fh if ln.startswith("btime"))
            return btime + ticks / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, StopIteration):
            return _T_IMPORT

    _emit({"ev": "start", "pid": os.getpid(), "seq": os.environ.get("KFP_GRPO_BENCH_SEQ"),
           "proc_start": _proc_start(), "t": _T_IMPORT, "argv0": sys.argv[0] if sys.argv else ""})

    def _wrap(fn, cat: str, name: str):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            depth = _DEPTH.get(cat, 0)
            _DEPTH[cat] = depth + 1
            t0 = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                _DEPTH[cat] = depth
                _emit({"ev": "span", "cat": cat, "name": name, "t0": t0, "t1": time.time(), "depth": depth})
        timed.__bench_traced__ = True
        return timed

    class _Loader(importlib.abc.Loader):
        def __init__(self, inner, name):
            self.inner, self.name = inner, name

        def create_module(self, spec):
            return self.inner.create_module(spec)

        def exec_module(self, module):
            depth = _DEPTH.get("import", 0)
            _DEPTH["import"] = depth + 1
            t0 = time.time()
            try:
                self.inner.exec_module(module)
            finally:
                _DEPTH["import"] = depth
                _emit({"ev": "span", "cat": "import", "name": self.name, "t0": t0, "t1": time.time(),
                       "depth": depth})
            for attr, cat in _TARGETS[self.name].items():
                fn = getattr(module, attr, None)
                if callable(fn) and not getattr(fn, "__bench_traced__", False):
                    label = self.name.rsplit(".", 1)[1] if attr == "run" else attr
                    setattr(module, attr, _wrap(fn, cat, label))

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname not in _TARGETS:
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(fullname)
            finally:
                sys.meta_path.insert(0, self)
            if spec is None or spec.loader is None:
                return None
            spec.loader = _Loader(spec.loader, fullname)
            return spec

    sys.meta_path.insert(0, _Finder())
