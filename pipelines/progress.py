"""What `kfp-grpo run` shows: one line per task as it finishes, a live bar inside long stages, logs in files.

kfp.local streams every task's output (its own executor-input dumps, the task's prints) to
stdout. During a local run `TaskLog` stands in for stdout: it writes each task's stream to
`<logdir>/<task>.log` and prints to the terminal, per finished task, one line

    [7/26] rollout-i1-m0  12.1 s  reward 0.41  accuracy 0.23  ETA 4 min

(the task's name is the same in these lines, the log files, the compiled pipeline and
MLflow). On a terminal a bar follows the steps of the running stage (`[sft] step 250/2000`
lines). A failed task prints the tail of its log and the file's path. With `verbose` the
stream also goes to the terminal as it comes.
"""

from __future__ import annotations

import io
import json
import re
import statistics
import time
from pathlib import Path
from typing import Callable, TextIO

from components.redaction import scrub

ANSI = re.compile(r"\x1b\[[0-9;]*m")
TASK_START = re.compile(r"Executing task '([^']+)'")
TASK_END = re.compile(r"Task '([^']+)' finished with status (\w+)")
STEP = re.compile(r"^\s*\[(\w+)\] step (\d+)/(\d+)")
SHOW = re.compile(r"^\s*\[tracking\] ")  # a task's lines the terminal always gets (the run id to --resume)
# the metrics a task's line shows, by stage (keys as in its KFP Metrics artifact)
SHOWN = {"sft": ("sft.final_loss",), "reward_model": ("rm.heldout_accuracy",), "evaluate": ("eval.accuracy",),
         "rollout": ("rollout.reward_mean", "rollout.accuracy"), "grpo_update": ("update.loss", "update.kl"),
         "grpo_rounds": ("rollout.reward_mean", "rollout.accuracy", "update.loss", "update.kl"),
         "rm_replay": ("replay.rm_accuracy_before", "replay.rm_accuracy_after")}
LABELS = {"sft.final_loss": "loss", "rm.heldout_accuracy": "RM pair accuracy", "eval.accuracy": "held-out accuracy",
          "rollout.reward_mean": "reward", "rollout.accuracy": "accuracy", "update.loss": "loss", "update.kl": "KL",
          "replay.rm_accuracy_before": "RM accuracy before", "replay.rm_accuracy_after": "after"}
TAIL_LINES = 40


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


