"""Tests for components/grpo.py against values worked out by hand (DESIGN.md formulas)."""
import math

import pytest
import torch

from components.grpo import (
    group_advantages,
    grpo_loss,
    kl_k3,
    process_advantages,
    zero_variance_fraction,
)

EPS = 1e-4
D = torch.float64


def t(values):
    return torch.tensor(values, dtype=D)


def close(actual, expected):
    torch.testing.assert_close(actual, t(expected) if not torch.is_tensor(expected) else expected,
                               rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- group advantages

def test_group_population_std():
    # [1,0,0,1], G=4: mean .5, deviations ±.5, population var (4 × .25)/4 = .25, std .5
    a = .5 / (.5 + EPS)
    close(group_advantages(t([1, 0, 0, 1]), 4), [a, -a, -a, a])


def test_group_sample_std():
    # same rewards, Bessel: var (4 × .25)/3 = 1/3, std sqrt(1/3)
    a = .5 / (math.sqrt(1 / 3) + EPS)
    close(group_advantages(t([1, 0, 0, 1]), 4, std="sample"), [a, -a, -a, a])


# two groups of G=2: [0, 2] (mean 1) and [4, 4] (all equal → 0)
TWO_GROUPS = [0, 2, 4, 4]


@pytest.mark.parametrize("std, group_std", [("population", 1.0),            # sqrt((1+1)/2)
                                            ("sample", math.sqrt(2.0))])    # sqrt((1+1)/1)
def test_scale_group(std, group_std):
    a = 1 / (group_std + EPS)
    close(group_advantages(t(TWO_GROUPS), 2, scale="group", std=std), [-a, a, 0, 0])


@pytest.mark.parametrize("std, batch_var", [("population", 11 / 4), ("sample", 11 / 3)])
def test_scale_batch_uses_group_mean_and_batch_std(std, batch_var):
    # batch mean 2.5; deviations -2.5, -.5, 1.5, 1.5; squares 6.25 + .25 + 2.25 + 2.25 = 11
    # centring is still per group: group 1 → -1, +1; group 2 is all equal → 0
    a = 1 / (math.sqrt(batch_var) + EPS)
    close(group_advantages(t(TWO_GROUPS), 2, scale="batch", std=std), [-a, a, 0, 0])


def test_scale_none_is_dr_grpo():
    # Â = r − mean_group: [0−1, 2−1, 4−4, 4−4]; std kind does not matter
    for std in ("population", "sample"):
        close(group_advantages(t([0, 2, 4, 4]), 2, scale="none", std=std), [-1, 1, 0, 0])
    close(group_advantages(t([0, 3, 1, 2]), 4, scale="none"), [-1.5, 1.5, -.5, .5])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("std", ["population", "sample"])
def test_all_equal_group_is_exactly_zero(scale, std):
    # float32 mean of three copies of v is v + 2**-25 here, so a naive (r − mean)/(0 + eps)
    # would give 3e-4 instead of 0 (checked: a constant group's mean is not always exact)
    v = 0.4900934100151062
    r = torch.tensor([v, v, v, 0.7, 0.7, 0.7, 1.0, 0.0, 0.25], dtype=torch.float32)
    assert (r[:3] - r[:3].mean() != 0).all()  # the trap is real
    adv = group_advantages(r, 3, scale=scale, std=std)
    assert torch.isfinite(adv).all()
    assert (adv[:6] == 0).all()
    assert (adv[6:] != 0).all()
    assert (group_advantages(torch.full((4,), 0.3), 2, scale=scale, std=std) == 0).all()


def test_integer_rewards_accepted():
    a = .5 / (.5 + EPS)
    adv = group_advantages(torch.tensor([1, 0, 0, 1]), 4)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, a], dtype=torch.float32))


