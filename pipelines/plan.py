"""Algorithm 1 as data: the tasks of one run, the stage each runs, and how artifacts flow.

The one description of the loop. Both runners walk it: the KFP pipeline
(`pipelines.pipeline`) makes one KFP task per plan task, and the in-process runner
(`pipelines.inprocess`, used by the learning test and the benchmarks) calls each stage's
`run` with paths. A test of one is a test of the other.

    prepare-data → sft → evaluate-sft, reward-model
    for i in 0..I-1:      rollout-i{i}-m{m} → grpo-update-i{i}-m{m}   (m = 0..M-1)
                          (loop.warm_engine: grpo-rounds-i{i}, the M rounds in one task)
                          rm-replay-i{i}  (all M rounds of rollouts + the replay history)
                          evaluate-i{i}
    promote               (after every other task: it closes the run)

A task's `inputs` name its stage's input parameters; each is a `Ref` to another task's
output (an artifact path, or a value such as an accuracy), or a tuple of refs (a list of
paths: `rm-replay` reads every round of its iteration). Its `outputs` name the stage's
output-path parameters; `params` are plain values (step, iteration, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from components.config import Config


@dataclass(frozen=True)
class Ref:
    """Output `output` of task `task`."""

    task: str
    output: str


@dataclass(frozen=True)
class Task:
    """One task of the run: its name (the same in logs, KFP and MLflow), its stage and its wiring."""

    name: str
    stage: str
    inputs: Mapping[str, Ref | tuple[Ref, ...]] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()
    params: Mapping[str, int | float | str] = field(default_factory=dict)
    after: tuple[str, ...] = ()  # order without data: these tasks finish first

    def ref(self, output: str) -> Ref:
        """A reference to one of this task's outputs."""
        if output not in self.outputs + VALUE_OUTPUTS.get(self.stage, ()):
            raise KeyError(f"task {self.name} has no output {output!r}")
        return Ref(self.name, output)


# Outputs that are values rather than artifact paths, and the metric of the stage's result they come from.
VALUE_OUTPUTS: dict[str, tuple[str, ...]] = {"evaluate": ("accuracy",)}
VALUE_METRICS: dict[tuple[str, str], str] = {("evaluate", "accuracy"): "eval/accuracy"}


def algorithm1(cfg: Config) -> list[Task]:
    """The tasks of one run of `cfg`, in an order that respects every dependency."""
    tasks: list[Task] = []

    def add(task: Task) -> Task:
        tasks.append(task)
        return task

    data = add(Task("prepare-data", "prepare_data", outputs=("train", "test")))
    train, test = data.ref("train"), data.ref("test")
    sft = add(Task("sft", "sft", {"train": train}, ("model",)))
    start_eval = add(Task("evaluate-sft", "evaluate", {"test": test, "policy": sft.ref("model")}, ("samples",),
                          {"step": 0}))
    rm_task = add(Task("reward-model", "reward_model", {"train": train, "policy": sft.ref("model")},
                       ("reward_model", "rm_data")))
    policy, rm, history = sft.ref("model"), rm_task.ref("reward_model"), rm_task.ref("rm_data")
    accuracy = start_eval.ref("accuracy")
    step = 0
    for it in range(cfg.loop.iterations):
        reference = policy if cfg.grpo.reference == "iteration" else sft.ref("model")
        if cfg.loop.warm_engine:  # the iteration's M rounds in one task, the policy in memory (pipelines/rounds.py)
            warm = add(Task(f"grpo-rounds-i{it}", "grpo_rounds",
                            {"prompts": train, "policy": policy, "reward_model": rm, "reference": reference},
                            ("rollouts", "new_policy"), {"iteration": it, "first_step": step}))
            iteration_rollouts: Ref | tuple[Ref, ...] = warm.ref("rollouts")
            policy, step = warm.ref("new_policy"), step + cfg.loop.steps_per_iteration
        else:
            rounds: list[Ref] = []
            for m in range(cfg.loop.steps_per_iteration):
                rollout = add(Task(f"rollout-i{it}-m{m}", "rollout",
                                   {"prompts": train, "policy": policy, "reward_model": rm}, ("rollouts",),
                                   {"step": step, "policy_version": f"{it}.{m}"}))
                rounds.append(rollout.ref("rollouts"))
                update = add(Task(f"grpo-update-i{it}-m{m}", "grpo_update",
                                  {"rollouts": rollout.ref("rollouts"), "policy": policy, "reference": reference},
                                  ("new_policy",), {"step": step}))
                policy, step = update.ref("new_policy"), step + 1
            iteration_rollouts = tuple(rounds)
        # Algorithm 1: r_φ is retrained on the iteration's samples after its last policy update
        replay = add(Task(f"rm-replay-i{it}", "rm_replay",
                          {"rollouts": iteration_rollouts, "reward_model": rm, "history": history},
                          ("new_reward_model", "buffer"), {"iteration": it}, after=(tasks[-1].name,)))
        rm, history = replay.ref("new_reward_model"), replay.ref("buffer")
        evaluation = add(Task(f"evaluate-i{it}", "evaluate", {"test": test, "policy": policy}, ("samples",),
                              {"step": it + 1}))
        accuracy = evaluation.ref("accuracy")
    add(Task("promote", "promote",
             {"policy": policy, "reward_model": rm, "buffer": history, "test": test,
              "challenger_accuracy": accuracy, "start_accuracy": start_eval.ref("accuracy")},
             after=tuple(t.name for t in tasks)))  # the final task: it closes the run
    return tasks


def producers(tasks: list[Task]) -> dict[str, Task]:
    """Tasks by name (checks that names are unique and every reference points backwards)."""
    by_name: dict[str, Task] = {}
    for task in tasks:
        if task.name in by_name:
            raise ValueError(f"two tasks are named {task.name!r}")
        for value in task.inputs.values():
            for ref in value if isinstance(value, tuple) else (value,):
                if ref.task not in by_name:
                    raise ValueError(f"task {task.name} reads {ref.task}.{ref.output} before it is produced")
        by_name[task.name] = task
    return by_name
