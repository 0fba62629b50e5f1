"""Stage: train the scalar reward model r_φ (Bradley–Terry pairs or pointwise BCE).

The reward model is `AutoModelForSequenceClassification(num_labels=1)` on the SFT
policy's backbone. Its data is one table of labelled completions (prompt_id, prompt,
completion, label); pairs are built from correct (label 1) vs incorrect (label 0)
completions of the same prompt.
"""

from __future__ import annotations

import random
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from components import tracking
from components.config import Config
from components.io import distinct_outputs, read_parquet, write_parquet
from components.modeling import (DTYPES, ModelLoadError, _damaged, _load_errors, batched, default_device, load_tokenizer,
                                 save_model)
from components.stage_cli import stage_main
from components.rewards import is_correct, reference_completion, step_labels, wrong_answer
from components.training import train_steps

RM_COLUMNS = ["prompt_id", "prompt", "completion", "label", "origin"]


def synthetic_rm_data(prompts: pd.DataFrame, negatives: int, seed: int) -> pd.DataFrame:
    """For each prompt: its correct reference answer (label 1) and wrong answers (label 0)."""
    rng = random.Random(seed)
    rows = []
    for r in prompts.itertuples(index=False):
        rows.append((r.id, r.prompt, reference_completion(r.answer), 1.0, "synthetic"))
        for _ in range(negatives):
            rows.append((r.id, r.prompt, reference_completion(wrong_answer(r.answer, rng)), 0.0, "synthetic"))
    return pd.DataFrame(rows, columns=RM_COLUMNS)


def policy_rm_data(cfg: Config, prompts: pd.DataFrame, policy: str) -> pd.DataFrame:
    """`reward_model.policy_samples` completions per prompt sampled from the model directory `policy`
    (as a rollout samples them), labelled by the task's verifier: the mistakes the policy itself makes,
    not only synthetic wrong numbers."""
    from components.generation import make_backend
    from components.modeling import chat_prompt
    from components.sampling import Sampling, group_temperatures

    rc, n = cfg.rollout, cfg.reward_model.policy_samples
    backend = make_backend("hf", policy, cfg.model, rc)
    texts = [chat_prompt(backend.tok, p, cfg.data.system_prompt) for p in prompts.prompt]
    gens = backend.generate(texts, Sampling(n=n, temperatures=group_temperatures(n, rc.temperature,
                            rc.temperature_range), max_new_tokens=rc.max_new_tokens, top_p=rc.top_p, seed=cfg.seed))
    rows = prompts.iloc[[g.prompt_index for g in gens]].reset_index(drop=True)
    data = pd.DataFrame({"prompt_id": rows.id.astype(str), "prompt": rows.prompt, "completion": [g.text for g in gens],
                         "label": [float(is_correct(g.text, a)) for g, a in zip(gens, rows.answer)],
                         "origin": "policy"})
    return data.drop_duplicates(["prompt_id", "completion"]).reset_index(drop=True)


def step_prefixes(data: pd.DataFrame) -> pd.DataFrame:
    """The process reward model's rows: each labelled completion cut at the end of each of its steps
    (`rewards.step_labels`), the prefix labelled with the verifier's verdict on its last step; the whole
    completion (its last prefix) keeps the completion's own label (the final answer's verdict). Duplicate
    prefixes of one prompt are kept once."""
    rows = []
    for r in data.itertuples(index=False):
        for (_, end), label in step_labels(r.completion, ""):
            rows.append((r.prompt_id, r.prompt, r.completion[:end], float(r.label) if end == len(r.completion)
                         else label, r.origin))
    out = pd.DataFrame(rows, columns=RM_COLUMNS)
    return out.drop_duplicates(["prompt_id", "completion"]).reset_index(drop=True)


def step_metrics(rm, tok, data: pd.DataFrame, max_length: int) -> dict[str, float]:
    """How well r_φ scores the steps of `data`'s completions (`step_prefixes`), against the verifier's step
    labels: `step_accuracy` (score > 0 exactly on the steps judged right), `step_auc` (over every pair of a
    right and a wrong step, the fraction where the right one scores higher; ties half) and `steps`."""
    steps = step_prefixes(data)
    if steps.empty:
        return {"step_accuracy": float("nan"), "step_auc": float("nan"), "steps": 0}
    rm.eval()
    s = score(rm, tok, steps.prompt.tolist(), steps.completion.tolist(), max_length).cpu().numpy()
    y = steps.label.to_numpy() > 0.5
    auc, _ = ranking_agreement(s, y, np.zeros(len(s)))  # every (right, wrong) pair, as one group
    return {"step_accuracy": float(((s > 0) == y).mean()), "step_auc": auc, "steps": len(steps)}


