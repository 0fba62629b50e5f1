"""KFP components: one thin lightweight Python component per stage.

Each body only imports `pipelines.runtime` and hands it artifact paths; the image
(`base_image`, chosen per stage from the config) already has kfp-grpo installed, so
nothing is pip-installed at run time. Locally, `kfp.local`'s SubprocessRunner runs the
same functions in the current environment.
"""


from types import SimpleNamespace
from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.config import Config


def start_tracking(config: str, tracking_uri: str, init_policy_uri: str, resume_run_id: str = "") -> str:
    """Open the pipeline's parent MLflow run (or reopen `resume_run_id`); returns its id."""
    from pipelines.runtime import start_parent_run

    return start_parent_run(config, tracking_uri, init_policy_uri, resume_run_id)


def prepare_data(config: str, parent_run_id: str, tracking_uri: str, train: Output[Dataset],
                 test: Output[Dataset], metrics: Output[Metrics]):
    from pipelines.runtime import run_task

    run_task("prepare_data", config, parent_run_id, tracking_uri, metrics, train_out=train.path, test_out=test.path)


def sft(config: str, parent_run_id: str, tracking_uri: str, init_policy_uri: str, train: Input[Dataset],
        model: Output[Model], metrics: Output[Metrics]):
    from pipelines.runtime import sft_or_resume

    sft_or_resume(config, parent_run_id, tracking_uri, init_policy_uri, train.path, model.path, metrics)


def reward_model(config: str, parent_run_id: str, tracking_uri: str, init_reward_uri: str, train: Input[Dataset],
                 policy: Input[Model], reward_model: Output[Model], rm_data: Output[Dataset],
                 metrics: Output[Metrics]):
    from pipelines.runtime import reward_model_or_resume

    reward_model_or_resume(config, parent_run_id, tracking_uri, init_reward_uri, train.path, policy.path,
                           reward_model.path, rm_data.path, metrics)


def evaluate(config: str, parent_run_id: str, tracking_uri: str, step: int, test: Input[Dataset],
             policy: Input[Model], samples: Output[Dataset], metrics: Output[Metrics]) -> float:
    from pipelines.runtime import run_task

    result = run_task("evaluate", config, parent_run_id, tracking_uri, metrics, test_path=test.path,
                      policy_dir=policy.path, samples_out=samples.path, step=step)
    return result["eval/accuracy"]


def rollout(config: str, parent_run_id: str, tracking_uri: str, step: int, policy_version: str, shard: int,
            prompts: Input[Dataset], policy: Input[Model], reward_model: Input[Model],
            rollouts: Output[Dataset], metrics: Output[Metrics]):
    from pipelines.runtime import run_task

    run_task("rollout", config, parent_run_id, tracking_uri, metrics, prompts_path=prompts.path,
             policy_dir=policy.path, rm_dir=reward_model.path, out_path=rollouts.path, step=step,
             policy_version=policy_version, shard=shard)


def gather_rollouts(config: str, parent_run_id: str, tracking_uri: str, step: int, shards: Input[List[Dataset]],
                    rollouts: Output[Dataset]):
    """Concatenate rollout shards produced in parallel into one round; log the round's rollout metrics."""
    from pipelines.runtime import gather

    gather(config, parent_run_id, tracking_uri, step, [s.path for s in shards], rollouts.path)


def grpo_update(config: str, parent_run_id: str, tracking_uri: str, step: int, rollouts: Input[Dataset],
                policy: Input[Model], reference: Input[Model], new_policy: Output[Model],
                metrics: Output[Metrics]):
    from pipelines.trainer_job import grpo_update_task  # in this pod, or a Trainer job when grpo.nodes > 1

    grpo_update_task(config, parent_run_id, tracking_uri, metrics, rollout_paths=[rollouts.path],
                     policy_dir=policy.path, ref_dir=reference.path, out_dir=new_policy.path, step=step)


def rm_replay(config: str, parent_run_id: str, tracking_uri: str, iteration: int, rollouts: Input[Dataset],
              reward_model: Input[Model], history: Input[Dataset], new_reward_model: Output[Model],
              buffer: Output[Dataset], metrics: Output[Metrics]):
    from pipelines.runtime import run_task

    run_task("rm_replay", config, parent_run_id, tracking_uri, metrics, rollout_paths=[rollouts.path],
             rm_dir=reward_model.path, history_paths=[history.path], out_dir=new_reward_model.path,
             buffer_out=buffer.path, iteration=iteration)


def promote(config: str, parent_run_id: str, tracking_uri: str, accuracy: float, sft_accuracy: float,
            policy: Input[Model], reward_model: Input[Model], buffer: Input[Dataset], test: Input[Dataset],
            metrics: Output[Metrics]) -> str:
    """Register the models, run the gate, close the parent run; returns the decision as JSON."""
    from pipelines.runtime import promote_task

    return promote_task(config, parent_run_id, tracking_uri, accuracy, sft_accuracy, policy.path,
                        reward_model.path, buffer.path, test.path, metrics)


_STAGE_OF = {"start_tracking": "prepare_data", "gather_rollouts": "rollout"}


def make_components(cfg: Config) -> SimpleNamespace:
    """KFP components for every stage, each on the image its placement names."""
    images = cfg.cluster.images
    ops = {}
    for func in (start_tracking, prepare_data, sft, reward_model, evaluate, rollout, gather_rollouts,
                 grpo_update, rm_replay, promote):
        stage = _STAGE_OF.get(func.__name__, func.__name__)
        image = getattr(images, cfg.cluster.resources(stage).image)
        ops[func.__name__] = dsl.component(func, base_image=image, install_kfp_package=False)
    return SimpleNamespace(**ops)