class TaskLog(io.TextIOBase):
    """A stand-in for stdout during a kfp.local run (see the module docstring).

    `tasks`: kfp.local's name of each task (its component name) → (task name, stage, runs), `runs`
    being how often it runs (the shards of a ParallelFor run its body once each);
    `metrics_file(kfp_name)`: where that task's KFP Metrics JSON is, once it has run.
    """

    def __init__(self, tasks: dict[str, tuple[str, str, int]], logdir: Path, terminal: TextIO,
                 verbose: bool = False, metrics_file: Callable[[str], Path | None] | None = None):
        self.tasks, self.logdir, self.terminal, self.verbose = tasks, logdir, terminal, verbose
        self.total = sum(runs for _, _, runs in tasks.values())
        self.metrics_file = metrics_file
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.pending = ""
        self.current: str | None = None  # kfp.local's name of the running task
        self.name = ""  # ... and its name (with -2, -3 ... for the 2nd, 3rd run of a shard's task)
        self.log: TextIO | None = None
        self.started = 0.0
        self.finished: dict[str, tuple[str, float]] = {}  # task name -> (stage, seconds)
        self.starts: dict[str, int] = {}  # kfp.local task name -> how often it started running
        self.bar_shown = False
        self.interactive = terminal.isatty()
        self.run_log = (logdir / "run.log").open("a", encoding="utf-8")  # what is not inside a task

    # -- io.TextIOBase
    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.verbose:
            self.terminal.write(scrub(text))
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self._line(line)
        return len(text)

    def flush(self) -> None:
        for f in (self.log, self.run_log):
            if f:
                f.flush()
        self.terminal.flush()

    def close_logs(self) -> None:
        """Flush what is left; close the files (the run is over)."""
        if self.pending:
            self._line(self.pending)
            self.pending = ""
        self._clear_bar()
        for f in (self.log, self.run_log):
            if f:
                f.close()
        self.log = None

    # -- lines
    def _line(self, raw: str) -> None:
        line = scrub(ANSI.sub("", raw))  # task logs and the terminal never show a credential
        start, end = TASK_START.search(line), TASK_END.search(line)
        if start and start.group(1) in self.tasks:
            self._begin(start.group(1))
        (self.log or self.run_log).write(line + "\n")
        if end and end.group(1) == self.current:
            self._end(end.group(2))
            return
        if SHOW.search(line):
            self._clear_bar()
            self._say(line.strip())
        step = STEP.search(line)
        if step and self.current and self.interactive and not self.verbose:
            self._bar(int(step.group(2)), int(step.group(3)))

    def cached(self, kfp_name: str) -> None:
        """Task `kfp_name` completed without running: kfp.local took its outputs from the cache
        (`kfp-grpo run --resume`: it completed before)."""
        if kfp_name in self.tasks:
            name, stage = self.tasks[kfp_name][:2]
            self.finished[name] = (stage, 0.0)
            self._say(f"{self._counter()} {name:<20} cached (completed before)")

    def _begin(self, kfp_name: str) -> None:
        self.starts[kfp_name] = self.starts.get(kfp_name, 0) + 1
        name, runs = self.tasks[kfp_name][0], 1
        while (f"{name}-{runs}" if runs > 1 else name) in self.finished:
            runs += 1
        self.current, self.name, self.started = kfp_name, f"{name}-{runs}" if runs > 1 else name, time.perf_counter()
        self.log = (self.logdir / f"{self.name}.log").open("w", encoding="utf-8")

    def _end(self, status: str) -> None:
        name, stage = self.name, self.tasks[self.current][1]
        seconds = time.perf_counter() - self.started
        self.finished[name] = (stage, seconds)
        path = self.logdir / f"{name}.log"
        self.log.close()
        self.log, kfp_name, self.current = None, self.current, None
        self._clear_bar()
        if status != "SUCCESS":
            tail = path.read_text(encoding="utf-8").splitlines()[-TAIL_LINES:]
            self._say(f"{self._counter()} {name}  FAILED after {_duration(seconds)}; "
                      f"the end of its log ({path}):")
            self._say("\n".join("    " + t for t in tail))
            return
        shown = "  ".join(f"{LABELS[k]} {v:.3g}" for k, v in self._metrics(kfp_name, stage))
        self._say(f"{self._counter()} {name:<20} {_duration(seconds):>6}  {shown}{self._eta()}")

    def _counter(self) -> str:
        return f"[{len(self.finished):>{len(str(self.total))}}/{self.total}]"

    def _metrics(self, kfp_name: str, stage: str) -> list[tuple[str, float]]:
        path = self.metrics_file(kfp_name) if self.metrics_file else None
        if not path or not Path(path).is_file():
            return []
        values = json.loads(Path(path).read_text(encoding="utf-8"))
        return [(k, float(values[k])) for k in SHOWN.get(stage, ()) if k in values]

    def _eta(self) -> str:
        """Time left: each task still to run takes what its stage's finished tasks took (else the median
        of all finished tasks: one long stage, SFT, must not make every later task look as long)."""
        by_stage: dict[str, list[float]] = {}
        for stage, seconds in self.finished.values():
            by_stage.setdefault(stage, []).append(seconds)
        typical = statistics.median(s for _, s in self.finished.values())
        runs_left = {stage: 0 for stage in by_stage}
        for _, stage, runs in self.tasks.values():
            runs_left[stage] = runs_left.get(stage, 0) + runs
        for stage, seconds in by_stage.items():
            runs_left[stage] -= len(seconds)
        left = sum(n * (sum(by_stage[stage]) / len(by_stage[stage]) if stage in by_stage else typical)
                   for stage, n in runs_left.items())
        return f"  ETA {_duration(left)}" if left > 0 else ""

    def _bar(self, step: int, total: int, width: int = 24) -> None:
        name = self.name
        filled = int(width * step / max(total, 1))
        elapsed = time.perf_counter() - self.started
        self.terminal.write(f"\r    {name} {'█' * filled}{'░' * (width - filled)} {step}/{total}  "
                            f"{_duration(elapsed)}\x1b[K")
        self.terminal.flush()
        self.bar_shown = True

    def _clear_bar(self) -> None:
        if self.bar_shown:
            self.terminal.write("\r\x1b[K")
            self.bar_shown = False

    def _say(self, text: str) -> None:
        if not self.verbose:
            self.terminal.write(text + "\n")
            self.terminal.flush()
