"""Faults injected into real processes: SIGKILL during saves, a killed and resumed pipeline,
an MLflow server that is down or goes down, racing promotions, planted credentials.

Nothing here is mocked below the fault: real HF models and Parquet files, a real
`mlflow server` (behind a TCP proxy that can be switched off), real `kfp.local` runs of
the reduced pipeline in subprocesses. Only the *evaluation* in the promotion tests is
stubbed (each fake policy directory carries its held-out accuracy in a file), so that
the registry race is deterministic and cheap.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import random
import re
import signal
import socket
import struct
import tempfile
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch

from components.config import TinyModelConfig, parse_config
from components.io import atomic_path, write_parquet
from components.stage_cli import quiet_hf
from tests.conftest import FAST
from tests.conftest import subprocess_env as _env

quiet_hf()  # no HF loading bars between the test's own lines

ROOT = Path(__file__).resolve().parent.parent
SMALL_MODEL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
# the reduced pipeline: 10 tasks (SFT, RM, 1 iteration × 1 round, replay, 2 evals, promote)
REDUCED = ["sft.steps=20", "reward_model.steps=5", "replay.steps=5", "loop.iterations=1",
           "loop.steps_per_iteration=1", "data.num_train=200", "data.num_test=40", "rollout.prompts_per_step=8"]
SECRETS = {"MLFLOW_TRACKING_PASSWORD": "planted-Pw-4c1d9e7f", "AWS_SECRET_ACCESS_KEY": "planted-AWS-93be0a51",
           "MLFLOW_TRACKING_TOKEN": "planted-Tok-77d0c2aa"}


# =========================================================================== SIGKILL during saves
FORK_SERVER = r"""
import os, signal, sys, time
import pandas as pd
from components.config import TinyModelConfig
from components.io import write_parquet
from components.modeling import build_tiny_model, build_tiny_tokenizer, save_model

target, table = sys.argv[1], sys.argv[2]
tok = build_tiny_tokenizer()
models = [build_tiny_model(TinyModelConfig(**SMALL), tok, seed=s) for s in range(3)]
frames = [pd.DataFrame({"version": [s] * 2000, "x": range(2000)}) for s in range(3)]
print("ready", flush=True)
for line in sys.stdin:                       # one line per kill: the delay in seconds
    pid = os.fork()
    if pid == 0:                             # the writer: saves versions 0,1,2,0,... until killed
        i = 0
        while True:
            save_model(models[i % 3], tok, target)
            write_parquet(frames[i % 3], table)
            i += 1
    time.sleep(float(line))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    print("killed", flush=True)
""".replace("SMALL", repr(SMALL_MODEL))


def _versions() -> list[dict[str, torch.Tensor]]:
    from components.modeling import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    return [build_tiny_model(TinyModelConfig(**SMALL_MODEL), tok, seed=s).state_dict() for s in range(3)]


def _which_version(model_dir: Path, versions) -> int:
    """Load with plain transformers (no project code); return which version it is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    state = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert AutoTokenizer.from_pretrained(model_dir).chat_template
    matches = [i for i, v in enumerate(versions) if all(torch.equal(state[k], v[k]) for k in v)]
    assert len(matches) == 1, f"{model_dir} is none of the written versions"
    return matches[0]


