"""Warm task processes for `kfp-grpo run`: one pre-imported process forks a child per kfp.local task.

kfp.local's SubprocessRunner starts every task as a fresh `python -m kfp.dsl.executor_main`
process, which spends ~5 CPU-seconds importing torch, transformers, mlflow and kfp and ~2 s
(far more on a busy machine) tearing the interpreter down again, against 2-5 s of compute per
stage on the tiny model. Locally, `kfp-grpo run` instead starts this module once (the
"zygote", as Android and prefork servers call it): it imports what tasks import, runs no
torch op and starts no thread, and then `fork()`s one child per task. The child runs exactly
the command kfp.local would have run, `kfp.dsl.executor_main` with the task's argv,
environment and working directory (the same component source written to a fresh temporary
directory, `_KFP_RUNTIME=true`), streams its stdout/stderr back and its exit status is the
task's. Each task is still its own process (own seed, own state, killed alone); on a
cluster nothing changes: one pod per task.

Protocol (a Unix socket in a private temporary directory; one connection per task):

    client → zygote   8-byte length + the write end of the task's output pipe (SCM_RIGHTS),
                      then that many bytes of JSON {source, args, env, cwd}
    zygote → client   "started <pid>\\n" (or "refused <why>\\n"), and once the child is reaped
                      "exit <returncode>\\n" (negative: killed by that signal, as subprocess;
                      the task's code is then 128 + the signal, as from kfp's `sh -ec` wrapper)

The zygote is the leader of its own process group; the task children stay in it. It ends,
killing the whole group, when the driver closes its stdin (`WarmTasks.close`) or dies (EOF
on stdin, whatever killed it), and each child gets SIGKILL if the zygote itself dies
(Linux `PR_SET_PDEATHSIG`): no task outlives the run.

    python -m pipelines.zygote --listen-fd N     (started by `WarmTasks.start`, not by hand)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import locale
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

EXECUTOR_MODULE = "kfp.dsl.executor_main"
# kfp 2.17's lightweight-component command (`sh -ec SCRIPT SOURCE ARGS...`), whitespace-normalised:
# what a child reproduces. Another shape (a newer kfp, a venv runner) runs as a plain subprocess.
KNOWN_SCRIPT = ('program_path=$(mktemp -d) printf "%s" "$0" > "$program_path/ephemeral_component.py" '
                '_KFP_RUNTIME=true {python} -m kfp.dsl.executor_main --component_module_path '
                '"$program_path/ephemeral_component.py" "$@"')
# what tasks import: every task pays for these once, in the zygote, instead of per process
PRELOAD = ("kfp.dsl.executor_main", "pipelines.kfp_components", "pipelines.runtime", "pipelines.parent_run",
           "pipelines.warm_start", "pipelines.rounds", "pipelines.trainer_job",
           "components.prepare_data", "components.sft", "components.reward_model", "components.evaluate",
           "components.rollout", "components.grpo_update", "components.rm_replay", "components.promote",
           "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store")
# imported by MLflow's run-context tags on every `mlflow.start_run` (~1.4 s), when installed
OPTIONAL_PRELOAD = ("IPython", "git")
HEADER = struct.Struct("!Q")
STOP_GRACE_S = 5.0


# ============================================================================ driver side
def probe_task_script() -> str | None:
    """The shell script of kfp.local's command for a lightweight component in this interpreter,
    if it is the one a child reproduces (`KNOWN_SCRIPT`); else None."""
    from kfp import dsl
    from kfp.local.subprocess_task_handler import replace_python_executable

    component = dsl.component(_probe, base_image="python:3.11", install_kfp_package=False)
    command = list(component.component_spec.implementation.container.command)
    if len(command) < 3 or command[:2] != ["sh", "-ec"]:
        return None
    script = replace_python_executable(command, sys.executable)[2]
    return script if " ".join(script.split()) == KNOWN_SCRIPT.format(python=sys.executable) else None


def _probe():  # no annotations: kfp reads them as component inputs/outputs (strings here, via __future__)
    pass


def unavailable_reason() -> str | None:
    """Why warm task processes cannot run on this platform (None: they can)."""
    if not hasattr(os, "fork") or not hasattr(socket, "AF_UNIX"):
        return "this platform has no fork()"
    if not hasattr(socket, "send_fds"):
        return "this Python cannot pass file descriptors"
    return None


class WarmTasks:
    """The driver's handle on a running zygote: `run` one task's command through it, `close` it.

    Thread-safe: kfp.local runs a ParallelFor's iterations from several threads at once.
    """

    def __init__(self, proc: subprocess.Popen, socket_dir: Path, script: str):
        self.proc, self.socket_dir, self.script = proc, socket_dir, script
        self.path = str(socket_dir / "sock")
        self._lock = threading.Lock()
        self.broken: str | None = None  # why tasks no longer go through the zygote

    @classmethod
    def start(cls, log_path: Path) -> tuple["WarmTasks | None", str]:
        """Start a zygote (its own output appended to `log_path`); (handle, "") or (None, why not).

        It starts first and imports while this process probes kfp's task command.
        """
        why = unavailable_reason()
        if why:
            return None, why
        try:
            socket_dir = Path(tempfile.mkdtemp(prefix="kfp-grpo-"))
        except OSError as err:
            return None, f"no private directory for its socket: {err}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(socket_dir / "sock"))
            listener.listen(64)
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "pipelines.zygote", "--listen-fd", str(listener.fileno())],
                    stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, pass_fds=(listener.fileno(),),
                    start_new_session=True)
        except OSError as err:
            shutil.rmtree(socket_dir, ignore_errors=True)
            return None, f"could not start one: {err}"
        finally:
            listener.close()  # the zygote holds it now: if it dies, connecting fails instead of hanging
        pool = cls(proc, socket_dir, "")
        try:
            pool.script = probe_task_script() or ""
            why = "" if pool.script else "kfp's task command is not the one warm processes reproduce"
        except Exception as err:  # noqa: BLE001 — a kfp that builds components differently
            why = f"kfp's task command could not be probed: {' '.join(str(err).split())[:200]}"
        if why:
            pool.close()
            return None, why
        return pool, ""

    def request(self, full_command: list[str], env_vars: dict[str, str] | None) -> dict[str, Any] | None:
        """The task a kfp.local command runs, as the zygote's request; None if it is not a
        lightweight component's command as `probe_task_script` found it."""
        if len(full_command) < 4 or full_command[:2] != ["sh", "-ec"] or full_command[2] != self.script:
            return None
        return {"source": full_command[3], "args": list(full_command[4:]),
                "env": {**os.environ, **(env_vars or {})}, "cwd": os.getcwd()}

    def run(self, full_command: list[str], env_vars: dict[str, str] | None = None) -> int | None:
        """Run one task like `kfp.local.subprocess_task_handler.run_local_subprocess`: print its
        output line by line, return its exit code. None: the task did not start (the caller runs
        it as a plain subprocess)."""
        request = None if self.broken else self.request(full_command, env_vars)
        if request is None:
            return None
        body = json.dumps(request).encode("utf-8", "surrogatepass")
        out_r, out_w = os.pipe()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
            socket.send_fds(sock, [HEADER.pack(len(body))], [out_w])
            sock.sendall(body)
        except OSError as err:
            os.close(out_r)
            sock.close()
            self._break(f"cannot reach it: {err}")
            return None
        finally:
            os.close(out_w)
        with sock, sock.makefile("r", encoding="utf-8") as replies:
            try:
                reply = replies.readline()
            except OSError:  # the zygote exited before it took the task
                reply = ""
            if not reply.startswith("started "):
                os.close(out_r)
                self._break(reply.partition(" ")[2].strip() or "it exited (see run.log)")
                return None
            # as kfp's subprocess.Popen(..., text=True, bufsize=1): locale encoding, universal newlines
            with open(out_r, encoding=locale.getpreferredencoding(False)) as output:
                for line in iter(output.readline, ""):
                    print(line, end="")
                print("\n")
            try:
                status = replies.readline()
            except OSError:
                status = ""
        if status.startswith("exit "):
            code = int(status.split()[1])
            if code < 0:  # killed by a signal: what kfp's `sh -ec` wrapper prints and exits with
                print(signal.strsignal(-code) or f"signal {-code}")
                code = 128 - code
            return code
        print(f"kfp-grpo: the warm task process ended while task process {reply.split()[1]} ran; "
              "the task failed", flush=True)
        return 1

    def _break(self, why: str) -> None:
        with self._lock:
            if self.broken is None:
                self.broken = why
                print(f"kfp-grpo: warm task processes stopped ({why}); the remaining tasks run as plain "
                      "subprocesses", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Stop the zygote: it kills what still runs in its process group, then exits."""
        try:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=STOP_GRACE_S + 5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(self.proc.pid, signal.SIGKILL)  # still the group's leader: not reaped yet
                self.proc.wait()
        finally:
            shutil.rmtree(self.socket_dir, ignore_errors=True)


# ============================================================================ zygote side
# native threads whose libraries make fork() safe themselves (pthread_atfork): jemalloc's (pyarrow)
# background thread is not carried into a child, which allocates without it
FORK_AWARE_THREADS = ("jemalloc_bg_thd",)


def unexpected_threads() -> list[str]:
    """Threads of this process besides the main one that fork() would leave half-copied in a child
    (an OpenMP team, a Python thread), by name; [] when forking is safe."""
    try:
        tids = [t for t in os.listdir("/proc/self/task") if int(t) != os.getpid()]
    except OSError:  # no /proc: only Python's own threads are visible
        return [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    names = []
    for tid in tids:
        with contextlib.suppress(OSError):
            name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
            if name not in FORK_AWARE_THREADS:
                names.append(name)
    return names


def settle_threads() -> None:
    """Fork once and let the child exit: OpenBLAS (numpy's, torch's) starts its worker threads when
    it is loaded and stops them before every fork (pthread_atfork), and they stay stopped in this
    process, which runs no BLAS call. What `unexpected_threads` finds afterwards is a real hazard."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def preload() -> None:
    """Import what tasks import, without running any of it (no torch op, no thread)."""
    for name in PRELOAD:
        importlib.import_module(name)
    for name in OPTIONAL_PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    remember_mlflow_schema_head()


def remember_mlflow_schema_head() -> None:
    """Find MLflow's latest schema revision once, for every child.

    Each process that opens a SQLite store checks the store's revision against the latest one,
    which MLflow finds by executing its ~100 migration scripts (~0.15 CPU-s per task). It is
    fixed for the installed MLflow, so `mlflow.store.db.utils._get_latest_schema_revision` is
    replaced, in this process (and so in its children) only, by its answer; the check itself
    still runs. Skipped where MLflow has no such function.
    """
    import inspect

    from mlflow.store.db import utils

    latest = getattr(utils, "_get_latest_schema_revision", None)
    if latest is None or inspect.signature(latest).parameters:
        return
    head = latest()

    def latest_schema_revision() -> str:
        return head

    utils._get_latest_schema_revision = latest_schema_revision


class Zygote:
    """The zygote's loop: accept a task, fork its child, report the child's exit status."""

    def __init__(self, listener: socket.socket, control_fd: int):
        self.listener, self.control_fd = listener, control_fd
        self.children: dict[int, socket.socket] = {}
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        self.group_leader = os.getpgrp() == os.getpid()

    def serve(self) -> None:
        """Until the driver closes stdin (or dies): serve tasks; then stop the ones still running."""
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the selector through the wakeup fd
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver decides when the run stops
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.control_fd, selectors.EVENT_READ, "control")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        try:
            while True:
                for key, _ in self.selector.select(timeout=1.0):
                    if key.data == "accept":
                        self.accept()
                    elif key.data == "control" and not os.read(self.control_fd, 4096):
                        return
                    elif key.data == "wake":
                        with contextlib.suppress(BlockingIOError):
                            while os.read(self.wake_r, 4096):
                                pass
                self.reap()
        finally:
            self.stop()

    def accept(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(30)
        out_w = None
        try:
            head, fds, _, _ = socket.recv_fds(conn, HEADER.size, 1)
            if len(head) != HEADER.size or len(fds) != 1:
                raise ValueError("a malformed request")
            out_w = fds[0]
            (size,) = HEADER.unpack(head)
            body = bytearray()
            while len(body) < size:
                chunk = conn.recv(min(size - len(body), 1 << 20))
                if not chunk:
                    raise ValueError("a truncated request")
                body += chunk
            request = json.loads(body.decode("utf-8", "surrogatepass"))
            threads = unexpected_threads()
            if threads:  # fork() copies only this thread: a running thread pool would be half-copied
                raise ValueError(f"the warm process runs threads {threads}; fork would be unsafe")
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                run_child(request, out_w, conn, self._own_fds())
            conn.sendall(f"started {pid}\n".encode())
            self.children[pid] = conn
        except (OSError, ValueError) as err:
            print(f"[zygote] refused a task: {err}", flush=True)
            with contextlib.suppress(OSError):
                conn.sendall(f"refused {' '.join(str(err).split())}\n".encode())
            conn.close()
        finally:
            if out_w is not None:
                os.close(out_w)

    def _own_fds(self) -> list[int]:
        """The zygote's descriptors, which a child closes."""
        fds = [self.listener.fileno(), self.control_fd, self.wake_r, self.wake_w]
        fds += [conn.fileno() for conn in self.children.values()]
        return fds + ([self.selector.fileno()] if hasattr(self.selector, "fileno") else [])

    def reap(self) -> None:
        """Report the exit status of every child that ended."""
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
                conn.close()

    def stop(self) -> None:
        """SIGTERM to what still runs (the whole process group: a task's own subprocesses too),
        SIGKILL after a grace period."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self._signal(signal.SIGTERM)
        for _ in range(int(STOP_GRACE_S * 10)):
            self.reap()
            if not self.children:
                break
            time.sleep(0.1)
        if self.children:
            self._signal(signal.SIGKILL)  # with the group: this process too; nothing is left to do

    def _signal(self, sig: int) -> None:
        if not self.children:
            return
        with contextlib.suppress(OSError):
            if self.group_leader:
                os.killpg(os.getpgrp(), sig)
                return
        for pid in self.children:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the zygote dies (no orphaned task)."""
    import ctypes

    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL) == 0 and os.getppid() != parent:
            os._exit(1)  # PR_SET_PDEATHSIG = 1; the zygote died before it took effect


