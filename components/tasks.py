"""Built-in verifiable tasks, prompt-data loading and the answer verifiers.

The normalised prompt table
---------------------------
Every source of prompts (the built-in arithmetic task, a JSONL/Parquet file, a HF
data set) becomes a pandas DataFrame with exactly these columns:

========== ===============================================================
``id``       str, unique within the table
``prompt``   str, the problem text shown to the user (no chat template)
``answer``   str, the canonical number (:func:`normalize_number`): "85", "-3", "2.5"
``solution`` str or None, worked reasoning for SFT when the data has one
========== ===============================================================

The answer format
-----------------
A completion ends with ``<answer>N</answer>``, optionally preceded by
``<think>…</think>``. :func:`extract_answer` reads the last ``<answer>`` tag,
:func:`is_correct` / :func:`correctness_reward` compare it numerically with the
reference, :func:`format_reward` scores the shape, and :func:`split_steps` cuts a
completion into reasoning steps for process supervision.
"""

from __future__ import annotations

import json
import math
import random
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.config import ArithmeticConfig, DataConfig

COLUMNS = ["id", "prompt", "answer", "solution"]

# Seed offset of the arithmetic test split: its ids (arith-<seed>-<i>) never equal
# the train split's, and its problems are drawn from a different stream.
TEST_SEED_OFFSET = 1_000_003


class DatasetError(ValueError):
    """Prompt data is missing or malformed; the message is one line naming the file and row."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


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


def _cell_number(value: Any) -> str | None:
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
    want = normalize_number(answer) if isinstance(answer, str) else _cell_number(answer)
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
    norm = normalize_number(answer) if isinstance(answer, str) else _cell_number(answer)
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
    norm = normalize_number(answer) if isinstance(answer, str) else _cell_number(answer)
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


# =========================================================================== arithmetic
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


# =========================================================================== loading
_GSM8K_CALC_RE = re.compile(r"<<[^<>]*>>")
_JSONL_EXT = (".jsonl", ".ndjson", ".json")
_PARQUET_EXT = (".parquet", ".pq")


def _is_missing(value: Any) -> bool:
    """None, pandas NA or a float NaN (what pandas puts in an absent cell)."""
    return value is None or value is pd.NA or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _read_jsonl(path: Path) -> pd.DataFrame:
    """Parse JSON Lines (or a JSON array for .json) with errors naming the row and line."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"{path}: cannot read file: {err}") from None
    records: list[dict] = []
    if path.suffix == ".json" and raw.lstrip()[:1] == b"[":
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise DatasetError(f"{path}: not valid UTF-8 (byte {err.start})") from None
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}: not valid JSON: {err}") from None
        for row, rec in enumerate(data):
            if not isinstance(rec, dict):
                raise DatasetError(f"{path}: row {row}: expected a JSON object, got {type(rec).__name__}")
        return pd.DataFrame(data)
    row = 0
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DatasetError(
                f"{path}: row {row} (line {lineno}): not valid UTF-8 (byte {err.start} of the line)") from None
        if not text.strip():
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}: row {row} (line {lineno}): not valid JSON: {err.msg}") from None
        if not isinstance(rec, dict):
            raise DatasetError(
                f"{path}: row {row} (line {lineno}): expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
        row += 1
    return pd.DataFrame(records)


def _read_file(path: str) -> pd.DataFrame:
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"data file not found: {path}")
    if p.is_dir():
        raise DatasetError(f"{path}: is a directory, not a JSONL/Parquet file (use source: hf for data set dirs)")
    name = p.name.lower()
    if name.endswith(_JSONL_EXT):
        return _read_jsonl(p)
    if name.endswith(_PARQUET_EXT):
        try:
            return pd.read_parquet(p)
        except Exception as err:  # pyarrow raises several types for corrupt files
            raise DatasetError(f"{path}: not a readable Parquet file: {type(err).__name__}: {err}") from None
    raise DatasetError(f"{path}: unsupported file type; use .jsonl (JSON Lines) or .parquet")


def _is_saved_to_disk(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file())


