"""Side B: TRL's GRPOTrainer with the settings of the kfp-grpo config the benchmark compares.

One round = one TRL generation batch (B prompts × G completions) and the optimizer steps
TRL takes on it (`steps_per_generation` × `num_iterations`), i.e. the same work as one
kfp-grpo rollout + update. Everything the comparison depends on comes from the config
(`trl_args`): G, prompts per step, minibatch, μ, lr and its warm-up, weight decay, gradient
clipping, β, ε_low/ε_high, loss aggregation, max completion length, temperature, top-p,
reward weights, seed; π_ref is synced to the policy every iteration when
`grpo.reference: iteration`. The optimizer is the same `torch.optim.AdamW` over all
parameters with the same per-step warm-up as `grpo_update.warmup_lr`.

TRL's methods are timed in a subclass (TRL's code is not edited) to split each round into

    generate   `_generate` (tokenise, model.generate, decode)
    score      `_calculate_rewards`
    logprobs   the rest of `_generate_and_score_completions` (π_old, π_ref forwards, advantages)
    train      everything else in the round (loss forward/backward, optimizer, Trainer loop)

TRL keeps models and data in memory, so it has no io phase.

    python -m benchmarks.trl_runner --spec '<json>' --paths '<json>' --out trl.json --work DIR
"""

from __future__ import annotations

import time
import warnings

from benchmarks.common import TRL_LOSS, Phases, SideLog, Spec, cpu_seconds, heldout_accuracy, param_count, \
    setup_torch, side_main, write_json


def reward_functions(cfg):
    """The task's verifier rewards (components.rewards) in TRL's reward-function signature, with their weights."""
    from components.rewards import correctness_reward, format_reward

    def text(c) -> str:
        return c[0]["content"] if isinstance(c, list) else c

    def correct(completions, answer, **_):
        return [correctness_reward(text(c), a) for c, a in zip(completions, answer)]

    def fmt(completions, **_):
        return [format_reward(text(c)) for c in completions]

    return [correct, fmt], [cfg.reward.correctness_weight, cfg.reward.format_weight]


def steps_per_round(cfg) -> int:
    """Optimizer steps on one round of rollouts (kfp-grpo: μ epochs of minibatches)."""
    rows = cfg.rollout.group_size * cfg.rollout.prompts_per_step
    if rows % cfg.grpo.minibatch_size:
        raise ValueError(f"TRL needs the round's {rows} completions to split into minibatches of "
                         f"{cfg.grpo.minibatch_size}")
    return cfg.grpo.epochs * rows // cfg.grpo.minibatch_size


def trl_args(spec: Spec, out_dir: str, use_cpu: bool):
    """The GRPOConfig equal to the compared kfp-grpo config."""
    import torch
    from trl import GRPOConfig

    cfg = spec.cfg
    g, r = cfg.grpo, cfg.rollout
    per_round = steps_per_round(cfg)
    sync = g.reference == "iteration" and g.beta > 0
    return GRPOConfig(
        output_dir=out_dir, seed=cfg.seed, use_cpu=use_cpu, bf16=False, fp16=False,
        gradient_checkpointing=False,  # TRL's default is on; kfp-grpo's grpo.gradient_checkpointing is off
        per_device_train_batch_size=g.minibatch_size, gradient_accumulation_steps=1,
        steps_per_generation=per_round // g.epochs, num_generations=r.group_size, num_iterations=g.epochs,
        max_completion_length=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=0,
        learning_rate=g.lr, weight_decay=g.weight_decay, max_grad_norm=g.max_grad_norm,  # optimizer: see Timed
        beta=g.beta, epsilon=g.eps_low, epsilon_high=g.eps_high, loss_type=TRL_LOSS[g.loss_agg],
        scale_rewards=g.advantage.scale,  # the same names in both
        reward_weights=reward_functions(cfg)[1], mask_truncated_completions=False, disable_dropout=True,
        sync_ref_model=sync, ref_model_mixup_alpha=1.0,
        ref_model_sync_steps=per_round * cfg.loop.steps_per_iteration,
        max_steps=spec.rounds * per_round, model_init_kwargs={"dtype": getattr(torch, cfg.model.dtype)},
        report_to=[], logging_steps=10**9, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        log_completions=False,
    )