def test_sigkill_during_saves_leaves_the_old_or_the_new_artifact_never_a_half(tmp_path):
    """20 SIGKILLs at seeded random moments of a loop of `save_model` + `write_parquet` to the
    same paths: after each, the model dir / table is absent or complete and one of the versions."""
    target, table = tmp_path / "policy", tmp_path / "rollouts.parquet"
    server = subprocess.Popen([sys.executable, "-c", FORK_SERVER, str(target), str(table)], cwd=ROOT, env=_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    versions = _versions()
    rng = random.Random(1234)
    seen_dirs, seen_tables, mid_write = [], [], 0
    try:
        assert server.stdout.readline().strip() == "ready"
        for _ in range(20):
            server.stdin.write(f"{rng.uniform(0.05, 0.6):.3f}\n")
            server.stdin.flush()
            assert server.stdout.readline().strip() == "killed"
            mid_write += bool(list(tmp_path.glob(".*.tmp-*")))  # the kill interrupted a write
            seen_dirs.append(_which_version(target, versions) if target.exists() else None)
            if table.exists():
                df = pd.read_parquet(table)
                assert len(df) == 2000 and df.version.nunique() == 1, "a half-written table"
                seen_tables.append(int(df.version[0]))
            else:
                seen_tables.append(None)
    finally:
        server.stdin.close()
        server.kill()
        server.wait()
    print(f"\n20 SIGKILLs: {mid_write} landed mid-write; model versions seen {seen_dirs}; tables {seen_tables}")
    assert mid_write >= 5, "the kills should interrupt writes in progress"
    assert len({v for v in seen_dirs if v is not None}) >= 2  # the artifact really was being replaced
    # a re-run of the stage (KFP retry) completes and cleans what the killed writer left
    from components.modeling import build_tiny_model, build_tiny_tokenizer, save_model

    tok = build_tiny_tokenizer()
    save_model(build_tiny_model(TinyModelConfig(**SMALL_MODEL), tok, seed=2), tok, target)
    write_parquet(pd.DataFrame({"version": [2] * 2000, "x": range(2000)}), table)
    assert _which_version(target, versions) == 2 and pd.read_parquet(table).version.eq(2).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy", "rollouts.parquet"]


def test_writer_killed_between_the_two_renames_of_the_fallback_swap(tmp_path, monkeypatch):
    """Where the filesystem cannot exchange two directories atomically, the swap is two renames;
    a writer killed between them leaves `final` absent and the complete previous artifact under
    a stale name. The next attempt restores it before doing anything else."""
    from components import io

    final = tmp_path / "model"
    with atomic_path(final) as tmp:
        (tmp / "weights").write_text("v1")
    (tmp_path / ".model.tmp-old-1a2b3c4d").mkdir()
    final.rename(tmp_path / ".model.tmp-old-1a2b3c4d" / "x")  # simulate: final moved aside ...
    (tmp_path / ".model.tmp-old-1a2b3c4d" / "x").rename(tmp_path / ".model.tmp-old-0")
    os.rmdir(tmp_path / ".model.tmp-old-1a2b3c4d")
    (tmp_path / ".model.tmp-5e6f7a8b").mkdir()            # ... and the new one never renamed in
    (tmp_path / ".model.tmp-5e6f7a8b" / "weights").write_text("v2")
    assert not final.exists()
    with pytest.raises(RuntimeError):  # the retry fails too: the previous artifact is still there
        with atomic_path(final):
            raise RuntimeError("retry failed")
    assert (final / "weights").read_text() == "v1"
    monkeypatch.setattr(io, "_exchange", lambda a, b: False)  # the fallback path, completing
    with atomic_path(final) as tmp:
        (tmp / "weights").write_text("v3")
    assert (final / "weights").read_text() == "v3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# =========================================================================== numerical guards
def _rollouts(path: Path, advantages: list[float]) -> Path:
    from components.modeling import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 1 + 2?"}], tokenize=False,
                                     add_generation_prompt=True)
    rows = []
    for i, a in enumerate(advantages):
        ids = tok(f"<answer>{3 + i % 2}</answer>", add_special_tokens=False).input_ids + [tok.eos_token_id]
        rows.append({"prompt_text": prompt, "completion_ids": ids, "sampler_logprobs": [-1.0] * len(ids),
                     "advantage": a, "reward": float(a > 0), "temperature": 1.0})
    write_parquet(pd.DataFrame(rows), path)
    return path


def test_divergence_guards_stop_the_update_and_keep_the_previous_policy(tmp_path):
    from components import grpo_update
    from components.modeling import build_tiny_model, build_tiny_tokenizer, save_model

    tok = build_tiny_tokenizer()
    policy = tmp_path / "policy"
    save_model(build_tiny_model(TinyModelConfig(**SMALL_MODEL), tok, seed=0), tok, policy)
    out = tmp_path / "next"
    save_model(build_tiny_model(TinyModelConfig(**SMALL_MODEL), tok, seed=9), tok, out)  # the previous output
    before = (out / "model.safetensors").read_bytes()
    rollouts = _rollouts(tmp_path / "r.parquet", [1.0, -1.0] * 8)
    base = {"model": {"tiny": SMALL_MODEL}, "grpo": {"lr": 0.05, "epochs": 4, "minibatch_size": 4, "beta": 0.0}}
    for guard, match in [({"max_clip_fraction": 0.05}, r"clip fraction .* exceeds grpo\.max_clip_fraction=0\.05"),
                         ({"max_kl": 1e-6, "beta": 0.04}, r"KL .* exceeds grpo\.max_kl=1e-06")]:
        cfg = parse_config({**FAST, **base, "grpo": {**base["grpo"], **guard}})
        with pytest.raises(grpo_update.DivergenceError, match=match):
            grpo_update.run(cfg, [str(rollouts)], str(policy), None, str(out))
        assert (out / "model.safetensors").read_bytes() == before  # the previous policy stays
        assert not list(tmp_path.glob(".next.tmp-*"))
    # all-equal rewards in every group: advantage 0, counted, and no NaN anywhere
    ties = _rollouts(tmp_path / "ties.parquet", [0.0] * 8)
    df = pd.read_parquet(ties)
    df["reward"] = 1.0
    write_parquet(df, ties)
    cfg = parse_config({**FAST, **base, "rollout": {"group_size": 4}})
    m = grpo_update.run(cfg, [str(ties)], str(policy), None, str(tmp_path / "tied"))
    assert m["update/zero_variance_groups"] == 1.0
    assert all(v == v and abs(v) != float("inf") for v in m.values()), m


