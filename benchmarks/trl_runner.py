"""Side B: TRL's GRPOTrainer with the same model, task, reward, G, batch, lengths, lr, seed.

One round = one TRL generation batch (B prompts × G completions) and the
`steps_per_generation` optimizer steps TRL takes on it, i.e. the same work as one
kfp-grpo rollout + update. The trainer's methods are wrapped (not edited) to split
each round into the same phases as side A:

    generate   `_generate` (tokenise, model.generate, decode)
    score      `_calculate_rewards`
    logprobs   the rest of `_generate_and_score_completions` (π_old, π_ref forwards, advantages)
    train      everything else in the round (loss forward/backward, optimizer, Trainer loop)

    python -m benchmarks.trl_runner --spec '<json>' --paths '<json>' --out trl.json
"""

from __future__ import annotations

import argparse
import json
import time

from benchmarks.common import TRL_LOSS, Phases, Spec, cpu_seconds, heldout_accuracy, loadavg, param_count, \
    setup_torch, update_flops, write_json


def reward_functions(spec: Spec):
    """Our verifier rewards (components.rewards) in TRL's reward-function signature."""
    from components.rewards import correctness_reward, format_reward

    def text(c) -> str:
        return c[0]["content"] if isinstance(c, list) else c

    def correct(completions, answer, **_):
        return [correctness_reward(text(c), a) for c, a in zip(completions, answer)]

    def fmt(completions, **_):
        return [format_reward(text(c)) for c in completions]

    return [correct, fmt], [spec.correctness_weight, spec.format_weight]


def trl_args(spec: Spec, out_dir: str, use_cpu: bool):
    import torch
    from trl import GRPOConfig

    funcs, weights = reward_functions(spec)
    return GRPOConfig(
        output_dir=out_dir, seed=spec.seed, use_cpu=use_cpu, bf16=False, fp16=False,
        gradient_checkpointing=False,  # TRL's default is on; ours never recomputes activations
        per_device_train_batch_size=spec.minibatch, gradient_accumulation_steps=1,
        steps_per_generation=spec.rows_per_round // spec.minibatch, num_generations=spec.group_size,
        num_iterations=1, max_completion_length=spec.max_new_tokens, temperature=spec.temperature,
        top_p=1.0, top_k=0, learning_rate=spec.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, beta=spec.beta, epsilon=spec.eps, epsilon_high=spec.eps,
        loss_type=TRL_LOSS[spec.loss], scale_rewards="group", reward_weights=weights,
        mask_truncated_completions=False, disable_dropout=True,
        max_steps=spec.rounds * (spec.rows_per_round // spec.minibatch),
        model_init_kwargs={"dtype": torch.float32}, report_to=[], logging_steps=10**9, save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, log_completions=False,
    )


def run(spec: Spec, paths: dict, out: str, work: str) -> dict:
    import pandas as pd
    import torch

    setup_torch(spec.threads)
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from components.modeling import load_tokenizer

    ph = Phases()
    train = pd.read_parquet(paths["train"])
    test = pd.read_parquet(paths["test"])
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in train.prompt],
                            "answer": list(train.answer)})
    tok = load_tokenizer(paths["sft"])
    steps_per_round = spec.rows_per_round // spec.minibatch
    counts = {"completion_tokens": 0, "prompt_tokens": 0, "rows": 0, "nograd_rows": 0, "nograd_tokens": 0,
              "nograd_passes": 0}

    class Timed(GRPOTrainer):
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
            with ph("gen_and_score"):
                return super()._generate_and_score_completions(inputs)

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, *a, **k):
            if not torch.is_grad_enabled():
                counts["nograd_passes"] += 1
                counts["nograd_rows"] += int(input_ids.shape[0])
                counts["nograd_tokens"] += int(attention_mask.sum())
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, *a, **k)

    rounds, curve = [], [{"round": 0, "wall": 0.0, "accuracy": paths["sft_accuracy"]}]
    state = {"clock": 0.0}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, st, control, **kw):
            ph.take()
            self.w, self.c = time.perf_counter(), cpu_seconds()

        def on_step_end(self, args, st, control, model=None, **kw):
            if st.global_step % steps_per_round:
                return
            w, c = time.perf_counter(), cpu_seconds()
            p = ph.take()
            r = st.global_step // steps_per_round
            rec = {"round": r, "wall": w - self.w, "cpu": c - self.c, **{k: v for k, v in counts.items()}}
            rec["nograd_passes"] = rec["nograd_rows"] / max(rec["rows"], 1)  # full-batch equivalents
            for k in counts:
                counts[k] = 0
            for kind in ("wall", "cpu"):
                d = p[kind]
                gen, score = d.get("generate", 0.0), d.get("score", 0.0)
                lp = d.get("gen_and_score", 0.0) - gen - score
                rec[f"phase_{kind}"] = {"generate": gen, "score": score, "logprobs": lp,
                                        "train": rec[kind] - gen - score - lp, "io": 0.0}
            m = trainer._metrics["train"]
            rec.update(reward_mean=_last(m, "reward"), kl=_last(m, "kl"),
                       clip_fraction=_last(m, "clip_ratio/region_mean"), optimizer_steps=steps_per_round)
            state["clock"] += rec["wall"]
            rounds.append(rec)
            print(f"[bench trl] round {r}/{spec.rounds}: {rec['wall']:.2f}s "
                  f"(gen {rec['phase_wall']['generate']:.2f}, logprobs {rec['phase_wall']['logprobs']:.2f}, "
                  f"train {rec['phase_wall']['train']:.2f})", flush=True)
            if r % spec.eval_every == 0 or r == spec.rounds:
                acc = heldout_accuracy(trainer.model, tok, test, spec.eval_max_new_tokens)
                curve.append({"round": r, "wall": state["clock"], "accuracy": acc})
                print(f"[bench trl] held-out accuracy after {r} rounds ({state['clock']:.1f}s): {acc:.3f}",
                      flush=True)
            ph.take()
            self.w, self.c = time.perf_counter(), cpu_seconds()

    load_start = loadavg()
    use_cpu = not torch.cuda.is_available()
    trainer = Timed(model=paths["sft"], reward_funcs=reward_functions(spec)[0], args=trl_args(spec, work, use_cpu),
                    train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    n_params = param_count(trainer.model)
    trainer.train()
    for rec in rounds:
        rec["update_flops"] = update_flops(n_params, rec["prompt_tokens"] + rec["completion_tokens"],
                                           rec["nograd_tokens"])
    result = {"side": "TRL GRPOTrainer", "n_params": n_params, "rounds": rounds, "curve": curve,
              "loadavg_start": load_start, "loadavg_end": loadavg(), "optim": str(trainer.args.optim)}
    write_json(result, out)
    return result


def _last(metrics: dict, key: str) -> float:
    values = metrics.get(key) or [float("nan")]
    return float(values[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--spec", required=True)
    p.add_argument("--paths", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--work", required=True)
    a = p.parse_args()
    run(Spec.from_json(a.spec), json.loads(a.paths), a.out, a.work)


if __name__ == "__main__":
    main()
