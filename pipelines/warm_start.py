"""Starting from registered models: the sft and reward-model tasks take the champion (or any
`models:/` URI) instead of training when the run continues from the registry (`--from-champion`,
scheduled runs), and the reward model brings its replay history along."""

from __future__ import annotations

from typing import Any

from components import tracking
from components.config import Config
from pipelines.runtime import run_task, setup, write_metrics_file


def resolve_model(uri: str, dst: str, tracking_uri: str, cfg_tracking_uri: str | None,
                  may_be_absent: tuple[str, ...] = ()) -> bool:
    """Download a registered model (e.g. `models:/kfp-grpo-policy@champion`) into `dst`, atomically.

    Returns False when `uri` is one of `may_be_absent` (this config's champion URIs) and no
    version holds it yet (no champion so far: the caller trains from scratch instead); any
    other URI that does not resolve (a misspelt name or alias) raises.
    """
    import shutil
    import tempfile

    from mlflow.exceptions import MlflowException

    from components.io import atomic_path

    tracking.client(tracking_uri or cfg_tracking_uri)
    try:
        with tempfile.TemporaryDirectory() as tmp, atomic_path(dst) as out:
            local = tracking.download_model(uri, tmp)
            shutil.copytree(local, out, dirs_exist_ok=True)
    except MlflowException as err:
        if uri in may_be_absent and ("alias" in str(err).lower() or "not found" in str(err).lower()):
            print(f"[resolve] {uri} does not exist yet ({err.message}); training from scratch", flush=True)
            return False
        raise ValueError(f"cannot resolve {uri}: {' '.join(str(err.message).split())}; check the model name and "
                         f"alias (only this config's champions {list(may_be_absent)} may not exist yet)") from None
    print(f"[resolve] {uri} → {dst}", flush=True)
    return True


def _champions(cfg: Config) -> tuple[str, ...]:
    """This config's champion URIs (what `--from-champion` passes): the ones that may not exist yet."""
    return tuple(tracking.champion_uris(cfg).values())


def sft_task(name: str, config_json: str, parent_run_id: str, tracking_uri: str, metrics_artifact: Any,
             init_policy_uri: str, train: str, model: str) -> dict:
    """The sft task: start from the registered model `init_policy_uri` when it resolves, else run SFT."""
    from components import sft

    cfg = setup(config_json)
    if init_policy_uri and resolve_model(init_policy_uri, model, tracking_uri, cfg.tracking.tracking_uri,
                                         _champions(cfg)):
        write_metrics_file(metrics_artifact)
        return {}
    return run_task(sft.run, name, config_json, parent_run_id, tracking_uri, metrics_artifact, train=train,
                    model=model)


def reward_model_task(name: str, config_json: str, parent_run_id: str, tracking_uri: str, metrics_artifact: Any,
                      init_reward_uri: str, train: str, policy: str, reward_model: str, rm_data: str) -> dict:
    """The reward-model task: start from `init_reward_uri` (and its replay history) when it resolves,
    else train r_φ."""
    from components import reward_model as stage

    cfg = setup(config_json)
    if init_reward_uri and resolve_model(init_reward_uri, reward_model, tracking_uri, cfg.tracking.tracking_uri,
                                         _champions(cfg)):
        carry_buffer(cfg, init_reward_uri, train, reward_model, rm_data)
        write_metrics_file(metrics_artifact)
        return {}
    return run_task(stage.run, name, config_json, parent_run_id, tracking_uri, metrics_artifact, train=train,
                    policy=policy, reward_model=reward_model, rm_data=rm_data)


def carry_buffer(cfg: Config, uri: str, train_path: str, rm_dir: str, data_out: str) -> None:
    """The replay history stored with a registered RM becomes this run's history.

    A version registered without a buffer gets fresh synthetic RM data instead.
    """
    import shutil
    from pathlib import Path

    from components.io import read_parquet, write_parquet
    from components.artifacts import BUFFER_FILE
    from components.reward_model import synthetic_rm_data

    buffer = Path(rm_dir) / BUFFER_FILE
    if buffer.exists():
        shutil.copy(buffer, data_out)
        print(f"[resolve] replay buffer carried forward from {uri}", flush=True)
    else:
        prompts = read_parquet(train_path, "training prompts")
        write_parquet(synthetic_rm_data(prompts, cfg.reward_model.negatives_per_prompt, cfg.seed), data_out)