# =========================================================================== MLflow down at start
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: nothing listens there


def test_tracking_server_unreachable_at_start_fails_fast_naming_the_uri(tmp_path, capsys):
    from pipelines import cli

    uri = f"http://127.0.0.1:{_closed_port()}"
    config = tmp_path / "c.yaml"
    config.write_text(f"tracking: {{tracking_uri: '{uri}'}}\n")
    policy = tmp_path / "p"
    policy.mkdir()
    for argv in (["run", "--workdir", str(tmp_path / "w"), "--set", f"tracking.tracking_uri={uri}", *sum(
                    [["--set", s] for s in REDUCED], [])],
                 ["promote", "--config", str(config), "--policy", str(policy), "--test", str(tmp_path / "t.parquet")]):
        start = time.perf_counter()
        code = cli.main(argv)
        seconds = time.perf_counter() - start
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"error: MLflow tracking server {uri} is unreachable"), err[0]
        assert seconds < 15, f"{argv[0]} took {seconds:.1f}s to fail"
        with capsys.disabled():
            print(f"\nkfp-grpo {argv[0]}: failed in {seconds:.1f}s: {err[0]}")
    assert not list((tmp_path / "w").glob("kfp/*")), "no task may start"


# =========================================================================== a real MLflow server
def _free_port() -> int:
    return _closed_port()


class FlakyProxy:
    """A TCP proxy in front of the MLflow server that can go down (accepts, then resets).

    `down_on(b"...", n)`: go down at the n-th client request containing the bytes (that
    request is dropped, never reaching the server). `refused` counts connection attempts
    while down (every MLflow retry is one).
    """

    def __init__(self, target: int):
        self.target = target
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.down = threading.Event()
        self.refused = 0
        self.trigger: tuple[bytes, int] | None = None
        self.seen = 0
        self.live: set[socket.socket] = set()
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def down_on(self, marker: bytes, nth: int = 1) -> None:
        self.trigger, self.seen = (marker, nth), 0

    def go_down(self) -> None:
        self.down.set()
        with self.lock:
            for s in list(self.live):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def go_up(self) -> None:
        self.trigger = None
        self.down.clear()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if self.down.is_set():
                self.refused += 1
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()  # a reset: the server is gone
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.live |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while not self.down.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if from_client and self.trigger and self.trigger[0] in data:
                    self.seen += 1
                    if self.seen >= self.trigger[1]:
                        self.go_down()
                        break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            with self.lock:
                self.live -= {src, dst}


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with a SQLite store (one worker), and a proxy in front of it."""
    d = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = open(d / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
                             "--artifacts-destination", str(d / "artifacts")],
                            cwd=d, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    import requests

    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{uri}/health", timeout=2).ok:
                break
        assert proc.poll() is None and time.time() < deadline, (d / "server.log").read_text()[-3000:]
        time.sleep(0.5)
    proxy = FlakyProxy(port)
    yield uri, proxy
    proxy.sock.close()
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    log.close()


FAST_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}

STAGE_TASK = r"""
import json, sys
from components import sft
from pipelines.runtime import run_task
run_task(sft.run, "sft", sys.argv[1], sys.argv[2], sys.argv[3], None, train=sys.argv[4], model=sys.argv[5])
"""


def test_tracking_server_lost_mid_stage_retries_then_fails_the_task(mlflow_server, tmp_path):
    import mlflow

    from components import prepare_data

    uri, proxy = mlflow_server
    c = mlflow.MlflowClient(uri)
    exp = c.create_experiment("mid-stage")
    parent = c.create_run(exp).info.run_id
    cfg = parse_config({**FAST, "sft": {"steps": 400, "batch_size": 16}, "tracking": {"tracking_uri": uri}})
    prepare_data.run(cfg, str(tmp_path / "train.parquet"), str(tmp_path / "test.parquet"))
    out = tmp_path / "sft"
    proxy.go_up()
    task = subprocess.Popen([sys.executable, "-c", STAGE_TASK, cfg.to_json(), parent, proxy.uri,
                             str(tmp_path / "train.parquet"), str(out)], cwd=ROOT, env=_env(**FAST_RETRIES),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in task.stdout:  # the nested run exists and step 0 is logged: now the server goes away
        if line.startswith("[sft] step 1/"):
            break
    proxy.go_down()
    down_at = time.perf_counter()
    rest, err = task.communicate(timeout=300)
    seconds = time.perf_counter() - down_at
    proxy.go_up()
    print(f"\ntask failed {seconds:.1f}s after the outage began, after {proxy.refused} refused connection attempts")
    assert task.returncode != 0
    assert f"127.0.0.1:{proxy.port}" in err and "Max retries exceeded" in err, err[-2000:]
    assert proxy.refused >= 3, "MLflow's client retries with backoff before giving up"
    assert not out.exists() and not list(tmp_path.glob(".sft.tmp-*")), "no model from a failed task"
    assert "[sft] step 400/400" not in rest  # it stopped at the first failed log call
    assert c.search_registered_models() == []  # nothing registered, nothing half-registered


# --------------------------------------------------------------------------- promotions
PROMOTE = r"""
import json, os, sys, time
from pathlib import Path
from components import evaluate, promote, tracking
from components.config import parse_config