def make_pairs(data: pd.DataFrame, seed: int, max_per_prompt: int = 4) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) from label-1 vs label-0 completions of one prompt."""
    rng = random.Random(seed)
    pairs = []
    for _, g in data.groupby("prompt_id", sort=False):
        good = g.completion[g.label > 0.5].tolist()
        bad = g.completion[g.label <= 0.5].tolist()
        combos = [(c, r) for c in dict.fromkeys(good) for r in dict.fromkeys(bad)]
        for c, r in rng.sample(combos, min(max_per_prompt, len(combos))):
            pairs.append((g.prompt.iloc[0], c, r))
    return pairs


def rm_text(tok, prompt: str, completion: str, system_prompt: str | None = None) -> str:
    """The conversation the reward model scores: user problem + assistant completion."""
    msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return tok.apply_chat_template(msgs, tokenize=False)


def score(rm, tok, prompts: list[str], completions: list[str], max_length: int = 512,
          system_prompt: str | None = None, batch_size: int = 128, grad: bool = False) -> torch.Tensor:
    """r_φ(q, o) for each (prompt, completion): a 1-D float tensor."""
    texts = [rm_text(tok, p, c, system_prompt) for p, c in zip(prompts, completions)]
    tok.padding_side = "right"
    out = []
    with torch.set_grad_enabled(grad):
        for sl in batched(len(texts), batch_size):
            enc = tok(texts[sl], return_tensors="pt", padding=True, truncation=True,
                      max_length=max_length, add_special_tokens=False)
            out.append(rm(**{k: v.to(rm.device) for k, v in enc.items()}).logits[:, 0].float())
    tok.padding_side = "left"
    return torch.cat(out) if out else torch.zeros(0)


def pairwise_accuracy(rm, tok, pairs: list[tuple[str, str, str]], max_length: int) -> float:
    """Fraction of pairs where r(chosen) > r(rejected); NaN when there are no pairs."""
    if not pairs:
        return float("nan")
    rm.eval()
    p, c, r = zip(*pairs)
    return float((score(rm, tok, list(p), list(c), max_length) > score(rm, tok, list(p), list(r), max_length))
                 .float().mean())


def ranking_agreement(scores, correct, groups) -> tuple[float, int]:
    """How often r_φ agrees with the verifier: over the pairs (correct, incorrect) of completions of
    one group (prompt), the fraction where the correct one scores higher (ties count half); and the
    number of pairs (NaN, 0 when no group has both)."""
    df = pd.DataFrame({"s": np.asarray(scores, dtype=float), "c": np.asarray(correct, dtype=bool), "g": groups})
    agree, n = 0.0, 0
    for _, g in df.groupby("g", sort=False):
        good, bad = g.s[g.c].to_numpy(), g.s[~g.c].to_numpy()
        diff = good[:, None] - bad[None, :]
        agree += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
        n += diff.size
    return (agree / n if n else float("nan")), n


def check_process(rm, path: str) -> None:
    """ValueError unless the reward model at `path` was trained as a process reward model (`objective: process`,
    recorded in its config.json): an outcome RM's scores of step prefixes would be meaningless step rewards."""
    objective = getattr(rm.config, "kfp_grpo_objective", None)
    if objective != "process":
        raise ValueError(f"reward model {path} is not a process reward model (trained with objective "
                         f"{objective or 'pairwise/pointwise, before objectives were recorded'}), but process "
                         "supervision with a reward-model term scores every step with it; train one with "
                         "reward_model.objective process (a run that starts from a registered reward model uses "
                         "that one), or set reward.kind verifier")


PAIRWISE, POINTWISE = ("pairwise", "pairwise+pointwise"), ("pointwise", "pairwise+pointwise", "process")


