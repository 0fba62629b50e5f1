"""KFP components: one thin lightweight Python component per stage.

Each body hands its artifact paths to `pipelines.runtime`; the image (`base_image`, chosen
per stage from the config) already has kfp-grpo installed, so nothing is pip-installed at
run time. Locally, `kfp.local`'s SubprocessRunner runs the same functions in the current
environment. Every component takes the task's `name` (the same in local progress, the
compiled display name and the MLflow run), and ends with `exit_fast_on_success()` (no
interpreter teardown after a task that succeeded; see `pipelines.runtime`).
"""


from types import SimpleNamespace
from typing import List, NamedTuple, Optional

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.config import Config


def start_tracking(config: str, settings: dict, tracking_uri: str, init_policy_uri: str,
                   resume_run_id: str = "") -> NamedTuple("Outputs", [("parent_run_id", str), ("config", str)]):
    """Apply the run-time settings to the compiled config (validated), open the pipeline's parent
    MLflow run (or reopen `resume_run_id`); returns its id and the run's config for every other task."""
    from collections import namedtuple

    from components.config import config_from_json, with_run_time_settings
    from pipelines.parent_run import start_parent_run
    from pipelines.runtime import exit_fast_on_success

    effective = with_run_time_settings(config_from_json(config), settings).to_json()
    run_id = start_parent_run(effective, tracking_uri, init_policy_uri, resume_run_id)
    exit_fast_on_success()
    return namedtuple("Outputs", ["parent_run_id", "config"])(run_id, effective)


def prepare_data(config: str, parent_run_id: str, tracking_uri: str, name: str, train: Output[Dataset],
                 test: Output[Dataset], metrics: Output[Metrics]):
    from components import prepare_data as stage
    from pipelines.runtime import exit_fast_on_success, run_task

    run_task(stage.run, name, config, parent_run_id, tracking_uri, metrics, train=train.path, test=test.path)
    exit_fast_on_success()


def sft(config: str, parent_run_id: str, tracking_uri: str, name: str, init_policy_uri: str, train: Input[Dataset],
        model: Output[Model], metrics: Output[Metrics]):
    from pipelines.runtime import exit_fast_on_success
    from pipelines.warm_start import sft_task

    sft_task(name, config, parent_run_id, tracking_uri, metrics, init_policy_uri, train=train.path, model=model.path)
    exit_fast_on_success()


def reward_model(config: str, parent_run_id: str, tracking_uri: str, name: str, init_reward_uri: str,
                 train: Input[Dataset], policy: Input[Model], reward_model: Output[Model], rm_data: Output[Dataset],
                 metrics: Output[Metrics]):
    from pipelines.runtime import exit_fast_on_success
    from pipelines.warm_start import reward_model_task

    reward_model_task(name, config, parent_run_id, tracking_uri, metrics, init_reward_uri, train=train.path,
                      policy=policy.path, reward_model=reward_model.path, rm_data=rm_data.path)
    exit_fast_on_success()


def evaluate(config: str, parent_run_id: str, tracking_uri: str, name: str, step: int, test: Input[Dataset],
             policy: Input[Model], samples: Output[Dataset],
             metrics: Output[Metrics]) -> NamedTuple("Outputs", [("accuracy", float)]):
    from collections import namedtuple

    from components import evaluate as stage
    from pipelines.runtime import exit_fast_on_success, run_task

    result = run_task(stage.run, name, config, parent_run_id, tracking_uri, metrics, test=test.path,
                      policy=policy.path, samples=samples.path, step=step)
    exit_fast_on_success()
    return namedtuple("Outputs", ["accuracy"])(result["eval/accuracy"])


def rollout(config: str, parent_run_id: str, tracking_uri: str, name: str, step: int, policy_version: str,
            prompts: Input[Dataset], policy: Input[Model], reward_model: Input[Model], rollouts: Output[Dataset],
            iteration_rollouts: Output[Dataset], metrics: Output[Metrics], shard: int = 0,
            earlier_rollouts: Optional[Input[Dataset]] = None):
    """One round's rollouts (or one shard); `iteration_rollouts`: `earlier_rollouts` + this round."""
    from components import rollout as stage
    from pipelines.runtime import accumulate, exit_fast_on_success, run_task

    run_task(stage.run, name, config, parent_run_id, tracking_uri, metrics, prompts=prompts.path,
             policy=policy.path, reward_model=reward_model.path, rollouts=rollouts.path, step=step,
             policy_version=policy_version, shard=shard)
    accumulate(earlier_rollouts.path if earlier_rollouts else None, rollouts.path, iteration_rollouts.path)
    exit_fast_on_success()