def test_zero_variance_fraction():
    # groups [1,1] [0,1] [2,2]: two of three are constant
    assert zero_variance_fraction(t([1, 1, 0, 1, 2, 2]), 2) == pytest.approx(2 / 3)
    assert zero_variance_fraction(t([0, 1, 1, 0]), 2) == 0.0
    assert isinstance(zero_variance_fraction(t([0, 1]), 2), float)


def test_non_finite_reward_is_named():
    r = t([0, 1, float("nan"), 1, 0, float("inf")])
    with pytest.raises(ValueError, match=r"2 non-finite.*\[2, 5\]"):
        group_advantages(r, 2)
    with pytest.raises(ValueError, match=r"1 non-finite.*\[0\]"):
        zero_variance_fraction(t([float("-inf"), 1]), 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rewards=t([1, 0]), group_size=1), "group_size"),
    (dict(rewards=t([1, 0, 1]), group_size=2), "divisible"),
    (dict(rewards=t([]), group_size=2), "non-empty"),
    (dict(rewards=t([[1, 0]]), group_size=2), "1-D"),
    (dict(rewards=t([1, 0]), group_size=2, scale="global"), "scale"),
    (dict(rewards=t([1, 0]), group_size=2, std="unbiased"), "std"),
])
def test_group_advantages_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        group_advantages(**kwargs)


# ---------------------------------------------------------------- process advantages

def test_process_advantages_hand_example():
    # output 0: steps rewarded 3, 0 ending at tokens 1, 3 (L=5); output 1: one step rewarded 0 ending at 2 (L=4)
    # all step rewards [3, 0, 0]: mean 1, deviations [2, -1, -1], population var 6/3 = 2
    s = math.sqrt(2) + EPS
    r0a, r0b, r1a = 2 / s, -1 / s, -1 / s
    adv = process_advantages([t([3, 0]), t([0])], [torch.tensor([1, 3]), torch.tensor([2])], [5, 4])
    # token t sums every step whose end ≥ t: t ≤ 1 → both steps, 2 ≤ t ≤ 3 → step 2, t = 4 → none
    close(adv[0], [r0a + r0b, r0a + r0b, r0b, r0b, 0])
    close(adv[1], [r1a, r1a, r1a, 0])


def test_process_advantages_all_equal_and_tensor_lengths():
    v = 0.4900934100151062  # float32 mean of three copies is off by 2**-25 (see the group test above)
    r = torch.tensor([v, v, v], dtype=torch.float32)
    adv = process_advantages([r[:2], r[2:]], [torch.tensor([0, 1]), torch.tensor([0])], torch.tensor([2, 1]))
    assert [a.tolist() for a in adv] == [[0, 0], [0]]


@pytest.mark.parametrize("rewards, ends, lengths, message", [
    ([t([1]), t([0])], [torch.tensor([0])], [1, 1], "must match"),
    ([t([1, 0])], [torch.tensor([0])], [2], "step ends"),
    ([t([1, 0])], [torch.tensor([1, 1])], [3], "increasing"),
    ([t([1, 0])], [torch.tensor([2, 1])], [3], "increasing"),
    ([t([1, 0])], [torch.tensor([0, 3])], [3], r"\[0, 3\)"),
    ([t([1, float("nan")])], [torch.tensor([0, 1])], [3], "non-finite step rewards of output 0"),
    ([t([])], [torch.tensor([], dtype=torch.long)], [3], "no step rewards"),
    ([], [], [], "no step rewards"),
])
def test_process_advantages_validation(rewards, ends, lengths, message):
    with pytest.raises(ValueError, match=message):
        process_advantages(rewards, ends, lengths)


# ---------------------------------------------------------------- k3 KL

def test_kl_k3_hand_value():
    # π_θ = .5, π_ref = .25: ratio .5 → .5 − ln .5 − 1 = ln 2 − .5
    close(kl_k3(t([math.log(.5)]), t([math.log(.25)])), [math.log(2) - .5])
    # π_ref/π_θ = 2 → 2 − ln 2 − 1
    close(kl_k3(t([math.log(.25)]), t([math.log(.5)])), [1 - math.log(2)])


