"""Stage: register the final policy and reward model, and run the promotion gate.

New versions of `<prefix>-policy` and `<prefix>-reward` get alias `challenger`. The
policy becomes `champion` (and its reward model with it) only if its held-out accuracy
beats the current champion's by `promote.margin`; the first version becomes champion.
The champion is re-evaluated on this run's held-out split, so both numbers come from
the same prompts. The decision and its reasons are logged and tagged.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from components import evaluate, tracking
from components.config import Config
from components.grpo_update import OPTIMIZER_FILE
from components.stage_cli import config_from_args, main_wrapper, parser

BUFFER_FILE = "replay_buffer.parquet"


@dataclass
class Decision:
    promoted: bool
    reason: str
    challenger_accuracy: float
    champion_accuracy: float | None
    champion_version: str | None = None
    policy_version: str | None = None
    reward_version: str | None = None


def gate(challenger: float, champion: float | None, margin: float) -> tuple[bool, str]:
    """Promote iff there is no champion or challenger > champion + margin."""
    if champion is None:
        return True, f"no champion yet: the first version (accuracy {challenger:.4f}) becomes champion"
    if challenger > champion + margin:
        return True, f"accuracy {challenger:.4f} beats the champion's {champion:.4f} by more than {margin}"
    return False, f"accuracy {challenger:.4f} does not beat the champion's {champion:.4f} by more than {margin}"


def names(cfg: Config) -> tuple[str, str]:
    """Registered model names: `<prefix>-policy`, `<prefix>-reward`."""
    return f"{cfg.promote.model_prefix}-policy", f"{cfg.promote.model_prefix}-reward"


def run(cfg: Config, policy_dir: str, rm_dir: str | None, test_path: str, run_id: str,
        buffer_path: str | None = None, challenger_accuracy: float | None = None,
        tags: dict[str, str] | None = None) -> dict:
    """Register policy (+ RM with its replay buffer) under `run_id` and gate the champion."""
    c = tracking.client(cfg.tracking.tracking_uri)
    policy_name, reward_name = names(cfg)
    acc = challenger_accuracy
    if acc is None:
        acc = evaluate.run(cfg, test_path, policy_dir)["eval/accuracy"]
    current = tracking.champion(c, policy_name)
    champ_acc = None
    if current is not None:
        with tempfile.TemporaryDirectory() as tmp:
            champ_dir = tracking.download_model(current.source, tmp)
            champ_acc = evaluate.run(cfg, test_path, champ_dir)["eval/accuracy"]
    promoted, reason = gate(acc, champ_acc, cfg.promote.margin)
    version_tags = {**(tags or {}), tracking.ACCURACY_TAG: acc, "config_hash": cfg.hash(),
                    "promotion_decision": "champion" if promoted else "rejected", "promotion_reason": reason}
    with tempfile.TemporaryDirectory() as tmp:  # the registered policy: weights + tokenizer, no optimizer pickle
        staged_policy = Path(tmp) / "policy"
        shutil.copytree(policy_dir, staged_policy, ignore=shutil.ignore_patterns(OPTIMIZER_FILE))
        pv = tracking.register_dir(c, policy_name, str(staged_policy), run_id, "policy", version_tags)
    rv = None
    if rm_dir:
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / "reward_model"
            shutil.copytree(rm_dir, staged)
            if buffer_path:  # the next scheduled run carries the replay buffer forward from here
                shutil.copy(buffer_path, staged / BUFFER_FILE)
            rv = tracking.register_dir(c, reward_name, str(staged), run_id, "reward_model",
                                       {**version_tags, "policy_version": pv})
    c.set_registered_model_alias(policy_name, tracking.CHALLENGER, pv)
    if rv:
        c.set_registered_model_alias(reward_name, tracking.CHALLENGER, rv)
    if promoted:
        c.set_registered_model_alias(policy_name, tracking.CHAMPION, pv)
        if rv:
            c.set_registered_model_alias(reward_name, tracking.CHAMPION, rv)
    decision = Decision(promoted, reason, acc, champ_acc, str(current.version) if current else None, pv, rv)
    c.set_tag(run_id, "promotion_decision", "champion" if promoted else "rejected")
    c.set_tag(run_id, "promotion_reason", reason)
    c.log_metric(run_id, "promote/challenger_accuracy", acc)
    if champ_acc is not None:
        c.log_metric(run_id, "promote/champion_accuracy", champ_acc)
    print(f"[promote] {policy_name} v{pv}: {'PROMOTED to champion' if promoted else 'not promoted'} — {reason}",
          flush=True)
    return asdict(decision)


def main(argv: list[str] | None = None) -> int:
    p = parser("promote", "Register a policy (and reward model) and run the promotion gate.")
    p.add_argument("--policy", required=True, help="policy directory to register")
    p.add_argument("--reward-model", help="reward model directory registered beside it")
    p.add_argument("--buffer", help="replay buffer Parquet stored with the reward model")
    p.add_argument("--test", required=True, help="held-out prompts (Parquet) both models are evaluated on")
    p.add_argument("--run-id", help="MLflow run to log the models to (default: a new run)")

    def body(a):
        cfg = config_from_args(a)
        c = tracking.client(cfg.tracking.tracking_uri)
        run_id = a.run_id
        if not run_id:
            run_id = c.create_run(tracking.ensure_experiment(c, cfg.tracking.experiment),
                                  run_name="manual-promote").info.run_id
        try:
            return run(cfg, a.policy, a.reward_model, a.test, run_id, a.buffer)
        finally:
            if not a.run_id:
                c.set_terminated(run_id)

    return main_wrapper(body, p, argv)


if __name__ == "__main__":
    raise SystemExit(main())
