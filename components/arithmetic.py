"""The built-in verifiable task: arithmetic problems, and careless demonstrations of them.

:func:`make_arithmetic` draws distinct problems (``What is 37 + 48 * 12?``) with their
answers and worked solutions; :func:`careless_demonstrations` gives the SFT
demonstrations of an annotator who forgets the carry of some sums (the default's SFT
data: the verifier's answers stay correct, so GRPO can learn what SFT could not).
"""

from __future__ import annotations

import random

import pandas as pd

from components.config import ArithmeticConfig
from components.errors import DatasetError
from components.rewards import reference_completion

COLUMNS = ["id", "prompt", "answer", "solution"]


def _eval_steps(operands: list[int], ops: list[str]) -> tuple[int, list[str]]:
    """Evaluate a flat expression with normal precedence; return (value, ["a * b = c", ...])."""
    vals, ops = list(operands), list(ops)
    steps: list[str] = []
    for wanted in (("*",), ("+", "-")):
        i = 0
        while i < len(ops):
            if ops[i] in wanted:
                a, b, op = vals[i], vals[i + 1], ops[i]
                c = a * b if op == "*" else a + b if op == "+" else a - b
                steps.append(f"{a} {op} {b if b >= 0 else f'({b})'} = {c}")
                vals[i:i + 2] = [c]
                del ops[i]
            else:
                i += 1
    return vals[0], steps


class _ArithmeticSpace:
    """All problems the knobs allow, numbered 0..size-1 (mixed-radix decoding)."""

    def __init__(self, cfg: ArithmeticConfig) -> None:
        self.lo, self.hi = cfg.min_operand, cfg.max_operand
        self.k = cfg.num_operations
        self.ops = list(dict.fromkeys(cfg.operators))  # unique, order kept
        self.radix = self.hi - self.lo + 1
        # One pair of parentheses around operands i..j (a proper sub-expression of at
        # least two operands) or none. With one operation there is nothing to group.
        self.spans: list[tuple[int, int] | None] = [None]
        if cfg.parentheses:
            self.spans += [(i, j) for i in range(self.k + 1) for j in range(i + 1, self.k + 1)
                           if (i, j) != (0, self.k)]
        self.size = len(self.spans) * len(self.ops) ** self.k * self.radix ** (self.k + 1)

    def describe(self) -> str:
        return (f"operands {self.lo}..{self.hi}, {self.k} operation(s) from {self.ops}, "
                f"parentheses {'on' if len(self.spans) > 1 else 'off'}")

    def decode(self, index: int) -> tuple[str, str, str, list[int], list[str]]:
        """(prompt, answer, solution, operands, operators) of problem number `index`."""
        index, s = divmod(index, len(self.spans))
        span = self.spans[s]
        ops = []
        for _ in range(self.k):
            index, o = divmod(index, len(self.ops))
            ops.append(self.ops[o])
        operands = []
        for _ in range(self.k + 1):
            index, v = divmod(index, self.radix)
            operands.append(self.lo + v)
        terms = [str(v) for v in operands]
        steps: list[str] = []
        vals, flat_ops = operands, ops
        if span is not None:
            i, j = span
            terms[i], terms[j] = "(" + terms[i], terms[j] + ")"
            inner, steps = _eval_steps(operands[i:j + 1], ops[i:j])
            vals = operands[:i] + [inner] + operands[j + 1:]
            flat_ops = ops[:i] + ops[j:]
        value, more = _eval_steps(vals, flat_ops)
        expr = terms[0] + "".join(f" {op} {t}" for op, t in zip(ops, terms[1:]))
        return f"What is {expr}?", str(value), "\n".join(steps + more), operands, ops