def test_kl_zero_when_equal_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(64, 16, generator=g) * 5
    assert (kl_k3(logp, logp) == 0).all()
    ref = logp + torch.randn(64, 16, generator=g)
    assert (kl_k3(logp, ref) > 0).all()
    assert (kl_k3(logp, logp + 1e-6 * torch.randn(64, 16, generator=g)) >= 0).all()


# ---------------------------------------------------------------- loss: hand-computed [2, 3] case

K = 1 - math.log(2)  # k3 KL for π_ref/π_θ = 2
BETA = 0.1


def hand_case():
    """Row 0: Â=+1, ρ = [1, 1.5, .5]; row 1: Â=−2, ρ = [.5, 1.1, pad .1]. ε = .2 both sides.

    policy terms   row 0: min(1,1)=1, min(1.5,1.2)=1.2 (clipped), min(.5,.8)=.5 (unclipped branch)
                   row 1: min(−1,−1.6)=−1.6 (clipped), min(−2.2,−2.2)=−2.2, pad ignored
    KL: row 0 token 0 has π_ref/π_θ = 2 → K = 1 − ln 2; pad token has a huge KL that must be masked.
    ℓ: row 0 sum = 1 − βK + 1.2 + .5 = 2.7 − βK ; row 1 sum = −3.8 ; 5 real tokens.
    """
    ratio = t([[1, 1.5, .5], [.5, 1.1, .1]])
    old = t([[-1.0, -2.0, -.5], [-.7, -1.2, -3.0]])
    logp = (old + ratio.log()).requires_grad_()
    ref = logp.detach() + t([[math.log(2), 0, 0], [0, 0, 3.0]])
    return logp, old, ref, t([1, -2]), t([[1, 1, 1], [1, 1, 0]])


@pytest.mark.parametrize("agg, kwargs, expected", [
    ("sequence", {}, -((2.7 - BETA * K) / 3 + (-3.8) / 2) / 2),
    ("token", {}, -((2.7 - BETA * K) + (-3.8)) / 5),
    ("dr_grpo", {}, -((2.7 - BETA * K) + (-3.8)) / (2 * 3)),
    ("dr_grpo", {"max_completion_length": 4}, -((2.7 - BETA * K) + (-3.8)) / (2 * 4)),
])
def test_loss_hand_values(agg, kwargs, expected):
    logp, old, ref, adv, mask = hand_case()
    loss, stats = grpo_loss(logp, old, ref, adv, mask, beta=BETA, agg=agg, **kwargs)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert stats["loss"] == pytest.approx(expected, rel=1e-12)


def test_loss_stats_hand_values():
    logp, old, ref, adv, mask = hand_case()
    _, stats = grpo_loss(logp, old, ref, adv, mask, beta=BETA)
    assert all(type(v) is float for v in stats.values())
    assert stats["kl"] == pytest.approx(K / 5)                       # pad KL (e³−4) excluded
    assert stats["clip_fraction"] == pytest.approx(2 / 5)            # ρ=1.5,Â>0 and ρ=.5,Â<0; not ρ=.5,Â>0; not pad
    assert stats["ratio_mean"] == pytest.approx((1 + 1.5 + .5 + .5 + 1.1) / 5)
    assert stats["ratio_max"] == pytest.approx(1.5)
    logp2 = logp.detach().clone()
    logp2[1, 2] = old[1, 2] + math.log(9.0)                          # padded ratio 9 must not be the max
    _, stats = grpo_loss(logp2, old, ref, adv, mask, beta=BETA)
    assert stats["ratio_max"] == pytest.approx(1.5)


