"""Stage: register the final policy and reward model, and run the promotion gate.

New versions of `<prefix>-policy` and `<prefix>-reward` get alias `challenger`. The
policy becomes `champion` (and its reward model with it) only if its held-out accuracy
beats by `promote.margin` both the model the run started from (the SFT model, or the
incoming champion of a `--from-champion` run) and the current champion — also when it
is the first version. The champion is re-evaluated on this run's held-out split, so all
numbers come from the same prompts. The decision and its reasons are logged and tagged.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import asdict, dataclass
from typing import Iterator

from components import evaluate, monitor, tracking
from components.config import Config
from components.stage_cli import config_from_args, main_wrapper, parser



@dataclass
class Decision:
    promoted: bool
    reason: str
    challenger_accuracy: float
    champion_accuracy: float | None
    champion_version: str | None = None
    policy_version: str | None = None
    reward_version: str | None = None
    start_accuracy: float | None = None


def gate(challenger: float, champion: float | None, margin: float,
         start: float | None = None) -> tuple[bool, str]:
    """Promote iff challenger > start + margin (when the start is known) and, when there is a
    champion, challenger > champion + margin."""
    if start is not None and not challenger > start + margin:
        return False, (f"accuracy {challenger:.4f} does not beat the {start:.4f} of the model this run started "
                       f"from by more than {margin}: GRPO did not improve it")
    beats_start = f"; it beats the starting model's {start:.4f}" if start is not None else ""
    if champion is None:
        return True, f"no champion yet: accuracy {challenger:.4f}{beats_start} by more than {margin}"
    if challenger > champion + margin:
        return True, f"accuracy {challenger:.4f} beats the champion's {champion:.4f}{beats_start} by more than {margin}"
    return False, f"accuracy {challenger:.4f} does not beat the champion's {champion:.4f} by more than {margin}"


def names(cfg: Config) -> tuple[str, str]:
    """Registered model names: `<prefix>-policy`, `<prefix>-reward`."""
    return f"{cfg.promote.model_prefix}-policy", f"{cfg.promote.model_prefix}-reward"


def run(cfg: Config, policy: str, reward_model: str | None, test: str, run_id: str,
        buffer: str | None = None, challenger_accuracy: float | None = None,
        start_accuracy: float | None = None, tags: dict[str, str] | None = None) -> dict:
    """Register the model directory `policy` (+ `reward_model` with its replay history `buffer`)
    under MLflow run `run_id` and gate the champion on the held-out prompts `test`.

    `challenger_accuracy`: the policy's accuracy on `test` (evaluated here when None);
    `start_accuracy`: the accuracy of the model the run started from, which the policy must beat.

    Registry safety (tracking outages, killed tasks, racing runs):
    - versions are created first, tagged `promotion_decision=pending`, with no alias; aliases
      move last, so an alias never points at a version whose registration did not finish;
    - the champion is re-read under a registry-wide lock (:func:`promotion_lock`) and, if
      another run promoted meanwhile, this challenger is gated again against the new
      champion (compare-and-set): two racing runs cannot leave the worse one champion;
    - on an error the aliases moved so far are put back and the versions created are deleted
      (best effort); what an outage leaves behind (`pending` versions without alias) is
      deleted by the next attempt of the same run (a KFP retry).
    """
    c = tracking.client(cfg.tracking.tracking_uri)
    policy_name, reward_name = names(cfg)
    drop_pending(c, (policy_name, reward_name), run_id)
    acc = challenger_accuracy
    if acc is None:
        acc = evaluate.run(cfg, test, policy)["eval/accuracy"]
    current = tracking.champion(c, policy_name)
    champ_acc = _accuracy_of(cfg, test, current)
    version_tags = {**(tags or {}), tracking.ACCURACY_TAG: acc, "config_hash": cfg.hash(),
                    "promotion_decision": PENDING}
    created: list[tuple[str, str]] = []
    moved: list[tuple[str, str, str | None]] = []  # (model, alias, version it pointed to before)
    try:
        # MLflow models of the run (the policy: transformers flavor, chat task; the RM: a scoring pyfunc
        # carrying the replay history forward), registered as new versions
        pv = tracking.register(c, policy_name, tracking.log_policy(run_id, policy), run_id, version_tags)
        created.append((policy_name, pv))
        rv = None
        if reward_model:
            info = tracking.log_reward_model(run_id, reward_model, buffer, system_prompt=cfg.data.system_prompt,
                                             max_length=cfg.reward_model.max_length)
            rv = tracking.register(c, reward_name, info, run_id, {
                **version_tags, "policy_version": pv, "reward_model_objective": cfg.reward_model.objective})
            created.append((reward_name, rv))
        with promotion_lock(c, policy_name, run_id):
            latest = tracking.champion(c, policy_name)
            if _version(latest) != _version(current):  # promoted by another run since we looked: gate again
                print(f"[promote] the champion changed to v{_version(latest)} meanwhile; gating against it",
                      flush=True)
                current, champ_acc = latest, _accuracy_of(cfg, test, latest)
            promoted, reason = gate(acc, champ_acc, cfg.promote.margin, start_accuracy)
            updates = [(policy_name, tracking.CHALLENGER, pv)] + ([(reward_name, tracking.CHALLENGER, rv)] if rv else [])
            if promoted:  # the reward model first: the policy alias is the one runs start from
                updates += ([(reward_name, tracking.CHAMPION, rv)] if rv else []) + [(policy_name, tracking.CHAMPION, pv)]
            for name, alias, version in updates:
                moved.append((name, alias, _alias_version(c, name, alias)))
                c.set_registered_model_alias(name, alias, version)
    except BaseException:
        _rollback(c, moved, created)
        raise
    decision_tag = "champion" if promoted else "rejected"
    for name, version in created:
        c.set_model_version_tag(name, version, "promotion_decision", decision_tag)
        c.set_model_version_tag(name, version, "promotion_reason", reason)
    decision = Decision(promoted, reason, acc, champ_acc, str(current.version) if current else None, pv, rv,
                        start_accuracy)
    c.set_tag(run_id, "promotion_decision", decision_tag)
    c.set_tag(run_id, "promotion_reason", reason)
    c.log_metric(run_id, "promote/challenger_accuracy", acc)
    if champ_acc is not None:
        c.log_metric(run_id, "promote/champion_accuracy", champ_acc)
    if start_accuracy is not None:
        c.log_metric(run_id, "promote/start_accuracy", start_accuracy)
    print(f"[promote] {policy_name} v{pv}: {'PROMOTED to champion' if promoted else 'not promoted'} — {reason}",
          flush=True)
    return {**asdict(decision), **hacking_monitor(c, run_id)}


def hacking_monitor(c, run_id: str) -> dict:
    """The run's reward-hacking check (`components.monitor`) from its per-round rollout curves, logged on
    the run (metric `monitor/reward_hacking`, tag `reward_hacking`) and returned for the run summary."""
    def curve(key: str) -> list[float]:
        return [m.value for m in sorted(c.get_metric_history(run_id, key), key=lambda m: m.step)]

    flagged, why = monitor.reward_hacking(curve("rollout/reward_mean"), curve("rollout/accuracy"))
    c.log_metric(run_id, "monitor/reward_hacking", float(flagged))
    c.set_tag(run_id, "reward_hacking", why)
    print(f"[promote] monitor: {why}", flush=True)
    return {"reward_hacking": flagged, "reward_hacking_reason": why}


PENDING = "pending"
LOCK_SUFFIX = "-promotion-lock"


def _version(mv) -> str | None:
    return str(mv.version) if mv is not None else None


def _accuracy_of(cfg: Config, test: str, mv) -> float | None:
    """The held-out accuracy of registered version `mv` on this run's test split (None: no champion)."""
    if mv is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return evaluate.run(cfg, test, tracking.download_model(mv.source, tmp))["eval/accuracy"]


