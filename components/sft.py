"""Stage: supervised fine-tuning of the initial policy (loss on completion tokens only)."""

from __future__ import annotations

import random

import pandas as pd
import torch

from components import tracking
from components.config import Config
from components.io import distinct_outputs, read_parquet
from components.modeling import chat_prompt, initial_policy, load_policy, save_model
from components.stage_cli import stage_main
from components.rewards import reference_completion
from components.training import train_steps


def build_examples(tok, df: pd.DataFrame, cfg: Config) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) per row; the completion ends with EOS.

    The completion is the row's `demonstration` when it has one (what a demonstrator wrote,
    right or wrong), else the reference completion of its answer (and solution).
    """
    examples = []
    for row in df.itertuples(index=False):
        prompt = chat_prompt(tok, row.prompt, cfg.data.system_prompt)
        demonstration = getattr(row, "demonstration", None)
        if not (isinstance(demonstration, str) and demonstration.strip()):
            demonstration = reference_completion(row.answer, getattr(row, "solution", None), cfg.sft.with_reasoning)
        completion = demonstration + tok.eos_token
        p_ids = tok(prompt, add_special_tokens=False).input_ids
        c_ids = tok(completion, add_special_tokens=False).input_ids
        examples.append((p_ids, c_ids[: max(1, cfg.sft.max_length - len(p_ids))]))
    return examples


def lm_batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 on prompt and padding)."""
    width = max(len(p) + len(c) for p, c in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, c) in enumerate(examples):
        seq = p + c
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = torch.tensor(c)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def run(cfg: Config, train: str, model: str, init: str | None = None) -> dict:
    """Fine-tune the configured initial policy (or the model directory `init`) on the train split.

    Writes an HF model directory to `model`; returns the metrics.
    """
    distinct_outputs(model=model)
    df = read_parquet(train, "training prompts", ["prompt", "answer"])
    if df.empty:
        raise ValueError(f"training prompts {train} are empty")
    policy, tok = load_policy(init, cfg.model) if init else initial_policy(cfg.model, cfg.seed)
    examples = build_examples(tok, df, cfg)
    rng = random.Random(cfg.seed)
    tracking.log_params({"sft.steps": cfg.sft.steps, "sft.lr": cfg.sft.lr, "sft.examples": len(examples)})

    def loss_fn(step: int) -> torch.Tensor:
        batch = lm_batch(rng.sample(examples, min(cfg.sft.batch_size, len(examples))), tok.pad_token_id)
        return policy(**{k: v.to(policy.device) for k, v in batch.items()}).loss

    losses = train_steps(policy, loss_fn, cfg.sft.steps, cfg.sft.lr, cfg.sft.weight_decay,
                         cfg.sft.warmup_steps, name="sft")
    save_model(policy, tok, model)
    return {"sft/final_loss": losses[-1] if losses else float("nan"), "sft/examples": len(examples)}


def main(argv: list[str] | None = None) -> int:
    return stage_main(run, "Supervised fine-tuning of the initial policy.", {
        "train": "Parquet of training prompts (prepare_data's train)", "model": "output: the fine-tuned HF model directory",
        "init": "start from this model directory instead of the config's model.policy"}, argv)


if __name__ == "__main__":
    raise SystemExit(main())