def dropped_carry_sum(a: int, b: int) -> int:
    """a + b as a careless hand adds it: each digit column summed mod 10, every carry forgotten.

    ``37 + 48 → 75`` (not 85), ``45 + 5 → 40``, ``25 + 75 → 90``; equal to a + b when no
    column carries. Non-negative operands only.
    """
    if a < 0 or b < 0:
        raise ValueError(f"dropped_carry_sum needs non-negative operands, got {a} and {b}")
    total, place = 0, 1
    while a or b:
        total += ((a % 10 + b % 10) % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return total


def careless_demonstrations(operands: list[list[int]], operators: list[list[str]], rate: float,
                            seed: int) -> list[str | None]:
    """SFT demonstrations from a careless annotator: for each single-addition problem whose sum
    carries, with probability `rate` the demonstration gives the sum with the carry dropped
    (``<answer>75</answer>`` for 37 + 48); None elsewhere (the SFT stage then imitates the
    correct reference completion). The verifier's answers are not touched."""
    rng = random.Random(seed)
    out: list[str | None] = []
    for nums, ops in zip(operands, operators):
        careless = None
        if ops == ["+"] and dropped_carry_sum(*nums) != sum(nums) and rng.random() < rate:
            careless = reference_completion(str(dropped_carry_sum(*nums)))
        out.append(careless)
    return out


def make_arithmetic(cfg: ArithmeticConfig, n: int, seed: int,
                    exclude: set[str] | None = None, demonstrations: bool = False) -> pd.DataFrame:
    """`n` distinct seeded arithmetic problems as a prompt table.

    Each problem has ``num_operations`` operators drawn from ``operators`` and
    operands uniform in ``[min_operand, max_operand]``; with ``parentheses`` a problem
    may group a proper sub-expression of two or more operands in one pair of
    parentheses. Problems are drawn uniformly from all distinct problems the knobs
    allow. The prompt reads ``What is 37 + 48 * 12?``; the answer uses normal precedence
    (``*`` before ``+``/``-``, left to right); the solution lists one operation per
    line (``48 * 12 = 576``). Deterministic for a seed; prompts in `exclude` are
    avoided. Ids are ``arith-<seed>-<i>``. With `demonstrations` and
    ``cfg.careless_demonstrations > 0`` the table has a ``demonstration`` column
    (:func:`careless_demonstrations`): what SFT imitates instead of the correct answer.

    Raises DatasetError when fewer than `n` distinct problems are available.
    """
    if n < 0:
        raise DatasetError(f"arithmetic task: n must be >= 0, got {n}")
    exclude = exclude or set()
    space = _ArithmeticSpace(cfg)
    if n > space.size:
        raise DatasetError(
            f"arithmetic task: asked for {n} distinct problems but the knobs allow only "
            f"{space.size} ({space.describe()}); widen the operand range or add operations")
    rng = random.Random(seed)
    rows: list[tuple[str, str, str, list[int], list[str]]] = []
    if (n + len(exclude)) * 2 >= space.size:
        # Dense: enumerate every problem in a seeded order (size is small here).
        order = list(range(space.size))
        rng.shuffle(order)
        for index in order:
            if len(rows) == n:
                break
            row = space.decode(index)
            if row[0] not in exclude:
                rows.append(row)
        if len(rows) < n:
            raise DatasetError(
                f"arithmetic task: asked for {n} distinct problems but only {len(rows)} of the "
                f"{space.size} the knobs allow ({space.describe()}) remain after excluding "
                f"{len(exclude)} prompts (e.g. the train split); widen the operand range or add operations")
    else:
        # Sparse: rejection sampling; every draw succeeds with probability >= 1/2.
        seen: set[int] = set()
        while len(rows) < n:
            index = rng.randrange(space.size)
            if index in seen:
                continue
            seen.add(index)
            row = space.decode(index)
            if row[0] not in exclude:
                rows.append(row)
    table = pd.DataFrame({
        "id": [f"arith-{seed}-{i}" for i in range(len(rows))],
        "prompt": [r[0] for r in rows],
        "answer": [r[1] for r in rows],
        "solution": pd.Series([r[2] for r in rows], dtype=object),
    }, columns=COLUMNS)
    if demonstrations and cfg.careless_demonstrations > 0:
        table["demonstration"] = pd.Series(careless_demonstrations(
            [r[3] for r in rows], [r[4] for r in rows], cfg.careless_demonstrations, seed), dtype=object)
    return table