def _alias_version(c, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(c.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _rollback(c, moved: list[tuple[str, str, str | None]], created: list[tuple[str, str]]) -> None:
    """Best effort after a failure: aliases back where they were, this attempt's versions deleted."""
    left = []
    for name, alias, before in reversed(moved):
        try:
            if before is None:
                c.delete_registered_model_alias(name, alias)
            else:
                c.set_registered_model_alias(name, alias, before)
        except Exception:  # the registry is unreachable: nothing more we can do now
            left.append(f"{name}@{alias}")
    for name, version in created:
        try:
            c.delete_model_version(name, version)
        except Exception:
            left.append(f"{name} v{version} (tagged promotion_decision={PENDING}, no alias)")
    if left:
        print(f"[promote] could not undo {left}; the next attempt of this run removes pending versions", flush=True)


def drop_pending(c, model_names: tuple[str, ...], run_id: str) -> None:
    """Delete versions an interrupted earlier attempt of `run_id` left `pending` and alias-free."""
    from mlflow.exceptions import MlflowException

    for name in model_names:
        try:
            versions = c.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        except MlflowException:
            continue
        for mv in versions:
            if mv.tags.get("promotion_decision") == PENDING and not mv.aliases:
                print(f"[promote] removing {name} v{mv.version}, left pending by an interrupted attempt", flush=True)
                c.delete_model_version(name, mv.version)


@contextlib.contextmanager
def promotion_lock(c, name: str, owner: str, ttl_s: float | None = None, wait_s: float | None = None,
                   poll_s: float = 0.5) -> Iterator[None]:
    """Mutual exclusion of promotions of `name` across processes and machines.

    The lock is a registered model `<name>-promotion-lock`: creating one is atomic in every
    MLflow store (unique name), so exactly one promoter holds it; it is deleted on release.
    A lock older than `ttl_s` (KFP_GRPO_PROMOTION_LOCK_TTL, default 1800 s) was left by a
    killed promoter and is broken. Waits up to `wait_s` (KFP_GRPO_PROMOTION_LOCK_WAIT, 600 s).
    """
    import os
    import time

    from mlflow.exceptions import MlflowException

    ttl_s = ttl_s if ttl_s is not None else float(os.environ.get("KFP_GRPO_PROMOTION_LOCK_TTL", "1800"))
    wait_s = wait_s if wait_s is not None else float(os.environ.get("KFP_GRPO_PROMOTION_LOCK_WAIT", "600"))
    lock = f"{name}{LOCK_SUFFIX}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            c.create_registered_model(lock, tags={"kfp_grpo.lock_owner": owner},
                                      description="kfp-grpo promotion lock: exists while a run moves the aliases")
            break
        except MlflowException as err:
            if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
                raise
        try:
            held = c.get_registered_model(lock)
        except MlflowException:  # released meanwhile
            continue
        if time.time() * 1000 - held.creation_timestamp > ttl_s * 1000:
            print(f"[promote] breaking stale lock {lock} (held by {held.tags.get('kfp_grpo.lock_owner')})", flush=True)
            with contextlib.suppress(MlflowException):
                c.delete_registered_model(lock)
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(f"promotion lock {lock} held by run {held.tags.get('kfp_grpo.lock_owner')} "
                               f"for more than {wait_s:g}s")
        time.sleep(poll_s)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            c.delete_registered_model(lock)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = parser("promote", "Register a policy (and reward model) and run the promotion gate.", prog)
    p.add_argument("--policy", required=True, help="policy directory to register")
    p.add_argument("--reward-model", help="reward model directory registered beside it")
    p.add_argument("--buffer", help="replay buffer Parquet stored with the reward model")
    p.add_argument("--test", required=True, help="held-out prompts (Parquet) both models are evaluated on")
    p.add_argument("--run-id", help="MLflow run to log the models to (default: a new run)")
    p.add_argument("--start-policy", help="the model the policy was trained from (e.g. the SFT model): "
                                          "the policy must beat it on --test to become champion")

    def body(a):
        cfg = config_from_args(a)
        start = evaluate.run(cfg, a.test, a.start_policy)["eval/accuracy"] if a.start_policy else None
        c = tracking.client(cfg.tracking.tracking_uri)
        run_id = a.run_id
        if not run_id:
            run_id = c.create_run(tracking.ensure_experiment(c, cfg.tracking.experiment),
                                  run_name="manual-promote").info.run_id
        status = "FAILED"  # unless the promotion completes: a failed promotion's run must not read FINISHED
        try:
            result = run(cfg, a.policy, a.reward_model, a.test, run_id, a.buffer, start_accuracy=start)
            status = "FINISHED"
            return result
        finally:
            if not a.run_id:
                with contextlib.suppress(Exception):  # the store may be what failed; keep the original error
                    c.set_terminated(run_id, status)

    return main_wrapper(body, p, argv)


if __name__ == "__main__":
    raise SystemExit(main())
