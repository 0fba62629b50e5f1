"""Stage: held-out evaluation — greedy pass@1 and format compliance, and maj@k when configured."""

from __future__ import annotations

from collections import Counter

import pandas as pd

from components import tracking
from components.config import Config
from components.generation import make_backend
from components.sampling import Sampling
from components.io import distinct_outputs, read_parquet, write_json, write_parquet
from components.modeling import chat_prompt
from components.stage_cli import stage_main
from components.errors import DatasetError
from components.rewards import extract_answer, format_reward, is_correct, normalize_number


def majority(answers: list[str | None]) -> str | None:
    """Most common extracted answer (ties: the first seen); None if none parsed."""
    votes = Counter(a for a in answers if a is not None)
    return max(votes, key=lambda a: (votes[a], -answers.index(a))) if votes else None


def run(cfg: Config, test: str, policy: str, out: str | None = None,
        samples: str | None = None, step: int = 0) -> dict:
    """Greedy accuracy of the model directory `policy` on the held-out prompts `test`.

    Writes the metrics as JSON to `out` and the greedy completions to `samples` (Parquet), when given.
    """
    distinct_outputs(out=out, samples=samples)
    rows = read_parquet(test, "held-out prompts", ["prompt", "answer"])
    unparsable = [i for i, a in enumerate(rows.answer) if normalize_number(str(a)) is None]
    if unparsable:  # the verifier compares numbers: such a row would count as wrong, and the gate would run on it
        i = unparsable[0]
        raise DatasetError(f"held-out prompts {test}: answer is not a number in {len(unparsable)} of {len(rows)} "
                           f"row(s), first at row {i}: {str(rows.answer.iloc[i])[:40]!r}")
    if rows.empty:
        raise ValueError(f"held-out prompts {test} are empty")
    ec = cfg.evaluation
    backend = make_backend(cfg.rollout.backend, policy, cfg.model, cfg.rollout)
    texts = [chat_prompt(backend.tok, p, cfg.data.system_prompt) for p in rows.prompt]
    greedy = backend.generate(texts, Sampling(n=1, temperatures=[0.0], max_new_tokens=ec.max_new_tokens,
                                              greedy=True, seed=cfg.seed))
    greedy.sort(key=lambda g: g.prompt_index)
    correct = [is_correct(g.text, a) for g, a in zip(greedy, rows.answer)]
    well_formed = [format_reward(g.text) == 1.0 for g in greedy]  # exactly (<think>…</think>)?<answer>N</answer>
    metrics = {"eval/accuracy": sum(correct) / len(correct), "eval/format": sum(well_formed) / len(well_formed),
               "eval/num_prompts": len(correct)}
    if ec.maj_k > 0:
        drawn = backend.generate(texts, Sampling(n=ec.maj_k, temperatures=[ec.maj_temperature] * ec.maj_k,
                                                 max_new_tokens=ec.max_new_tokens, seed=cfg.seed))
        by_prompt: dict[int, list[str | None]] = {}
        for g in sorted(drawn, key=lambda g: (g.prompt_index, g.sample_index)):
            by_prompt.setdefault(g.prompt_index, []).append(extract_answer(g.text))
        maj = [majority(by_prompt[i]) == normalize_number(a) for i, a in enumerate(rows.answer)]
        metrics[f"eval/maj@{ec.maj_k}"] = sum(maj) / len(maj)
    tracking.log_metrics(metrics, step=step)
    print(f"[evaluate] {policy}: accuracy {metrics['eval/accuracy']:.3f}, format {metrics['eval/format']:.3f} "
          f"on {len(correct)} held-out prompts", flush=True)
    if samples:
        write_parquet(pd.DataFrame({"prompt": rows.prompt, "answer": rows.answer,
                                    "completion": [g.text for g in greedy], "correct": correct}), samples)
    if out:
        write_json(metrics, out)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main(run, "Greedy pass@1 (and maj@k) on the held-out split.", {
        "test": "Parquet of held-out prompts", "policy": "policy directory",
        "out": "output: the metrics as JSON", "samples": "output: the greedy completions (Parquet)",
        "step": "where the metrics go in MLflow (the iteration)"}, argv)


if __name__ == "__main__":
    raise SystemExit(main())
