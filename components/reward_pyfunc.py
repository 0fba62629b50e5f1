"""The MLflow pyfunc of a kfp-grpo reward model: r_φ(prompt, completion) for each row of a table.

Logged by `components.tracking.log_reward_model` as "models from code": MLflow stores this file
with the model and runs it on load. Input: a table with columns `prompt` and `completion`
(the user's problem and the assistant's answer, as the policy saw and wrote them); output: one
float per row, the reward model's raw score (higher is better; σ(score) is the probability
that the completion is the better one).
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd


class RewardModel(mlflow.pyfunc.PythonModel):
    """A sequence classifier with one scalar output, scoring the conversation through its chat template."""

    def load_context(self, context: Any) -> None:
        from components.modeling import load_reward_model

        self.model, self.tok = load_reward_model(context.artifacts["reward_model"])
        config = context.model_config or {}
        self.system_prompt, self.max_length = config.get("system_prompt"), int(config.get("max_length", 512))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> list[float]:
        from components.reward_model import score

        missing = {"prompt", "completion"} - set(model_input.columns)
        if missing:
            raise ValueError(f"the reward model scores a table with columns prompt and completion; missing {sorted(missing)}")
        scores = score(self.model, self.tok, model_input["prompt"].astype(str).tolist(),
                       model_input["completion"].astype(str).tolist(), self.max_length, self.system_prompt)
        return scores.tolist()


mlflow.models.set_model(RewardModel())