def _read_hf(path: str, split: str, hf_config: str | None) -> pd.DataFrame:
    import datasets  # heavy import: only when a HF data set is asked for

    try:
        if _is_saved_to_disk(path):
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DatasetError(f"{path}: no split '{split}'; splits are {sorted(ds)}")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(path, hf_config, split=split)
    except DatasetError:
        raise
    except Exception as err:  # hub/network/builder errors come in many types
        raise DatasetError(
            f"{path}: cannot load HF data set (config {hf_config!r}, split '{split}'): "
            f"{type(err).__name__}: {err}") from None
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict, datasets.IterableDataset)):
        raise DatasetError(f"{path}: expected one split of a data set, got {type(ds).__name__}")
    return ds.to_pandas()


def _fail(name: str, bad: list[tuple[int, str]], total: int) -> None:
    if bad:
        row, msg = bad[0]
        more = f" ({len(bad)} of {total} rows are bad)" if len(bad) > 1 else f" (1 of {total} rows is bad)"
        raise DatasetError(f"{name}: row {row}: {msg}{more}")


def normalize_table(df: pd.DataFrame, name: str, layout: str = "plain", stem: str | None = None) -> pd.DataFrame:
    """Validate a raw table and turn it into the normalised prompt table.

    `name` (file or data set) and the 0-based row appear in every error message.
    """
    if layout not in ("plain", "gsm8k"):
        raise DatasetError(f"{name}: unknown layout '{layout}'; layouts are 'plain' and 'gsm8k'")
    if len(df) == 0:
        raise DatasetError(f"{name}: contains no rows")
    prompt_col = "question" if layout == "gsm8k" else "prompt"
    missing = [c for c in (prompt_col, "answer") if c not in df.columns]
    if missing:
        raise DatasetError(f"{name}: missing required column(s) {missing} for layout '{layout}'; "
                           f"found columns {[str(c) for c in df.columns]}")
    stem = stem or Path(name).stem
    has_id = "id" in df.columns
    has_solution = layout == "plain" and "solution" in df.columns
    ids, prompts, answers, solutions = [], [], [], []
    bad: list[tuple[int, str]] = []
    for row, rec in enumerate(df.to_dict("records")):
        prompt = rec[prompt_col]
        if _is_missing(prompt) or (isinstance(prompt, str) and not prompt.strip()):
            bad.append((row, f"{prompt_col} is empty"))
            continue
        if not isinstance(prompt, str):
            bad.append((row, f"{prompt_col} must be text, got {type(prompt).__name__}"))
            continue
        raw = rec["answer"]
        solution: str | None = None
        if layout == "gsm8k":
            if not isinstance(raw, str) or "####" not in raw:
                bad.append((row, f"GSM8K answer has no '#### N' final answer: {str(raw)[-60:]!r}"))
                continue
            before, _, final = raw.rpartition("####")
            answer = normalize_number(final)
            if answer is None:
                bad.append((row, f"answer after '####' is not a number: {final.strip()[:40]!r}"))
                continue
            solution = _GSM8K_CALC_RE.sub("", before).strip() or None
        else:
            answer = _cell_number(raw)
            if answer is None:
                bad.append((row, f"answer is not a number: {str(raw)[:40]!r}"))
                continue
            if has_solution and isinstance(rec["solution"], str) and rec["solution"].strip():
                solution = rec["solution"].strip()
        rid = rec["id"] if has_id else None
        if _is_missing(rid):
            rid = f"{stem}-{row}"
        elif isinstance(rid, (int, np.integer)):
            rid = str(int(rid))
        else:
            rid = str(rid)
        ids.append((row, rid))
        prompts.append(prompt.strip())
        answers.append(answer)
        solutions.append(solution)
    _fail(name, bad, len(df))
    first: dict[str, int] = {}
    for row, rid in ids:
        if rid in first:
            bad.append((row, f"duplicate id {rid!r} (first at row {first[rid]})"))
        else:
            first[rid] = row
    _fail(name, bad, len(df))
    return pd.DataFrame({
        "id": [rid for _, rid in ids],
        "prompt": prompts,
        "answer": answers,
        "solution": pd.Series(solutions, dtype=object),
    }, columns=COLUMNS)


