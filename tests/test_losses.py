"""DPO / SIPO / MODPO / DPO LW losses on hand-computed cases (the arithmetic is in each docstring)."""
import math

import pytest
import torch

from sipo_fast.training.losses import dpo_loss, dpo_lw_loss, modpo_loss, sipo_loss


def _t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_dpo_hand_computed():
    """π_c = -10, π_r = -12, ref_c = ref_r = -11, β = 0.1:
    Δ_w = -10 - (-11) = 1, Δ_l = -12 - (-11) = -1, β(Δ_w - Δ_l) = 0.2,
    loss = -log σ(0.2) = log(1 + e^-0.2) = log(1.8187307531) = 0.5981388693."""
    loss = dpo_loss(_t(-10.0), _t(-12.0), _t(-11.0), _t(-11.0), beta=0.1)
    assert loss.item() == pytest.approx(0.5981388693, abs=1e-9)


def test_dpo_equal_policy_and_reference_is_log2_and_beta_scales_the_margin():
    """π = π_ref ⇒ margin 0 ⇒ -log σ(0) = log 2 whatever β. With margin 2 and β = 1: log(1 + e^-2) = 0.1269280110."""
    assert dpo_loss(_t(-3.0), _t(-5.0), _t(-3.0), _t(-5.0), beta=0.7).item() == pytest.approx(math.log(2))
    assert dpo_loss(_t(-10.0), _t(-12.0), _t(-11.0), _t(-11.0), beta=1.0).item() == pytest.approx(0.1269280110)


def test_dpo_reductions_and_gradient_direction():
    """Two pairs with margins 0.2 and -0.2 (β = 0.1): losses log(1+e^-0.2) = 0.5981388693 and
    log(1+e^0.2) = 0.7981388693; mean 0.6981388693, sum 1.3962777386. d loss/d π_c = -β σ(-βm) < 0:
    raising the chosen log-prob lowers the loss; raising the rejected one raises it."""
    pc = _t(-10.0, -12.0).requires_grad_()
    pr = _t(-12.0, -10.0).requires_grad_()
    ref = _t(-11.0, -11.0)
    per = dpo_loss(pc, pr, ref, ref, beta=0.1, reduction="none")
    torch.testing.assert_close(per, _t(0.5981388693, 0.7981388693), atol=1e-9, rtol=0)
    assert dpo_loss(pc, pr, ref, ref, reduction="sum").item() == pytest.approx(1.3962777386)
    dpo_loss(pc, pr, ref, ref).backward()
    assert torch.all(pc.grad < 0) and torch.all(pr.grad > 0)
    # d/dπ_c of mean(-log σ(β m)) = -(β/B) σ(-β m); for m = 0.2: -(0.1/2) σ(-0.2) = -0.05 · 0.4501660027
    assert pc.grad[0].item() == pytest.approx(-0.05 * 0.4501660027, abs=1e-9)


def test_sipo_hand_computed():
    """DPO part as above (0.5981388693); NLL term α · (-log π(y_c)) / |y_c| = 0.1 · 10 / 5 = 0.2; total 0.7981388693.
    Second pair: same DPO, |y_c| = 20 ⇒ 0.1 · 10 / 20 = 0.05 ⇒ 0.6481388693."""
    per = sipo_loss(_t(-10.0, -10.0), _t(-12.0, -12.0), _t(-11.0, -11.0), _t(-11.0, -11.0), torch.tensor([5, 20]),
                    beta=0.1, alpha=0.1, reduction="none")
    torch.testing.assert_close(per, _t(0.7981388693, 0.6481388693), atol=1e-9, rtol=0)


def test_sipo_is_per_example_not_batch_token_mean():
    """TRL's ["sigmoid","sft"] would use Σ NLL / Σ |y_c| = (10 + 10) / (5 + 20) = 0.8 for both pairs (α·0.8 = 0.08);
    SIPO uses 10/5 = 2 and 10/20 = 0.5 (α· = 0.2 and 0.05), mean 0.125 - a different number."""
    dpo = 0.5981388693
    loss = sipo_loss(_t(-10.0, -10.0), _t(-12.0, -12.0), _t(-11.0, -11.0), _t(-11.0, -11.0), torch.tensor([5, 20]))
    assert loss.item() == pytest.approx(dpo + 0.125)
    assert loss.item() != pytest.approx(dpo + 0.08)


def test_sipo_with_alpha_zero_is_dpo():
    args = (_t(-3.0, -7.0), _t(-4.0, -2.0), _t(-3.5, -6.0), _t(-4.5, -2.5))
    assert sipo_loss(*args, torch.tensor([3, 4]), alpha=0.0).item() == pytest.approx(dpo_loss(*args).item())