def fake_eval(cfg, test_path, policy_dir, *a, **k):   # each fake policy carries its held-out accuracy
    acc = float(json.loads((Path(policy_dir) / "config.json").read_text())["test_heldout_accuracy"])
    barrier = os.environ.get("RACE_BARRIER")
    if barrier and Path(policy_dir).resolve() != Path(sys.argv[2]).resolve() and not hasattr(fake_eval, "done"):
        fake_eval.done = True        # the champion was read and evaluated: wait for the other racer
        Path(barrier, os.environ["RACER"]).touch()
        while len(os.listdir(barrier)) < 2:
            time.sleep(0.02)
        time.sleep(float(os.environ.get("RACE_DELAY", "0")))
    return {"eval/accuracy": acc}

evaluate.run = fake_eval
cfg = parse_config(json.loads(sys.argv[1]))
c = tracking.client(cfg.tracking.tracking_uri)
run_id = os.environ.get("RUN_ID") or c.create_run(tracking.ensure_experiment(c, cfg.tracking.experiment)).info.run_id
print("RESULT " + json.dumps(promote.run(cfg, sys.argv[2], sys.argv[3] or None, "held-out.parquet", run_id)),
      flush=True)
"""


def _fake_policy(d: Path, accuracy: float) -> Path:
    """A real tiny (untrained) policy whose config carries the held-out accuracy `fake_eval` reports
    (the config travels through MLflow's transformers flavor with the weights)."""
    from components.config import TinyModelConfig
    from components.modeling import build_tiny_model, build_tiny_tokenizer, save_model

    tok = build_tiny_tokenizer()
    model = build_tiny_model(TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=16), tok)
    model.config.test_heldout_accuracy = accuracy
    save_model(model, tok, d)
    return d


def _seed_champion(cfg, policy: Path) -> None:
    """Version 1, promoted in-process (the first version needs no evaluation)."""
    from components import promote, tracking

    c = tracking.client(cfg.tracking.tracking_uri)
    run_id = c.create_run(tracking.ensure_experiment(c, cfg.tracking.experiment)).info.run_id
    assert promote.run(cfg, str(policy), None, "unused", run_id, challenger_accuracy=0.1)["promoted"]


def _promoter(cfg, policy: Path, rm: Path | None = None, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PROMOTE, cfg.to_json(), str(policy), str(rm or "")], cwd=ROOT,
                            env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _aliases(c, name: str) -> dict[str, str]:
    return {a: str(v) for a, v in c.get_registered_model(name).aliases.items()} if c.search_registered_models(
        f"name = '{name}'") else {}


