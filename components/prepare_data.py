"""Stage: the train and test prompt tables.

Reads the data config (built-in arithmetic task, JSONL/Parquet file or HF data set),
validates and normalises it (:mod:`components.data`) and writes two Parquet files
with columns ``id, prompt, answer, solution``. Each file is written atomically; on bad
input nothing is written.

    python -m components.prepare_data --config tiny.yaml --train-out train.parquet --test-out test.parquet
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

from components import stage_cli
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
    return {"num_train": len(train_rows), "num_test": len(test_rows), "source": cfg.data.source}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``--config``/``--config-json`` plus ``--train-out`` and ``--test-out``."""
    p = stage_cli.parser("prepare_data", "Write the train/test prompt tables (Parquet).")
    p.add_argument("--train-out", required=True, help="Parquet file for the train prompts")
    p.add_argument("--test-out", required=True, help="Parquet file for the test prompts")

    def body(args: argparse.Namespace) -> dict[str, Any]:
        return run(stage_cli.config_from_args(args), args.train_out, args.test_out)

    return stage_cli.main_wrapper(body, p, argv)


if __name__ == "__main__":
    raise SystemExit(main())