def load_prompts(path: str, layout: str = "plain", source: str = "file", split: str = "train",
                 hf_config: str | None = None) -> pd.DataFrame:
    """Load and validate prompt data as a normalised prompt table.

    source "file": JSONL (``.jsonl``/``.ndjson``/``.json``) or Parquet (``.parquet``/``.pq``)
    by extension. source "hf": a directory written by ``save_to_disk`` (a
    ``DatasetDict`` is indexed by `split`), else ``datasets.load_dataset(path,
    hf_config, split=split)`` (a hub name, or a local directory of data files).

    layout "plain": columns ``prompt``, ``answer`` (optional ``id``, ``solution``);
    layout "gsm8k": ``question``, ``answer`` whose text ends with ``#### N``; the
    solution is the text before ``####`` without the ``<<…>>`` calculator annotations.
    Missing ids become ``<stem>-<row>`` (stem: the file name without extension; for HF
    the last path component and the split, e.g. ``gsm8k-train-7``).

    Raises DatasetError (one line naming the file and the first bad 0-based row, with
    the count of bad rows) for a missing/unreadable/non-UTF-8/empty input, missing
    columns, a blank prompt, a non-number answer, a GSM8K answer without ``####``, or
    duplicate ids.
    """
    if source == "file":
        df, name, stem = _read_file(path), path, Path(path).stem
    elif source == "hf":
        df = _read_hf(path, split, hf_config)
        name = f"{path} [split {split}]"
        stem = f"{Path(path.rstrip('/')).name or 'hf'}-{split}"
    else:
        raise DatasetError(f"{path}: unknown source '{source}'; sources are 'file' and 'hf'")
    return normalize_table(df, name, layout, stem)


# =========================================================================== splits
def _cap(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    if len(df) > n:
        df = df.sample(n=n, random_state=seed % 2**32)
    return df.reset_index(drop=True)


def prepare_splits(cfg: DataConfig, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The (train, test) prompt tables of a data config.

    arithmetic: ``make_arithmetic`` for train (`seed`, with the configured careless
    demonstrations) and test (``seed + TEST_SEED_OFFSET``, excluding the train prompts). file: `path`, and `test_path`
    when given, else the last ``num_test`` rows of a seeded shuffle of `path` are the
    test split. hf: the ``hf_train_split`` / ``hf_test_split`` splits of `path`.
    Tables larger than ``num_train`` / ``num_test`` are cut to a seeded sample. Test
    rows whose prompt also appears in train are dropped; DatasetError when none is left.
    """
    if cfg.source == "arithmetic":
        train = make_arithmetic(cfg.arithmetic, cfg.num_train, seed, demonstrations=True)
        test = make_arithmetic(cfg.arithmetic, cfg.num_test, seed + TEST_SEED_OFFSET,
                               exclude=set(train["prompt"]))
        return train, test
    assert cfg.path is not None  # DataConfig guarantees it
    if cfg.source == "file":
        full = load_prompts(cfg.path, cfg.layout, "file")
        if cfg.test_path:
            train, test = full, load_prompts(cfg.test_path, cfg.layout, "file")
            test_name = cfg.test_path
        else:
            if len(full) <= cfg.num_test:
                raise DatasetError(
                    f"{cfg.path}: has {len(full)} rows, too few to split num_test={cfg.num_test} test rows off "
                    f"and keep some for training; lower data.num_test or give data.test_path")
            shuffled = full.sample(frac=1.0, random_state=seed % 2**32).reset_index(drop=True)
            train, test = shuffled.iloc[:-cfg.num_test], shuffled.iloc[-cfg.num_test:]
            test_name = f"{cfg.path} (held-out rows)"
    else:
        train = load_prompts(cfg.path, cfg.layout, "hf", cfg.hf_train_split, cfg.hf_config)
        test = load_prompts(cfg.path, cfg.layout, "hf", cfg.hf_test_split, cfg.hf_config)
        test_name = f"{cfg.path} [split {cfg.hf_test_split}]"
    train = _cap(train, cfg.num_train, seed)
    seen = set(train["prompt"])
    kept = test[~test["prompt"].isin(seen)]
    if len(kept) == 0:
        raise DatasetError(f"{test_name}: all {len(test)} test prompts also appear in the train split; "
                           f"the test split would be empty")
    return train, _cap(kept, cfg.num_test, seed + 1)