def run_child(request: dict[str, Any], out_w: int, conn: socket.socket, inherited: list[int]) -> NoReturn:
    """In the forked child: become the task process kfp.local would have started, run it, exit."""
    code = 1
    try:
        for fd in [*inherited, conn.detach()]:  # the zygote's sockets and pipes; the zygote reports our exit
            with contextlib.suppress(OSError):
                os.close(fd)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if sys.platform.startswith("linux"):
            _die_with_parent()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.dup2(out_w, 1)
        os.dup2(out_w, 2)
        os.close(out_w)
        code = _run_task(request)
    except BaseException:  # noqa: BLE001 — setting the task up failed: say why, fail it
        import traceback

        traceback.print_exc()
    _exit(code)


SIGINT_EXIT = -int(signal.SIGINT)


def _run_task(request: dict[str, Any]) -> int:
    """`sh -ec SCRIPT SOURCE ARGS...` of kfp.local, in this process: returns the exit code."""
    import runpy

    os.environ.clear()
    os.environ.update(request["env"])
    os.environ["_KFP_RUNTIME"] = "true"
    os.chdir(request["cwd"])
    tempfile.tempdir = None  # the task's $TMPDIR, as `mktemp -d`
    # a fresh process seeds torch's and numpy's global generators from the OS (Python's `random`
    # reseeds itself after fork): so does each child, or all of them would draw the same numbers
    if "torch" in sys.modules:
        sys.modules["torch"].seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    program_path = tempfile.mkdtemp(prefix="tmp.")
    module_path = os.path.join(program_path, "ephemeral_component.py")
    with open(module_path, "wb") as fh:  # printf "%s" "$0" > ...
        fh.write(os.fsencode(request["source"]))
    sys.argv = [sys.argv[0], "--component_module_path", module_path, *request["args"]]
    try:
        runpy.run_module(EXECUTOR_MODULE, run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)
        return 1
    except BaseException as err:  # noqa: BLE001 — as the interpreter: the traceback (from runpy on), status 1
        tb = err.__traceback__.tb_next  # this function's frame is not the task's
        sys.excepthook(type(err), err.with_traceback(tb), tb)
        return SIGINT_EXIT if isinstance(err, KeyboardInterrupt) else 1


