"""GRPO math (DeepSeekMath, Algorithm 1): advantages, k3 KL, clipped surrogate loss.

Pure torch, no I/O. Each function follows a formula of DESIGN.md ("Advantages",
"Objective"); read them side by side.
"""
from __future__ import annotations

import torch
from torch import Tensor

SCALES = ("group", "batch", "none")
STDS = ("population", "sample")
AGGS = ("sequence", "token", "dr_grpo")


def _check_finite(values: Tensor, what: str) -> None:
    bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"{len(bad)} non-finite {what} (NaN or inf) at indices {bad[:20]}")


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """Validate 1-D rewards of length B*G and reshape them to [B, G]."""
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group needs a baseline), got {group_size}")
    if rewards.dim() != 1 or rewards.numel() == 0:
        raise ValueError(f"rewards must be a non-empty 1-D tensor, got shape {tuple(rewards.shape)}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards are not divisible into groups of {group_size}")
    _check_finite(rewards, "rewards")
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    return rewards.view(-1, group_size)


def _all_equal(groups: Tensor) -> Tensor:
    """[B, 1] bool: True where every reward of the group equals its first."""
    return (groups == groups[:, :1]).all(dim=1, keepdim=True)


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group",
                     std: str = "population", eps: float = 1e-4) -> Tensor:
    """Outcome supervision: Â_i = (r_i − mean_group(r)) / (std(r) + eps).

    scale: "group" (std of the group), "batch" (std over all B*G rewards; the mean is
    still per group) or "none" (Dr. GRPO: Â_i = r_i − mean). std: "population" (÷G)
    or "sample" (÷(G−1), Bessel). A group whose rewards are all equal gets exactly 0.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if std not in STDS:
        raise ValueError(f"std must be one of {STDS}, got {std!r}")
    groups = _grouped(rewards, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    correction = 1 if std == "sample" else 0
    if scale == "group":
        centered = centered / (groups.std(dim=1, keepdim=True, correction=correction) + eps)
    elif scale == "batch":
        centered = centered / (groups.std(correction=correction) + eps)
    return torch.where(_all_equal(groups), torch.zeros_like(centered), centered).flatten()


def zero_variance_fraction(rewards: Tensor, group_size: int) -> float:
    """Fraction of groups whose rewards are all equal (they carry no learning signal)."""
    return _all_equal(_grouped(rewards, group_size)).float().mean().item()


def process_advantages(step_rewards: list[Tensor], step_ends: list[Tensor],
                       completion_lengths: list[int] | Tensor, eps: float = 1e-4) -> list[Tensor]:
    """Process supervision for one group: Â_{i,t} = Σ_{j : idx_i^(j) ≥ t} r̂_{i,j}.

    r̂ = (r − mean(r)) / (std(r) + eps), one mean and one population std over the step
    rewards of all G outputs together (all equal → 0). Tokens after the last step get 0.
    """
    lengths = [int(n) for n in completion_lengths]
    if not (len(step_rewards) == len(step_ends) == len(lengths)):
        raise ValueError(f"got {len(step_rewards)} step_rewards, {len(step_ends)} step_ends "
                         f"and {len(lengths)} completion_lengths; they must match")
    for i, (r, ends, n) in enumerate(zip(step_rewards, step_ends, lengths)):
        if r.dim() != 1 or ends.shape != r.shape:
            raise ValueError(f"output {i}: {r.numel()} step rewards but {ends.numel()} step ends (need equal 1-D)")
        if ends.numel() and (ends[0] < 0 or ends[-1] >= n or (ends[1:] <= ends[:-1]).any()):
            raise ValueError(f"output {i}: step ends {ends.tolist()} must be increasing and in [0, {n})")
        _check_finite(r, f"step rewards of output {i}")
    if sum(r.numel() for r in step_rewards) == 0:
        raise ValueError("no step rewards in the group")
    flat = torch.cat(step_rewards)
    flat = flat if flat.is_floating_point() else flat.float()
    normed = (flat - flat.mean()) / (flat.std(correction=0) + eps)
    normed = torch.zeros_like(flat) if (flat == flat[0]).all() else normed
    advantages = []
    for r_hat, ends, n in zip(normed.split([r.numel() for r in step_rewards]), step_ends, lengths):
        covers = ends.view(1, -1) >= torch.arange(n, device=ends.device).view(-1, 1)  # [L_i, K_i]: step j ends at/after t
        advantages.append(covers.to(r_hat.dtype) @ r_hat)
    return advantages


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator: KL_t = π_ref/π_θ − log(π_ref/π_θ) − 1 = e^d − d − 1, d = ref − logp.

    Written as expm1(d) − d, which stays ≥ 0 in floating point too.
    """
    d = ref_logp - logp
    return torch.expm1(d) - d