def test_two_racing_promotions_never_leave_the_worse_model_champion(mlflow_server, tmp_path):
    """Both racers read champion v1 (0.1) and evaluate it; both beat it. The worse one (0.3)
    is held back so that it moves the alias last — what a read-decide-write gate gets wrong."""
    import mlflow

    uri, _ = mlflow_server
    cfg = parse_config({**FAST, "tracking": {"tracking_uri": uri, "experiment": "race"},
                        "promote": {"model_prefix": "race"}})
    _seed_champion(cfg, _fake_policy(tmp_path / "v1", 0.1))
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    better = _promoter(cfg, _fake_policy(tmp_path / "better", 0.5), RACE_BARRIER=str(barrier), RACER="better")
    worse = _promoter(cfg, _fake_policy(tmp_path / "worse", 0.3), RACE_BARRIER=str(barrier), RACER="worse",
                      RACE_DELAY="1.5")
    results = {}
    for name, p in (("better", better), ("worse", worse)):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        results[name] = json.loads(out.split("RESULT ", 1)[1])
    c = mlflow.MlflowClient(uri)
    champion = c.get_model_version_by_alias("race-policy", "champion")
    print(f"\nrace: better → {results['better']['reason']}; worse → {results['worse']['reason']}")
    assert champion.version == results["better"]["policy_version"] and results["better"]["promoted"]
    assert float(champion.tags["heldout_accuracy"]) == 0.5
    # whoever took the registry lock second was gated again, against the first one's version
    # (not against the v1 both had read): normally the held-back worse one, which is rejected
    if not results["worse"]["promoted"]:
        assert results["worse"]["champion_version"] == results["better"]["policy_version"]
        assert results["worse"]["champion_accuracy"] == 0.5
        assert c.get_model_version("race-policy", results["worse"]["policy_version"]).tags[
            "promotion_decision"] == "rejected"
    else:  # the worse one got the lock first (a very slow server): the better one then beat it
        assert results["better"]["champion_version"] == results["worse"]["policy_version"]
    assert not c.search_registered_models("name LIKE '%promotion-lock%'"), "the lock is released"


def test_tracking_outage_during_promotion_leaves_the_registry_consistent(mlflow_server, tmp_path):
    """The server goes away after the policy version is created, before the reward model's:
    the champion does not move, no alias points at the new version; the retry of the task
    (same MLflow run) removes the pending version and completes."""
    import mlflow

    uri, proxy = mlflow_server
    c = mlflow.MlflowClient(uri)
    cfg = parse_config({**FAST, "tracking": {"tracking_uri": proxy.uri, "experiment": "outage"},
                        "promote": {"model_prefix": "outage"}})
    proxy.go_up()
    _seed_champion(cfg, _fake_policy(tmp_path / "v1", 0.1))
    run_id = c.create_run(c.get_experiment_by_name("outage").experiment_id).info.run_id
    better, rm = _fake_policy(tmp_path / "better", 0.5), _fake_policy(tmp_path / "rm", 0.0)
    proxy.down_on(b"model-versions/create", 2)  # the reward model's version
    first = _promoter(cfg, better, rm, RUN_ID=run_id, **FAST_RETRIES)
    out, err = first.communicate(timeout=300)
    proxy.go_up()
    assert first.returncode != 0 and "Max retries exceeded" in err, err[-3000:]
    assert _aliases(c, "outage-policy") == {"champion": "1", "challenger": "1"}  # untouched
    versions = {mv.version: mv for mv in c.search_model_versions("name = 'outage-policy'")}
    assert set(versions) <= {"1", "2"}
    if "2" in versions:  # the rollback could not reach the server either: left pending, alias-free
        assert versions["2"].tags["promotion_decision"] == "pending" and not versions["2"].aliases
    assert c.search_model_versions("name = 'outage-reward'") == []
    # the retry (what KFP does with the failed task)
    second = _promoter(cfg, better, rm, RUN_ID=run_id, **FAST_RETRIES)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err[-3000:]
    decision = json.loads(out.split("RESULT ", 1)[1])
    assert decision["promoted"] and decision["policy_version"] == "3"
    assert sorted(mv.version for mv in c.search_model_versions("name = 'outage-policy'")) == ["1", "3"]
    assert _aliases(c, "outage-policy") == {"champion": "3", "challenger": "3"}
    assert _aliases(c, "outage-reward") == {"champion": "1", "challenger": "1"}
    print(f"\npromotion outage: first attempt failed after {proxy.refused} refused connections; the retry promoted v3")