def test_per_token_advantages_process_supervision():
    # ρ = 1 everywhere, β = 0: ℓ_t = Â_t. One output, Â = [2, −1, 5(pad)] → sequence loss −(2 − 1)/2
    zeros = torch.zeros(1, 3, dtype=D)
    loss, _ = grpo_loss(zeros, zeros, None, t([[2, -1, 5]]), t([[1, 1, 0]]), beta=0.0)
    assert loss.item() == pytest.approx(-0.5)
    # [N] advantages equal the same values broadcast to [N, T]
    logp, old, ref, adv, mask = hand_case()
    for agg in ("sequence", "token", "dr_grpo"):
        a, _ = grpo_loss(logp, old, ref, adv, mask, agg=agg)
        b, _ = grpo_loss(logp, old, ref, adv[:, None].expand(2, 3), mask, agg=agg)
        assert a.item() == pytest.approx(b.item(), rel=1e-12)


# ---------------------------------------------------------------- gradient properties

def token_grad(ratio, advantage, **kwargs):
    """d loss / d logp for a single token with the given ratio and advantage (β = 0)."""
    old = t([[-1.0]])
    logp = (old + math.log(ratio)).requires_grad_()
    loss, _ = grpo_loss(logp, old, None, t([advantage]), t([[1]]), beta=0.0, **kwargs)
    loss.backward()
    return logp.grad.item()


@pytest.mark.parametrize("advantage", [1.0, -1.0, 0.3, -2.5])
def test_gradient_sign_follows_advantage(advantage):
    # unclipped: d(−ρÂ)/d logp = −ρÂ, at ρ = 1 exactly −Â
    assert token_grad(1.0, advantage) == pytest.approx(-advantage)
    assert math.copysign(1, token_grad(1.0, advantage)) == -math.copysign(1, advantage)


@pytest.mark.parametrize("ratio, advantage", [(1.5, 1.0), (0.5, -1.0), (1.3, 2.0), (0.7, -0.5)])
def test_clipping_stops_gradient_outside_trust_region(ratio, advantage):
    assert token_grad(ratio, advantage) == 0.0


@pytest.mark.parametrize("ratio, advantage", [
    (1.1, 1.0), (0.9, -1.0), (1.15, -2.0),   # inside [0.8, 1.2]
    (0.5, 1.0), (1.5, -1.0),                  # outside, but the min picks the unclipped branch
])
def test_gradient_flows_where_not_clipped(ratio, advantage):
    assert token_grad(ratio, advantage) == pytest.approx(-ratio * advantage)


def test_asymmetric_clip_eps_high():
    # DAPO clip-higher: ε_high = .3 keeps ρ = 1.25 inside for Â > 0; ε_low = .1 clips ρ = .85 for Â < 0
    assert token_grad(1.25, 1.0, eps_low=0.1, eps_high=0.3) == pytest.approx(-1.25)
    assert token_grad(0.85, -1.0, eps_low=0.1, eps_high=0.3) == 0.0
    assert token_grad(1.25, 1.0) == 0.0


def test_kl_term_gradient():
    # β·KL with d = ref − logp: d KL/d logp = 1 − e^d; zero when policies agree
    logp = t([[-1.0]]).requires_grad_()
    loss, stats = grpo_loss(logp, logp.detach(), logp.detach().clone(), t([0.0]), t([[1]]), beta=0.5)
    loss.backward()
    assert logp.grad.item() == 0.0 and stats["kl"] == 0.0
    logp = t([[-1.0]]).requires_grad_()
    loss, stats = grpo_loss(logp, logp.detach(), logp.detach() + math.log(2), t([0.0]), t([[1]]), beta=0.5)
    loss.backward()
    # loss = +β·KL, gradient β(1 − 2) = −.5 (raising logp towards the more likely ref lowers the KL)
    assert logp.grad.item() == pytest.approx(-0.5)
    assert stats["kl"] == pytest.approx(1 - math.log(2))


# ---------------------------------------------------------------- edge cases