def gather_rollouts(config: str, parent_run_id: str, tracking_uri: str, step: int, shards: Input[List[Dataset]],
                    rollouts: Output[Dataset], iteration_rollouts: Output[Dataset],
                    earlier_rollouts: Optional[Input[Dataset]] = None):
    """Concatenate rollout shards produced in parallel into one round; log the round's rollout metrics."""
    from pipelines.runtime import accumulate, exit_fast_on_success, gather

    gather(config, parent_run_id, tracking_uri, step, [s.path for s in shards], rollouts.path)
    accumulate(earlier_rollouts.path if earlier_rollouts else None, rollouts.path, iteration_rollouts.path)
    exit_fast_on_success()


def grpo_update(config: str, parent_run_id: str, tracking_uri: str, name: str, step: int, rollouts: Input[Dataset],
                policy: Input[Model], reference: Input[Model], new_policy: Output[Model], metrics: Output[Metrics]):
    """The update in this pod, or (grpo.nodes > 1) as a Kubeflow Trainer job across nodes."""
    from components import grpo_update as stage
    from pipelines.runtime import exit_fast_on_success, run_task, setup
    from pipelines.trainer_job import run_multinode_tracked

    multinode = setup(config).grpo.nodes > 1
    run_task(run_multinode_tracked if multinode else stage.run, name, config, parent_run_id, tracking_uri, metrics,
             stage="grpo_update", rollouts=rollouts.path, policy=policy.path, reference=reference.path,
             new_policy=new_policy.path, step=step)
    exit_fast_on_success()


def grpo_rounds(config: str, parent_run_id: str, tracking_uri: str, name: str, iteration: int, first_step: int,
                prompts: Input[Dataset], policy: Input[Model], reward_model: Input[Model], reference: Input[Model],
                rollouts: Output[Dataset], new_policy: Output[Model], metrics: Output[Metrics]):
    """An iteration's M rounds (rollout → update) in this pod, the policy and the sampler in memory
    (`loop.warm_engine`); `rollouts`: every round's, for rm-replay."""
    from pipelines.rounds import rounds_task
    from pipelines.runtime import exit_fast_on_success

    rounds_task(name, config, parent_run_id, tracking_uri, metrics, prompts=prompts.path, policy=policy.path,
                reward_model=reward_model.path, reference=reference.path, rollouts=rollouts.path,
                new_policy=new_policy.path, iteration=iteration, first_step=first_step)
    exit_fast_on_success()


def rm_replay(config: str, parent_run_id: str, tracking_uri: str, name: str, iteration: int,
              rollouts: Input[Dataset], reward_model: Input[Model], history: Input[Dataset],
              new_reward_model: Output[Model], buffer: Output[Dataset], metrics: Output[Metrics]):
    from components import rm_replay as stage
    from pipelines.runtime import exit_fast_on_success, run_task

    run_task(stage.run, name, config, parent_run_id, tracking_uri, metrics, rollouts=rollouts.path,
             reward_model=reward_model.path, history=history.path, new_reward_model=new_reward_model.path,
             buffer=buffer.path, iteration=iteration)
    exit_fast_on_success()


def promote(config: str, parent_run_id: str, tracking_uri: str, name: str, challenger_accuracy: float,
            start_accuracy: float, policy: Input[Model], reward_model: Input[Model], buffer: Input[Dataset],
            test: Input[Dataset], metrics: Output[Metrics]) -> str:
    """Register the models, run the gate, close the parent run; returns the decision as JSON."""
    import json

    from pipelines.parent_run import promote_task
    from pipelines.runtime import exit_fast_on_success

    decision = json.dumps(promote_task(name, config, parent_run_id, tracking_uri, metrics, policy=policy.path,
                                       reward_model=reward_model.path, buffer=buffer.path, test=test.path,
                                       challenger_accuracy=challenger_accuracy, start_accuracy=start_accuracy))
    exit_fast_on_success()
    return decision


_STAGE_OF = {"start_tracking": "prepare_data", "gather_rollouts": "rollout"}


def make_components(cfg: Config) -> SimpleNamespace:
    """KFP components for every stage, each on the image its placement names."""
    from pipelines.placement import stage_placed_as

    images = cfg.cluster.images
    ops = {}
    for func in (start_tracking, prepare_data, sft, reward_model, evaluate, rollout, gather_rollouts,
                 grpo_update, grpo_rounds, rm_replay, promote):
        stage = _STAGE_OF.get(func.__name__) or (stage_placed_as(cfg, "grpo_rounds") if func is grpo_rounds
                                                 else func.__name__)
        image = getattr(images, cfg.cluster.resources(stage).image)
        ops[func.__name__] = dsl.component(func, base_image=image, install_kfp_package=False)
    return SimpleNamespace(**ops)
