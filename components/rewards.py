"""The reward the policy optimises, and the verifier behind it.

A completion answers in the task's format, ``<answer>N</answer>``, optionally after
``<think>…</think>``. The reward of a completion is

    reward = rm_weight · s(r_φ(prompt, completion)) + correctness_weight · correct + format_weight · format

(`reward.kind`: `rm` drops the correctness term, `verifier` the reward-model term.)

- ``correct`` (:func:`correctness_reward`): 1 when the number in the last ``<answer>`` tag
  equals the reference answer (compared as canonical numbers, :func:`normalize_number`), else 0;
- ``format`` (:func:`format_reward`): 1 for exactly the answer format, 0.5 for an answer tag
  with other text around it, 0 without one;
- ``r_φ``: the reward model's score, s = σ (`reward.rm_squash`) or the identity.

:func:`rewards_for` computes the three parts and their weighted sum for a round's
completions; :func:`split_steps` cuts a completion into reasoning steps (process supervision).
"""

from __future__ import annotations

import math
import random
import re
from decimal import Decimal
from typing import Any

import numpy as np
import pandas as pd

from components.config import Config


# =========================================================================== numbers
_NUMBER_RE = re.compile(r"^([+-])?(\d{1,3}(?:,\d{3})+|\d+)?(?:\.(\d*))?$")


def normalize_number(text: str) -> str | None:
    """Canonical form of a decimal number, or None when `text` is not one.

    Surrounding whitespace is ignored; an optional sign, thousands separators in
    groups of three (``1,234``) and a decimal point are accepted. Leading zeros of the
    integer part and trailing zeros of the fraction are dropped, ``-0`` is ``0``:
    ``"085"→"85"``, ``"1,234"→"1234"``, ``"2.50"→"2.5"``, ``"3.0"→"3"``, ``".5"→"0.5"``.
    Exponents, units and currency signs are not numbers here. Exact (string based):
    no float rounding, any number of digits.
    """
    if not isinstance(text, str):
        return None
    m = _NUMBER_RE.match(text.strip())
    if m is None:
        return None
    sign, int_part, frac = m.group(1), m.group(2) or "", m.group(3) or ""
    if not int_part and not frac:
        return None  # "", "+", "." ...
    int_part = int_part.replace(",", "").lstrip("0") or "0"
    frac = frac.rstrip("0")
    out = int_part + ("." + frac if frac else "")
    if out == "0":
        return "0"
    return ("-" if sign == "-" else "") + out


def cell_number(value: Any) -> str | None:
    """Normalise an answer cell that may be a str, an int or a float (None if not a number)."""
    if value is None or isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return normalize_number(str(int(value)))
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(float(value)):
            return None
        return normalize_number(format(Decimal(repr(float(value))), "f"))
    if isinstance(value, str):
        return normalize_number(value)
    return None


# =========================================================================== verifiers
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANY_ANSWER_RE = re.compile(r"<answer>.*?</answer>", re.DOTALL)
# (<think>…</think>)? <answer>NUMBER</answer>, nothing else but whitespace. The think
# body may not contain another think/answer tag.
_FORMAT_RE = re.compile(
    r"\s*(?:<think>(?:(?!</?think>|</?answer>).)*</think>)?\s*<answer>([^<]*)</answer>\s*",
    re.DOTALL,
)


def extract_answer(completion: str) -> str | None:
    """The normalised number in the last ``<answer>…</answer>`` of `completion`.

    None when there is no answer tag or its content is not a number.
    """
    if not isinstance(completion, str):
        return None
    found = _ANSWER_RE.findall(completion)
    if not found:
        return None
    return normalize_number(found[-1])


def is_correct(completion: str, answer: str) -> bool:
    """True when the completion's extracted answer equals `answer` numerically."""
    got = extract_answer(completion)
    want = normalize_number(answer) if isinstance(answer, str) else cell_number(answer)
    return got is not None and want is not None and got == want


def correctness_reward(completion: str, answer: str) -> float:
    """1.0 for a correct final answer, else 0.0."""
    return 1.0 if is_correct(completion, answer) else 0.0


def format_reward(completion: str) -> float:
    """Score the shape of a completion.

    1.0: the whole completion (modulo surrounding whitespace) is
    ``(<think>…</think>)?\\s*<answer>NUMBER</answer>`` with NUMBER a number
    (:func:`normalize_number`, no padding inside the tags);
    0.5: an ``<answer>…</answer>`` pair is present but with other text around it
    (or a non-number inside); 0.0: no answer tag pair.
    """
    if not isinstance(completion, str):
        return 0.0
    m = _FORMAT_RE.fullmatch(completion)
    if m is not None and m.group(1) == m.group(1).strip() and normalize_number(m.group(1)) is not None:
        return 1.0
    return 0.5 if _ANY_ANSWER_RE.search(completion) else 0.0


def reference_completion(answer: str, solution: str | None = None, with_reasoning: bool = False) -> str:
    """The ideal completion: ``<answer>85</answer>``, or ``<think>solution</think><answer>85</answer>``
    when `with_reasoning` and a non-blank solution is given."""
    norm = normalize_number(answer) if isinstance(answer, str) else cell_number(answer)
    ans = norm if norm is not None else str(answer).strip()
    if with_reasoning and isinstance(solution, str) and solution.strip():
        return f"<think>{solution.strip()}</think><answer>{ans}</answer>"
    return f"<answer>{ans}</answer>"