# =========================================================================== failure → resume command
def test_failed_run_names_the_resume_command_and_resume_checks_the_run(tmp_path, capsys):
    """A task fails (bad data, no KFP retry): one error line ending in the exact command that
    resumes the run; the parent run is FAILED. `--resume` refuses another config or a bad id."""
    import mlflow

    from pipelines import cli

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "What is 1 + 1?", "answer": "two"}\n' * 5)
    workdir = tmp_path / "w"
    argv = ["run", "--workdir", str(workdir), "--set", "data.source=file", "--set", f"data.path={bad}",
            "--set", "cluster.stages.prepare_data.retries=0", *sum([["--set", s] for s in REDUCED], [])]
    assert cli.main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]  # (+ MLflow's INFO)
    assert len(err) == 1 and "Inner task failed: 'prepare-data'" in err[0], err
    command = re.search(r"; resume with: (kfp-grpo run .* --resume ([0-9a-f]+))$", err[0])
    assert command, err[0]
    parent = command.group(2)
    with capsys.disabled():
        print(f"\n{err[0]}")
    assert command.group(1).split()[1:] == [*argv, "--resume", parent]
    c = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    assert c.get_run(parent).info.status == "FAILED"
    assert cli.main([*argv, "--set", "seed=7", "--resume", parent]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"error: cannot resume run {parent}: it ran config ") and "same config" in line, line
    with capsys.disabled():
        print(line)
    assert cli.main([*argv, "--resume", "0" * 32]) == 2
    assert f"cannot resume: no MLflow run {'0' * 32}" in capsys.readouterr().err


# =========================================================================== kill -9 + resume
def _cli(config: Path, workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "run", "--config", str(config), "--workdir", str(workdir),
            "--output", "json", *extra]


def _frozen_config(path: Path) -> Path:
    """The embedded default + REDUCED, written out once: every run of the test uses the same
    config even if someone edits tiny.yaml meanwhile (a resume refuses a different config)."""
    import yaml

    from components.config import load_config, set_dotted

    overrides: dict = {}
    for item in REDUCED:
        key, _, value = item.partition("=")
        set_dotted(overrides, key, yaml.safe_load(value))
    path.write_text(yaml.safe_dump(load_config(None, overrides).model_dump(mode="json")), encoding="utf-8")
    return path


def _summary(text: str) -> dict:
    return json.loads(text[text.rindex("\n{") + 1:])


N_TASKS = 10  # start-tracking, prepare-data, sft, evaluate-sft, reward-model, rollout, grpo-update, rm-replay,
#              evaluate, promote


def _cached_task(entry: Path) -> str:
    """The task a kfp.local cache entry belongs to (from its outputs' paths: <run dir>/<task>/<output>)."""
    uris = [v["uri"] for v in json.loads(entry.read_text()).values() if isinstance(v, dict) and "uri" in v]
    return Path(uris[0]).parent.name


def _registered_sha(workdir: Path) -> tuple[str, str]:
    """sha256 of the weights of the run's registered policy and reward model (alias `challenger`: the
    version this run registered, whether or not the gate made it champion)."""
    import mlflow

    from components import tracking

    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    shas = []
    for name in ("kfp-grpo-policy", "kfp-grpo-reward"):
        local = tracking.download_model(f"models:/{name}@challenger", tempfile.mkdtemp(dir=workdir))
        shas.append(hashlib.sha256(Path(local, "model.safetensors").read_bytes()).hexdigest())
    return shas[0], shas[1]


