"""Stage: the train and test prompt tables.

Reads the data config (built-in arithmetic task, JSONL/Parquet file or HF data set),
validates and normalises it (:mod:`components.data`) and writes two Parquet files
with columns ``id, prompt, answer, solution``. Each file is written atomically; on bad
input nothing is written.

    python -m components.prepare_data --config tiny.yaml --train train.parquet --test test.parquet
"""

from __future__ import annotations

from typing import Any, Sequence

from components import stage_cli, tracking
from components.config import Config
from components.io import distinct_outputs, write_parquet
from components.data import prepare_splits


def run(cfg: Config, train: str, test: str) -> dict[str, Any]:
    """Build the splits of ``cfg.data`` with ``cfg.seed``; write them to the paths `train` / `test`.

    Returns ``{"num_train", "num_test", "source"}``. Raises DatasetError on bad input,
    before any file is written.
    """
    distinct_outputs(train=train, test=test)
    train_rows, test_rows = prepare_splits(cfg.data, cfg.seed)
    write_parquet(train_rows, train)
    write_parquet(test_rows, test)
    tracking.log_dataset(train_rows, "train", train, "training")
    tracking.log_dataset(test_rows, "test", test, "evaluation")
    return {"num_train": len(train_rows), "num_test": len(test_rows), "source": cfg.data.source}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``--config``/``--config-json`` plus the output paths ``--train`` and ``--test``."""
    return stage_cli.stage_main(run, "Write the train/test prompt tables (Parquet).", {
        "train": "output: Parquet file of the train prompts", "test": "output: Parquet file of the held-out prompts"},
        argv)


if __name__ == "__main__":
    raise SystemExit(main())
