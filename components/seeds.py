"""Per-step seeds derived from the config's `seed`, always in the range their consumer accepts.

A stage derives its seeds arithmetically (``seed * 100_003 + step``, ``seed + iteration``, ...).
For a large valid `seed` such a product exceeds what NumPy/pandas (< 2**32) or torch/vLLM
(< 2**63 here; torch takes < 2**64) accept. `derived_seed` reduces the value modulo the
consumer's range: a value that already fits is returned unchanged, so the random draws of
every seed that worked before stay exactly the same.
"""

from __future__ import annotations

NUMPY_BITS = 32  # numpy.random.seed, pandas `random_state`
TORCH_BITS = 63  # torch.Generator.manual_seed, vLLM's per-request seed (and a KFP int64 parameter)
MAX_SEED = 2**63 - 1  # the config's `seed` (a KFP run-time parameter is an int64)


def derived_seed(value: int, bits: int = NUMPY_BITS) -> int:
    """`value` reduced into [0, 2**bits) (unchanged when it already lies there)."""
    return value % (1 << bits)