def test_killed_pipeline_resumes_from_the_last_complete_task_with_identical_results(tmp_path, monkeypatch,
                                                                                   capsys):
    """Run A uninterrupted (with planted credentials in its environment); run B is SIGKILLed
    (whole process group) once its first GRPO update's output exists, then resumed with
    `--resume <parent run id>`: completed tasks are cache hits, the rest run, and the final
    accuracy and registered weights equal A's bit for bit."""
    import mlflow

    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    config = _frozen_config(tmp_path / "reduced.yaml")
    a_log, b_log = open(tmp_path / "a.log", "w+"), open(tmp_path / "b.log", "w+")
    run_a = subprocess.Popen(_cli(config, a_dir), cwd=ROOT, env=_env(**SECRETS), stdout=a_log, stderr=subprocess.STDOUT)
    run_b = subprocess.Popen(_cli(config, b_dir), cwd=ROOT, env=_env(), stdout=b_log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    deadline = time.time() + 500
    while not glob.glob(str(b_dir / "kfp" / "*" / "grpo-update" / "new_policy")):
        assert run_b.poll() is None and time.time() < deadline, Path(b_log.name).read_text()[-3000:]
        time.sleep(0.5)
    os.killpg(run_b.pid, signal.SIGKILL)
    run_b.wait()
    from components.config import load_config
    from pipelines.local import task_names
    from pipelines.pipeline import build_pipeline

    names = task_names(build_pipeline(load_config(config)))  # kfp.local's task names → the tasks' names
    completed = {names[_cached_task(f)][0] for f in (b_dir / "cache").glob("*.json")}  # complete outputs
    hint = re.search(r"resume locally with: kfp-grpo run <same options> --resume ([0-9a-f]+)",
                     Path(b_log.name).read_text())
    assert hint, "the parent run id and the resume command are printed at the start"
    parent = hint.group(1)
    resumed = subprocess.run(_cli(config, b_dir, "--resume", parent), cwd=ROOT, env=_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert run_a.wait(timeout=600) == 0, Path(a_log.name).read_text()[-4000:]
    a_text = Path(a_log.name).read_text()

    log = resumed.stdout + resumed.stderr
    ran = re.findall(r"^\[ *\d+/\d+\] (\S+) +[\d.]+ (?:s|min)\b", log, re.MULTILINE)  # the terminal's task lines
    assert sorted(re.findall(r"^\[ *\d+/\d+\] (\S+) +cached", log, re.MULTILINE)) == sorted(completed)
    with capsys.disabled():
        print(f"\nkilled with {len(completed)} task(s) complete {sorted(completed)}; the resumed run ran {ran}")
    assert len(completed) >= 3 and "start-tracking" in ran  # start-tracking always runs (it reopens the run)
    assert completed.isdisjoint(ran), "a completed task ran again"
    assert len(ran) == N_TASKS - len(completed), ran  # every other task ran once
    assert f"resuming MLflow parent run {parent}" in log

    a, b = _summary(a_text), _summary(resumed.stdout)
    for key in ("challenger_accuracy", "start_accuracy", "promoted", "policy_version"):
        assert a[key] == b[key], key
    assert _registered_sha(a_dir) == _registered_sha(b_dir), "resumed weights differ from the uninterrupted run's"
    c = mlflow.MlflowClient(f"sqlite:///{b_dir / 'mlflow.db'}")
    run = c.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.tags["kfp_grpo.resumed"] == "1"
    children = c.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    finished = Counter(r.data.tags["kfp_grpo.stage"] for r in children if r.info.status == "FINISHED")
    expected = Counter(["prepare_data", "sft", "evaluate", "reward_model", "rollout", "grpo_update", "rm_replay",
                        "evaluate", "promote"])
    # every task completed; at most one twice: the one killed after its MLflow run ended but before
    # kfp.local recorded it as done (its outputs are then rewritten, identically)
    assert not expected - finished and sum((finished - expected).values()) <= 1, finished
    assert all(r.info.status in ("FINISHED", "KILLED") for r in children)

    # ---- no credentials anywhere: logs, MLflow params/tags, artifacts and store, compiled YAML
    _assert_no_secret(a_text, "run log")
    ca = mlflow.MlflowClient(f"sqlite:///{a_dir / 'mlflow.db'}")
    for r in ca.search_runs([e.experiment_id for e in ca.search_experiments()]):
        _assert_no_secret(json.dumps([r.data.params, r.data.tags]), f"MLflow run {r.info.run_id}")
    for f in a_dir.rglob("*"):
        if f.is_file():
            _assert_no_secret(f.read_bytes().decode("latin-1"), str(f))
    from pipelines import cli

    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    assert cli.main(["compile", "--config", str(config), "-o", str(tmp_path / "p.yaml")]) == 0
    _assert_no_secret(capsys.readouterr().out + (tmp_path / "p.yaml").read_text(), "compiled pipeline")
    assert "MLFLOW_TRACKING_PASSWORD" in (tmp_path / "p.yaml").read_text()  # by reference to the Secret only


def _assert_no_secret(text: str, where: str) -> None:
    for k, v in SECRETS.items():
        assert v not in text, f"{k} leaked into {where}"