def run(spec: Spec, paths: dict, out: str, work: str) -> dict:
    import pandas as pd
    import torch

    cfg = spec.cfg
    g = cfg.grpo
    setup_torch(cfg.torch_threads)
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from components.modeling import load_tokenizer

    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated")  # transformers 5.24
    ph = Phases()
    train = pd.read_parquet(paths["train"])
    test = pd.read_parquet(paths["test"])
    system = [{"role": "system", "content": cfg.data.system_prompt}] if cfg.data.system_prompt else []
    ds = Dataset.from_dict({"prompt": [system + [{"role": "user", "content": p}] for p in train.prompt],
                            "answer": list(train.answer)})
    tok, eval_tok = load_tokenizer(paths["sft"]), load_tokenizer(paths["sft"])
    per_round = steps_per_round(cfg)
    counts = {"completion_tokens": 0, "prompt_tokens": 0, "rows": 0}
    log = SideLog("TRL", spec, paths["sft_accuracy"])

    class Timed(GRPOTrainer):
        def create_optimizer(self, model=None):
            if self.optimizer is None:  # as grpo_update: AdamW over every parameter
                self.optimizer = torch.optim.AdamW((model or self.model).parameters(), lr=g.lr,
                                                   weight_decay=g.weight_decay)
            return self.optimizer

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:  # as grpo_update.warmup_lr: lr·(k+1)/warmup for step k < warmup
                warm = g.warmup_steps
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer, lambda k: min(1.0, (k + 1) / warm) if warm else 1.0)
            return self.lr_scheduler

        def _generate(self, prompts):
            with ph("generate"):
                outs = super()._generate(prompts)
            prompt_ids, completion_ids = outs[0], outs[1]
            counts["completion_tokens"] += sum(len(c) for c in completion_ids)
            counts["prompt_tokens"] += sum(len(p) for p in prompt_ids)
            counts["rows"] += len(completion_ids)
            return outs

        def _calculate_rewards(self, *a, **k):
            with ph("score"):
                return super()._calculate_rewards(*a, **k)

        def _generate_and_score_completions(self, inputs):
            with ph("generate_and_score"):
                return super()._generate_and_score_completions(inputs)

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            ph.take()
            self.w, self.c = time.perf_counter(), cpu_seconds()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % per_round:
                return
            wall, cpu = time.perf_counter() - self.w, cpu_seconds() - self.c
            p = ph.take()
            phases = {}
            for kind, total in (("wall", wall), ("cpu", cpu)):
                d = p[kind]
                gen, score = d.get("generate", 0.0), d.get("score", 0.0)
                logprobs = d.get("generate_and_score", 0.0) - gen - score
                phases[kind] = {"generate": gen, "score": score, "logprobs": logprobs,
                                "train": total - gen - score - logprobs}
            m = trainer._metrics["train"]
            stats = {"reward_mean": _last(m, "reward"), "kl": _last(m, "kl"),
                     "clip_fraction": _last(m, "clip_ratio/region_mean"), "optimizer_steps": per_round}
            log.add_round(wall, cpu, phases["wall"], phases["cpu"], dict(counts), stats,
                          lambda: heldout_accuracy(trainer.model, eval_tok, test, cfg), other=False)
            for k in counts:
                counts[k] = 0
            ph.take()
            self.w, self.c = time.perf_counter(), cpu_seconds()

    use_cpu = not torch.cuda.is_available()
    trainer = Timed(model=paths["sft"], reward_funcs=reward_functions(cfg)[0], args=trl_args(spec, work, use_cpu),
                    train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    n_params = param_count(trainer.model)
    trainer.train()
    optim = type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__  # unwrap accelerate
    result = log.result(n_params=n_params, optim=optim, done=True)
    write_json(result, out)
    return result


def _last(metrics: dict, key: str) -> float:
    values = metrics.get(key) or [float("nan")]
    return float(values[-1])


if __name__ == "__main__":
    side_main(run)