@pytest.mark.parametrize("agg", ["sequence", "token", "dr_grpo"])
def test_zero_length_output_is_finite(agg):
    logp = torch.zeros(2, 3, dtype=D, requires_grad=True)
    mask = t([[1, 0, 0], [0, 0, 0]])
    loss, stats = grpo_loss(logp, logp.detach(), logp.detach(), t([1, 5]), mask, agg=agg)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert all(math.isfinite(v) for v in stats.values())
    # ρ = 1, KL = 0, one real token with ℓ = 1: the empty output counts as 0 in the sequence mean
    assert loss.item() == pytest.approx({"sequence": -1 / 2, "token": -1.0, "dr_grpo": -1 / 6}[agg])
    loss, stats = grpo_loss(logp, logp.detach(), None, t([1, 5]), torch.zeros(2, 3, dtype=D), beta=0.0, agg=agg)
    assert loss.item() == 0.0 and stats["ratio_max"] == 0.0


def test_importance_sampling_weight_and_cap():
    # behavior = old − ln 2 → w = exp(old − behavior) = 2; unclipped token, ρ = 1, Â = 1 → grad −w
    old = t([[-1.0]])
    behavior = (old - math.log(2)).requires_grad_()

    def grad(**kwargs):
        logp = old.clone().requires_grad_()
        loss, _ = grpo_loss(logp, old, None, t([1.0]), t([[1]]), beta=0.0, **kwargs)
        loss.backward()
        return logp.grad.item()

    assert grad() == pytest.approx(-1.0)
    assert grad(behavior_logp=behavior, is_cap=10.0) == pytest.approx(-2.0)
    assert grad(behavior_logp=behavior, is_cap=1.5) == pytest.approx(-1.5)   # capped
    assert grad(behavior_logp=old, is_cap=10.0) == pytest.approx(-1.0)      # same sampler → w = 1
    assert grad(behavior_logp=behavior) == pytest.approx(-1.0)              # off without a cap
    assert behavior.grad is None                                            # weight is detached


def test_importance_sampling_leaves_kl_unweighted():
    # policy term Â = 0, so only β·KL remains; w = 2 must not scale it
    logp = t([[-1.0]])
    ref = logp + math.log(2)
    plain, _ = grpo_loss(logp, logp, ref, t([0.0]), t([[1]]), beta=0.5)
    weighted, _ = grpo_loss(logp, logp, ref, t([0.0]), t([[1]]), beta=0.5,
                            behavior_logp=logp - math.log(2), is_cap=10.0)
    assert weighted.item() == pytest.approx(plain.item()) and plain.item() == pytest.approx(0.5 * K)


@pytest.mark.parametrize("kwargs, message", [
    (dict(agg="mean"), "agg"),
    (dict(eps_low=0.0), "eps_low"),
    (dict(eps_high=-0.1), "eps_high"),
    (dict(beta=-0.01), "beta"),
    (dict(ref_logp=None), "ref_logp"),
    (dict(mask=torch.ones(2, 4)), "mask"),
    (dict(advantages=t([1, 2, 3])), "advantages"),
    (dict(agg="dr_grpo", max_completion_length=0), "max_completion_length"),
    (dict(behavior_logp=torch.zeros(2, 3, dtype=D), is_cap=0.0), "is_cap"),
])
def test_loss_validation(kwargs, message):
    logp, old, ref, adv, mask = hand_case()
    args = dict(logp=logp, old_logp=old, ref_logp=ref, advantages=adv, mask=mask) | kwargs
    with pytest.raises(ValueError, match=message):
        grpo_loss(**args)


def test_ref_not_needed_without_kl():
    logp, old, _, adv, mask = hand_case()
    loss, stats = grpo_loss(logp, old, None, adv, mask, beta=0.0)
    assert loss.item() == pytest.approx(-(2.7 / 3 + (-3.8) / 2) / 2) and stats["kl"] == 0.0