def _exit(code: int) -> NoReturn:
    """The interpreter's exit without its teardown: join threads, run atexit handlers, flush,
    `os._exit` (module and object finalisation are what take seconds, and nothing needs them)."""
    import atexit

    try:
        if hasattr(threading, "_shutdown"):
            threading._shutdown()  # what Py_Finalize runs first: threading atexits, non-daemon joins
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001
        pass
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    if code == SIGINT_EXIT:  # as CPython after an uncaught KeyboardInterrupt: die by SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="kfp-grpo's warm task process (started by `kfp-grpo run`)")
    p.add_argument("--listen-fd", type=int, required=True, help="the listening Unix socket, inherited")
    args = p.parse_args(argv)
    listener = socket.socket(fileno=args.listen_fd)
    started = time.perf_counter()
    preload()
    import gc
    import logging

    settle_threads()
    threads = unexpected_threads()
    if threads or logging.getLogger().handlers:
        print(f"[zygote] not serving: threads {threads}, root log handlers {logging.getLogger().handlers}; "
              "a forked task would not start like a fresh process", flush=True)
        os._exit(3)
    gc.collect()
    gc.freeze()  # the preloaded objects: children's GC passes do not touch (and copy) their pages
    print(f"[zygote] {time.strftime('%H:%M:%S')} pid {os.getpid()} ready: {len(sys.modules)} modules preloaded "
          f"in {time.perf_counter() - started:.1f} s", flush=True)
    Zygote(listener, sys.stdin.fileno()).serve()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