def _masked_mean(x: Tensor, mask: Tensor) -> float:
    return ((x * mask).sum() / mask.sum().clamp(min=1)).item()


def grpo_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor | None, advantages: Tensor, mask: Tensor,
              eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.04, agg: str = "sequence",
              max_completion_length: int | None = None, behavior_logp: Tensor | None = None,
              is_cap: float | None = None) -> tuple[Tensor, dict[str, float]]:
    """Negative GRPO objective and stats. Tensors are [N, T]; advantages [N] or [N, T].

    ρ = exp(logp − old_logp);  ℓ_t = min(ρÂ_t, clip(ρ, 1−ε_low, 1+ε_high)Â_t) − β·KL_t;
    loss = −aggregate(ℓ) over mask == 1 tokens, with agg:
      "sequence": mean over outputs of (mean over that output's tokens); an output with
                  no tokens counts as 0 and still counts in the N (as TRL does);
      "token":    Σ tokens / number of tokens (DAPO);
      "dr_grpo":  Σ tokens / (N × max_completion_length), which defaults to T.
    Truncated IS (sampler ≠ trainer, e.g. vLLM), only when both behavior_logp and is_cap
    are given: the policy term is multiplied by w_t = min(exp(old_logp − behavior_logp), is_cap).
    """
    if agg not in AGGS:
        raise ValueError(f"agg must be one of {AGGS}, got {agg!r}")
    if eps_low <= 0 or eps_high <= 0 or beta < 0:
        raise ValueError(f"need eps_low > 0, eps_high > 0, beta >= 0; got {eps_low}, {eps_high}, {beta}")
    if ref_logp is None and beta > 0:
        raise ValueError(f"ref_logp is required when beta > 0 (beta={beta})")
    named = {"old_logp": old_logp, "ref_logp": ref_logp, "mask": mask, "behavior_logp": behavior_logp}
    for name, t in named.items():
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, logp has {tuple(logp.shape)}")
    if logp.dim() != 2 or logp.shape[0] == 0:
        raise ValueError(f"logp must be [N, T] with N >= 1, got {tuple(logp.shape)}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    if advantages.shape not in ((logp.shape[0], 1), logp.shape):
        raise ValueError(f"advantages must be [N] or [N, T] for logp {tuple(logp.shape)}")
    max_len = logp.shape[1] if max_completion_length is None else max_completion_length
    if agg == "dr_grpo" and max_len <= 0:
        raise ValueError(f"max_completion_length must be > 0, got {max_len}")
    if is_cap is not None and is_cap <= 0:
        raise ValueError(f"is_cap must be > 0, got {is_cap}")

    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    policy_term = torch.min(ratio * advantages, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * advantages)
    if behavior_logp is not None and is_cap is not None:
        policy_term = policy_term * torch.exp(old_logp - behavior_logp).clamp(max=is_cap).detach()
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    objective = (policy_term - beta * kl) * mask

    if agg == "sequence":
        loss = -(objective.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif agg == "token":
        loss = -objective.sum() / mask.sum().clamp(min=1)
    else:
        loss = -objective.sum() / (logp.shape[0] * max_len)

    with torch.no_grad():
        clipped = ((advantages > 0) & (ratio > 1 + eps_high)) | ((advantages < 0) & (ratio < 1 - eps_low))
        real = mask.bool()
        stats = {
            "kl": _masked_mean(kl, mask),
            "clip_fraction": _masked_mean(clipped.to(mask.dtype), mask),
            "ratio_mean": _masked_mean(ratio, mask),
            "ratio_max": ratio[real].max().item() if real.any() else 0.0,
            "loss": loss.item(),
        }
    return loss, stats
