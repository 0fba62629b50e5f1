"""Prompt data: the normalised prompt table, loading files and HF data sets, the train/test splits.

The normalised prompt table
---------------------------
Every source of prompts (the built-in arithmetic task, a JSONL/Parquet file, a HF
data set) becomes a pandas DataFrame with these columns:

========== ===============================================================
``id``       str, unique within the table
``prompt``   str, the problem text shown to the user (no chat template)
``answer``   str, the canonical number (:func:`components.rewards.normalize_number`): "85", "-3", "2.5"
``solution`` str or None, worked reasoning for SFT when the data has one
========== ===============================================================

and optionally ``demonstration`` (what SFT imitates instead of the reference completion,
e.g. the careless demonstrations of the built-in task).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.arithmetic import COLUMNS, make_arithmetic
from components.config import DataConfig
from components.errors import DatasetError
from components.rewards import cell_number, normalize_number

# Seed offset of the arithmetic test split: its ids (arith-<seed>-<i>) never equal
# the train split's, and its problems are drawn from a different stream.
TEST_SEED_OFFSET = 1_000_003


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
            answer = cell_number(raw)
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
