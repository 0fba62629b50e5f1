"""What a rollout backend is asked and what it answers: the contract between the stages and
the HF (`components.generation`) and vLLM (`components.vllm_backend`) samplers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Sampling:
    """How to sample: n per prompt, one temperature per sample index (len n)."""

    n: int
    temperatures: list[float]
    max_new_tokens: int
    top_p: float = 1.0
    greedy: bool = False
    seed: int = 0


@dataclass
class Generation:
    prompt_index: int
    sample_index: int
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS) or "length"
    temperature: float


@dataclass
class GenerationStats:
    seconds: float = 0.0
    tokens: int = 0
    extra: dict = field(default_factory=dict)


class Backend(Protocol):
    def generate(self, prompts: list[str], sampling: Sampling) -> list[Generation]: ...

    def load_weights(self, model: Any) -> None: ...


def group_temperatures(n: int, temperature: float, temperature_range: tuple[float, float] | None) -> list[float]:
    """τ_k = τ_lo + (τ_hi − τ_lo)·k/G for k = 0..G−1, or one temperature for all."""
    if temperature_range is None:
        return [temperature] * n
    lo, hi = temperature_range
    return [lo + (hi - lo) * k / n for k in range(n)]