def wrong_answer(answer: str, rng: random.Random) -> str:
    """A plausible number different from `answer` (for reward-model negatives).

    With probability 0.3 two different adjacent digits are swapped (``85→58``; never
    putting a 0 first), else
    ±1..10 is added to the integer part (``85→79``, ``2.5→4.5``). Always normalised and
    never equal to the normalised `answer`. Raises ValueError when `answer` is not a number.
    """
    norm = normalize_number(answer) if isinstance(answer, str) else cell_number(answer)
    if norm is None:
        raise ValueError(f"wrong_answer: {answer!r} is not a number")
    if rng.random() < 0.3:
        sign = "-" if norm.startswith("-") else ""
        digits = list(norm.lstrip("-"))
        pairs = [i for i in range(len(digits) - 1)  # never move a 0 to the front ("105"→"015")
                 if digits[i].isdigit() and digits[i + 1].isdigit() and digits[i] != digits[i + 1]
                 and not (i == 0 and digits[1] == "0")]
        if pairs:
            i = rng.choice(pairs)
            digits[i], digits[i + 1] = digits[i + 1], digits[i]
            swapped = normalize_number(sign + "".join(digits))
            if swapped is not None and swapped != norm:
                return swapped
    delta = rng.randint(1, 10) * rng.choice((-1, 1))
    out = normalize_number(format(Decimal(norm) + delta, "f"))
    assert out is not None and out != norm
    return out


# =========================================================================== steps
_STEP_END_RE = re.compile(r"\n\s*|[.!?][ \t]+")


def split_steps(completion: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the reasoning steps of a completion.

    Rule: the reasoning region is everything before the last ``<answer>`` tag (the whole
    text when there is none). It is cut after each newline and after each sentence end
    (``.``, ``!`` or ``?`` followed by spaces); the cut falls after the whitespace, so
    ``<think>`` / ``</think>`` stay inside the first / last step. The answer
    (from the last ``<answer>`` to the end) is the final step. Spans are contiguous and
    cover the whole completion; a whitespace-only piece joins the step after it (the
    one before it at the end). An empty completion has no steps.
    """
    n = len(completion)
    if n == 0:
        return []
    ans_start = completion.rfind("<answer>")
    region_end = ans_start if ans_start >= 0 else n
    cuts = {m.end() for m in _STEP_END_RE.finditer(completion, 0, region_end)}
    if 0 < region_end < n:
        cuts.add(region_end)
    bounds = [0] + sorted(c for c in cuts if 0 < c < n) + [n]
    spans: list[tuple[int, int]] = []
    pending = 0  # start of a whitespace-only piece waiting for the next step
    for a, b in zip(bounds, bounds[1:]):
        if not completion[a:b].strip():
            continue
        spans.append((pending, b))
        pending = b
    if not spans:
        return [(0, n)]
    if spans[-1][1] != n:
        spans[-1] = (spans[-1][0], n)
    return spans


_EQUATION_RE = re.compile(r"(-?\d+)\s*([+*-])\s*\(?(-?\d+)\)?\s*=\s*(-?\d+)")


def step_labels(completion: str, answer: str) -> list[tuple[tuple[int, int], float]]:
    """The verifier's verdict on each step of a completion (:func:`split_steps`): (span, 1.0 or 0.0).

    A reasoning step is right when every equation in it (``a op b = c``, ``op`` one of + - *)
    holds and no earlier step was wrong (a step built on a wrong value is wrong too); a step
    without an equation inherits the verdict so far. The answer step (the last one, when the
    completion has an ``<answer>`` tag) is right when the final answer is (:func:`is_correct`).
    """
    spans = split_steps(completion)
    labels: list[tuple[tuple[int, int], float]] = []
    ok = True
    for k, (a, b) in enumerate(spans):
        text = completion[a:b]
        if k == len(spans) - 1 and "<answer>" in text:
            labels.append(((a, b), 1.0 if is_correct(completion, answer) else 0.0))
            break
        for x, op, y, z in _EQUATION_RE.findall(text):
            x, y, z = int(x), int(y), int(z)
            ok = ok and z == (x + y if op == "+" else x - y if op == "-" else x * y)
        labels.append(((a, b), 1.0 if ok else 0.0))
    return labels


# =========================================================================== the weighted reward
def rm_term(scores: np.ndarray, squash: bool) -> np.ndarray:
    """s(r_φ): the reward model's raw scores through σ (numerically stable), or unchanged (`squash` false)."""
    scores = np.asarray(scores, dtype=np.float64)
    return 0.5 * (1 + np.tanh(scores / 2)) if squash else scores


def rewards_for(cfg: Config, completions: list[str], answers: list[str],
                rm_scores: np.ndarray | None = None) -> pd.DataFrame:
    """Reward parts (`reward_rm`, `reward_correct`, `reward_format`) and their weighted sum
    (`reward`) per completion; `rm_scores`: the reward model's raw scores r_φ (none: 0). Raises
    naming the first row if any reward is NaN/inf."""
    w = cfg.reward
    rm_w, correct_w, format_w = w.weights()
    parts = pd.DataFrame({
        "reward_correct": [correctness_reward(c, a) for c, a in zip(completions, answers)],
        "reward_format": [format_reward(c) for c in completions],
    })
    parts["reward_rm"] = 0.0
    if rm_scores is not None:
        parts["reward_rm"] = rm_term(rm_scores, w.rm_squash)
    parts["reward"] = rm_w * parts.reward_rm + correct_w * parts.reward_correct + format_w * parts.reward_format
    bad = np.flatnonzero(~np.isfinite(parts.reward.to_numpy()))
    if len(bad):
        raise ValueError(f"reward is NaN/inf for {len(bad)} completion(s), first at row {bad[0]} "
                         f"(reward model score {parts.reward_rm.iloc[bad[0]]})")
    return parts