def fit(rm, tok, data: pd.DataFrame, cfg: Config, steps: int, lr: float, batch_size: int, name: str) -> list[float]:
    """Train r_φ on labelled completions with the configured objective (`reward_model.objective`): the
    Bradley–Terry loss on (correct, incorrect) pairs of a prompt, BCE on each completion's verdict, their
    sum (`pairwise+pointwise`, a batch of each per step), or BCE on every step's prefix (`process`)."""
    rng = random.Random(cfg.seed)
    max_len, objective = cfg.reward_model.max_length, cfg.reward_model.objective
    pairs, rows = [], []
    if objective in PAIRWISE:
        pairs = make_pairs(data, cfg.seed)
        if not pairs:
            raise ValueError(f"{name}: no (correct, incorrect) pair for any prompt; cannot train pairwise")
    if objective in POINTWISE:
        table = step_prefixes(data) if objective == "process" else data
        rows = list(table[["prompt", "completion", "label"]].itertuples(index=False, name=None))
        if not rows:
            raise ValueError(f"{name}: no labelled completion to train on")

    def loss_fn(step: int) -> torch.Tensor:
        loss = torch.zeros((), device=rm.device)
        if pairs:
            p, c, r = zip(*rng.sample(pairs, min(batch_size, len(pairs))))
            margin = score(rm, tok, list(p), list(c), max_len, grad=True) - score(rm, tok, list(p), list(r), max_len, grad=True)
            loss = loss - F.logsigmoid(margin).mean()  # Bradley–Terry
        if rows:
            p, c, y = zip(*rng.sample(rows, min(batch_size, len(rows))))
            logits = score(rm, tok, list(p), list(c), max_len, grad=True)
            loss = loss + F.binary_cross_entropy_with_logits(logits, torch.tensor(y, dtype=torch.float32,
                                                                                  device=logits.device))
        return loss

    return train_steps(rm, loss_fn, steps, lr, warmup=min(10, steps // 10), name=name)


def split_by_prompt(data: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, held-out) with whole prompts on one side."""
    ids = sorted(data.prompt_id.unique())
    random.Random(seed).shuffle(ids)
    held = set(ids[: max(1, int(len(ids) * fraction))])
    mask = data.prompt_id.isin(held)
    return data[~mask], data[mask]


def load_backbone(policy_dir: str, cfg: Config):
    """A fresh scalar head on the policy's backbone (no remote code, safetensors)."""
    tok = load_tokenizer(policy_dir, None, cfg.model.trust_remote_code)
    try:
        rm = AutoModelForSequenceClassification.from_pretrained(
            policy_dir, num_labels=1, dtype=DTYPES[cfg.model.dtype],
            trust_remote_code=cfg.model.trust_remote_code, use_safetensors=cfg.model.use_safetensors or None)
    except _load_errors() as err:
        raise ModelLoadError(f"cannot load a reward-model backbone from {policy_dir}: {_damaged(policy_dir, err)}"
                             ) from None
    rm.config.pad_token_id = tok.pad_token_id
    return rm.to(default_device()), tok


def run(cfg: Config, train: str, policy: str, reward_model: str, rm_data: str) -> dict:
    """Build the RM data from the training prompts, train r_φ on the `policy`'s backbone.

    Writes the reward model (HF directory) to `reward_model` and its labelled data (the start
    of the replay history) to `rm_data`; reports its held-out pairwise accuracy.
    """
    distinct_outputs(reward_model=reward_model, rm_data=rm_data)
    prompts = read_parquet(train, "training prompts", ["id", "prompt", "answer"])
    rc = cfg.reward_model
    data = synthetic_rm_data(prompts, rc.negatives_per_prompt, cfg.seed)
    start = time.perf_counter()
    if rc.policy_samples:
        sampled = prompts.sample(n=min(rc.sample_prompts, len(prompts)), random_state=cfg.seed)
        data = pd.concat([data, policy_rm_data(cfg, sampled, policy)], ignore_index=True)
    sample_seconds = time.perf_counter() - start
    train, held = split_by_prompt(data, rc.heldout_fraction, cfg.seed)
    torch.manual_seed(cfg.seed)  # the new score head's initialisation
    rm, tok = load_backbone(policy, cfg)
    start = time.perf_counter()
    losses = fit(rm, tok, train, cfg, rc.steps, rc.lr, rc.batch_size, "reward_model")
    train_seconds = time.perf_counter() - start
    acc = pairwise_accuracy(rm, tok, make_pairs(held, cfg.seed), rc.max_length)
    extra: dict[str, float] = {}
    policy_pairs = make_pairs(held[held.origin == "policy"], cfg.seed)
    acc_policy = pairwise_accuracy(rm, tok, policy_pairs, rc.max_length)
    if rc.objective == "process":  # the PRM's verdicts on the held-out policy samples' steps
        steps = step_metrics(rm, tok, held[held.origin == "policy"], rc.max_length)
        extra.update({"rm/heldout_step_accuracy": steps["step_accuracy"], "rm/heldout_step_auc": steps["step_auc"],
                      "rm/heldout_steps": steps["steps"]})
        print(f"[reward_model] process reward model on {steps['steps']} held-out steps: accuracy "
              f"{steps['step_accuracy']:.3f}, right-above-wrong {steps['step_auc']:.3f}", flush=True)
    print(f"[reward_model] held-out pairwise accuracy {acc:.3f}; on the policy's own samples {acc_policy:.3f} "
          f"({len(policy_pairs)} pairs); sampling {sample_seconds:.0f}s, training {train_seconds:.0f}s", flush=True)
    metrics = {"rm/heldout_accuracy": acc, "rm/heldout_accuracy_policy": acc_policy,
               "rm/heldout_policy_pairs": len(policy_pairs),
               "rm/final_loss": losses[-1] if losses else float("nan"), "rm/examples": len(train),
               "rm/policy_examples": int((train.origin == "policy").sum()),
               "rm/sample_seconds": sample_seconds, "rm/train_seconds": train_seconds, **extra}
    tracking.log_metrics(metrics)
    rm.config.kfp_grpo_objective = rc.objective  # in config.json: what the model's score means (check_process)
    save_model(rm, tok, reward_model)
    write_parquet(data, rm_data)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main(run, "Train the scalar reward model on correct vs incorrect completions.", {
        "train": "Parquet of training prompts", "policy": "the SFT policy directory (the reward model's backbone)",
        "reward_model": "output: the reward model directory",
        "rm_data": "output: Parquet of its labelled data (the start of the replay history)"}, argv)


if __name__ == "__main__":
    raise SystemExit(main())
