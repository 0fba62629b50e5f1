"""Artifact I/O: every artifact a stage writes is complete or absent, and replaces only its own kind.

Write into a temporary sibling, then rename into place. A stage killed half-way
leaves the previous artifact (or nothing) and a ``.tmp-*`` sibling that the next
attempt removes. An output path may replace only what this project wrote there before:
a directory holding the ``.kfp-grpo`` marker (written into every directory artifact), a
Parquet file with kfp-grpo's schema metadata, or a JSON object with a ``kfp_grpo`` key;
anything else there (a user's directory or file) is refused with `OutputPathError`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

import pandas as pd

TMP_MARK = ".tmp-"
MARKER = ".kfp-grpo"  # in every directory artifact: this project may replace the directory later
PARQUET_KEY = b"kfp_grpo"  # in the schema metadata of every Parquet file this project writes
# a compiled pipeline: KFP's header, and kfp-grpo's description (pipelines/pipeline.py)
PIPELINE_HEAD, PIPELINE_MARK = b"# PIPELINE DEFINITION", b"# Description: Iterative GRPO"


class OutputPathError(ValueError):
    """An output path holds something this project did not write (or names another output)."""


def _ours(path: Path) -> bool:
    """True when `path` is absent, an empty directory, or an artifact this project wrote."""
    if not path.exists() and not path.is_symlink():
        return True
    if path.is_symlink():
        return False
    if path.is_dir():
        return (path / MARKER).is_file() or not any(path.iterdir())
    if path.stat().st_size == 0:
        return True
    try:
        head = path.read_bytes()[:4096]
        if head.startswith(PIPELINE_HEAD) and PIPELINE_MARK in head:  # a pipeline `kfp-grpo compile` wrote
            return True
        if head[:4] == b"PAR1":
            import pyarrow.parquet as pq

            return PARQUET_KEY in (pq.read_schema(path).metadata or {})
        obj = json.loads(path.read_text(encoding="utf-8"))
        return isinstance(obj, dict) and "kfp_grpo" in obj
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def check_output(final: str | Path) -> None:
    """Refuse (OutputPathError) to write where something that is not ours already is."""
    final = Path(final)
    if not _ours(final):
        what = "directory" if final.is_dir() and not final.is_symlink() else "file"
        raise OutputPathError(f"output path {final} is an existing {what} that kfp-grpo did not write; "
                              "refusing to replace it (choose a new path, or remove it yourself)")


def make_dirs(path: str | Path, what: str = "output directory") -> Path:
    """Create directory `path` (and its parents); OutputPathError naming the culprit when a component of
    it is a file or it cannot be created (permissions, a read-only filesystem)."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise OutputPathError(f"{what} {path}: {p} is a file, not a directory" if p != path else
                                      f"{what} {path} is a file, not a directory")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputPathError(f"{what} {path} cannot be created: {err.strerror or err}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {path} is not writable")
    return path


def claim_dir(path: str | Path, what: str = "--workdir", layout: Sequence[str] = ()) -> Path:
    """Make `path` a directory of this project's: absent (created), empty, marked with `MARKER`, or
    holding only entries of `layout` (one an earlier version wrote); OutputPathError for anything else
    (a user's directory), before anything is written into it."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        entries = {p.name for p in path.iterdir()}
        if entries and MARKER not in entries and not entries <= set(layout):
            raise OutputPathError(f"{what} {path} is an existing directory that kfp-grpo did not create "
                                  f"(it holds {sorted(entries)[:3]}...); choose a new or empty directory")
    make_dirs(path, what)
    marker = path / MARKER
    if not marker.exists():
        try:
            marker.write_text("written by kfp-grpo: its work directory\n")
        except OSError as err:
            raise OutputPathError(f"{what} {path} is not writable: {err.strerror or err}") from None
    return path


def distinct_outputs(**paths: str | Path | None) -> None:
    """A stage's outputs, checked at its start (before any work): refuse two that name the same path
    (one would overwrite the other) and one that holds something kfp-grpo did not write."""
    seen: dict[Path, str] = {}
    for name, p in paths.items():
        if p is None:
            continue
        key = Path(p).resolve()
        if key in seen:
            raise OutputPathError(f"outputs {seen[key]} and {name} are the same path {p}; give each its own")
        seen[key] = name
        if Path(p).parent.exists() and not Path(p).parent.is_dir():
            raise OutputPathError(f"output path {p}: {Path(p).parent} is a file, not a directory")
        check_output(p)


def _clean_stale(final: Path) -> None:
    """Remove what a killed writer left; if it died between the two renames of the
    fallback swap (`final` absent, the complete previous artifact under `.tmp-old-*`),
    put the previous artifact back first."""
    if not final.exists():
        olds = sorted(final.parent.glob(f".{final.name}{TMP_MARK}old-*"), key=lambda p: p.stat().st_mtime)
        if olds:
            olds[-1].rename(final)
    for stale in final.parent.glob(f".{final.name}{TMP_MARK}*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this filesystem/kernel cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_path(final: str | Path, is_dir: bool = True) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces `final` in one rename.

    On an exception the temporary is removed and `final` is left as it was. `final` may
    only replace an artifact of this project (see the module docstring); a directory
    artifact gets the marker file.
    """
    final = Path(final)
    if final.parent.exists() and not final.parent.is_dir():
        raise OutputPathError(f"output path {final}: {final.parent} is a file, not a directory")
    check_output(final)
    make_dirs(final.parent, "output directory")
    _clean_stale(final)
    tmp = final.parent / f".{final.name}{TMP_MARK}{uuid.uuid4().hex[:8]}"
    if is_dir:
        try:
            tmp.mkdir()
        except OSError as err:
            raise OutputPathError(f"output path {final} cannot be written: {err.strerror or err}") from None
    try:
        yield tmp
        if is_dir:
            (tmp / MARKER).write_text("written by kfp-grpo; it may replace this directory\n")
        _fsync_tree(tmp)
        if final.is_dir() and not final.is_symlink():
            # rename() cannot replace a non-empty directory: exchange the two in one step
            # (a reader or a SIGKILL sees the old or the new artifact, never neither) ...
            if _exchange(tmp, final):
                shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous artifact
            else:  # ... or swap via a stale name, which _clean_stale restores if we die between
                old = final.parent / f".{final.name}{TMP_MARK}old-{uuid.uuid4().hex[:8]}"
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and str(tmp) in f"{err.filename} {err.filename2}":  # the output's own write
            raise OutputPathError(f"output path {final} cannot be written: {err.strerror or err}") from None
        raise


def _fsync_tree(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def write_parquet(df: pd.DataFrame, path: str | Path) -> None:
    """Write a DataFrame to Parquet atomically (marked as this project's in its schema metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), PARQUET_KEY: b"1"})
    with atomic_path(path, is_dir=False) as tmp:
        pq.write_table(table, tmp)


def read_parquet(path: str | Path, what: str = "dataset", columns: Sequence[str] = ()) -> pd.DataFrame:
    """Read Parquet with an error naming the file when it is missing, unreadable or lacks `columns`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        df = pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise ValueError(f"{what} {path} is not a readable Parquet file: {err}") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} {path} lacks required column(s) {missing}; found {[str(c) for c in df.columns]}")
    return df


def write_json(obj: dict[str, Any], path: str | Path) -> None:
    """Write a JSON object atomically, marked as this project's (a ``kfp_grpo`` key)."""
    with atomic_path(path, is_dir=False) as tmp:
        tmp.write_text(json.dumps({"kfp_grpo": 1, **obj}, indent=2, sort_keys=True, default=float))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())
