"""The small supervised training loop shared by SFT, reward-model training and replay."""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from components import tracking


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN/inf; the model is not saved."""


class DivergenceError(RuntimeError):
    """An update crossed a configured KL / clip-fraction limit; the model is not saved."""


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warmup to 1, then linear decay to 0.1 at `total` steps."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.1, 1.0 - 0.9 * (step - warmup) / max(1, total - warmup))
    return f


def train_steps(model: torch.nn.Module, loss_fn: Callable[[int], torch.Tensor], steps: int, lr: float,
                weight_decay: float = 0.0, warmup: int = 0, max_grad_norm: float = 1.0,
                name: str = "train", log_every: int = 25) -> list[float]:
    """Run `steps` AdamW steps on `loss_fn(step)`; print progress; log `<name>/loss`.

    Raises NonFiniteError (naming the step) on a NaN/inf loss or gradient.
    """
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, steps))
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        loss = loss_fn(step)
        if not torch.isfinite(loss):
            raise NonFiniteError(f"{name}: loss is {loss.item()} at step {step}; model not saved")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))
        if not math.isfinite(grad_norm):
            raise NonFiniteError(f"{name}: gradient norm is {grad_norm} at step {step}; model not saved")
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == steps - 1:
            tracking.log_metrics({f"{name}/loss": losses[-1], f"{name}/grad_norm": grad_norm,
                                  f"{name}/lr": sched.get_last_lr()[0]}, step=step)
            print(f"[{name}] step {step + 1}/{steps} loss {losses[-1]:.4f} "
                  f"({time.perf_counter() - start:.1f}s)", flush=True)
    model.eval()
    return losses