def test_modpo_hand_computed():
    """β(Δ_w - Δ_l) = 0.2 (as above); w_k = 0.5, w_-k = [0.5], r_φ(y_w) = 1.0, r_φ(y_l) = 0.2:
    gap = 0.5 · (1.0 - 0.2) = 0.4; logit = (0.2 - 0.4) / 0.5 = -0.4; loss = log(1 + e^0.4) = 0.9130152520."""
    loss = modpo_loss(_t(-10.0), _t(-12.0), _t(-11.0), _t(-11.0), _t(1.0), _t(0.2), weight=0.5, margin_weights=0.5,
                      beta=0.1)
    assert loss.item() == pytest.approx(0.9130152520, abs=1e-9)


def test_modpo_three_objectives():
    """N = 3: w_k = 0.25, w_-k = [0.25, 0.5], r_φ(y_w) = [2, 1], r_φ(y_l) = [1, 3]:
    gap = 0.25·1 + 0.5·(-2) = -0.75; logit = (0.2 + 0.75) / 0.25 = 3.8; loss = log(1 + e^-3.8) = 0.0221242165."""
    loss = modpo_loss(_t(-10.0), _t(-12.0), _t(-11.0), _t(-11.0), _t(2.0, 1.0).view(1, 2), _t(1.0, 3.0).view(1, 2),
                      weight=0.25, margin_weights=[0.25, 0.5])
    assert loss.item() == pytest.approx(0.0221242165, abs=1e-9)


def test_modpo_weight_one_without_margin_is_dpo():
    """w_k = 1 and zero margin rewards reduce MODPO to DPO."""
    args = (_t(-3.0, -7.0), _t(-4.0, -2.0), _t(-3.5, -6.0), _t(-4.5, -2.5))
    z = torch.zeros(2, 1, dtype=torch.float64)
    assert modpo_loss(*args, z, z, weight=1.0, margin_weights=[0.0]).item() == pytest.approx(dpo_loss(*args).item())


def test_dpo_lw_hand_computed():
    """β(Δ_w - Δ_l) = 0.2 (as above); objective 1 prefers y_w (s = +1), objective 2 y_l (s = -1), w = [0.3, 0.7]:
    0.3·log(1 + e^-0.2) + 0.7·log(1 + e^0.2) = 0.3·0.5981388693 + 0.7·0.7981388693 = 0.7381388693."""
    loss = dpo_lw_loss(_t(-10.0), _t(-12.0), _t(-11.0), _t(-11.0), _t(1.0, -1.0).view(1, 2), weights=[0.3, 0.7])
    assert loss.item() == pytest.approx(0.7381388693, abs=1e-9)


def test_dpo_lw_is_the_weighted_sum_of_per_objective_dpo():
    """Against dpo_loss with each objective's own (chosen, rejected) orientation; agreeing rows (s = +1, +1) are
    plain DPO whatever the weights; three objectives."""
    pc, pr, rc, rr = _t(-3.0, -7.0, -5.0), _t(-4.0, -2.0, -6.5), _t(-3.5, -6.0, -5.5), _t(-4.5, -2.5, -6.0)
    signs = _t(1, 1, 1, 1, -1, 1, 1, 1, -1).view(3, 3)
    w = [0.5, 0.2, 0.3]
    flipped = dpo_loss(pr, pc, rr, rc, reduction="none")                  # each row with y_w and y_l swapped
    own = dpo_loss(pc, pr, rc, rr, reduction="none")
    per_obj = torch.where(signs > 0, own[:, None], flipped[:, None])      # (3, 3)
    want = (per_obj * torch.tensor(w, dtype=torch.float64)).sum(1)
    torch.testing.assert_close(dpo_lw_loss(pc, pr, rc, rr, signs, weights=w, reduction="none"), want)
    assert dpo_lw_loss(pc, pr, rc, rr, signs, weights=w, reduction="none")[0].item() == pytest.approx(own[0].item())
    with pytest.raises(ValueError, match="signs must be"):
        dpo_lw_loss(pc, pr, rc, rr, signs[:, :2], weights=w)


@pytest.mark.parametrize("call,match", [
    (lambda: dpo_loss(_t(1.0), _t(1.0, 2.0), _t(1.0), _t(1.0)), "share shape"),
    (lambda: dpo_loss(_t(1.0), _t(1.0), _t(1.0), _t(1.0), reduction="avg"), "reduction"),
    (lambda: dpo_loss(_t(1.0), _t(1.0), _t(1.0), _t(1.0), beta=0.0), "beta"),
    (lambda: dpo_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2)), r"\[B\]"),
    (lambda: sipo_loss(_t(1.0), _t(1.0), _t(1.0), _t(1.0), torch.tensor([0])), "chosen_lengths"),
    (lambda: modpo_loss(_t(1.0), _t(1.0), _t(1.0), _t(1.0), _t(1.0), _t(1.0), weight=0.0, margin_weights=[1.0]),
     "weight"),
    (lambda: modpo_loss(_t(1.0), _t(1.0), _t(1.0), _t(1.0), _t(1.0), _t(1.0), weight=0.5, margin_weights=[1.0, 2.0]),
     "margin rewards"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()
