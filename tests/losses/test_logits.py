"""Logit divergences against float64 closed forms computed from explicit probabilities, plus gradcheck."""

import math

import pytest
import torch
from paper_divergences import NEW_HYPER, STOP_GRADIENT, new_reference

from hf_distill.losses import LOGIT_LOSSES, logit_distillation_loss, logit_divergence, sparse_logit_divergence


def _probs(logits, temperature):
    return torch.softmax(logits.double() / temperature, dim=-1)


def _kl(p, q):
    return (p * (p.log() - q.log())).sum(-1)


def reference(loss_type, s_logits, t_logits, temperature=1.0, beta=0.5, skew_alpha=0.1):
    """Closed-form per-position values from explicit probabilities (float64, loops-free but independent code)."""
    ps, pt = _probs(s_logits, temperature), _probs(t_logits, temperature)
    if loss_type == "forward_kl":
        return _kl(pt, ps)
    if loss_type == "reverse_kl":
        return _kl(ps, pt)
    if loss_type == "jsd":
        if beta == 0:
            return _kl(pt, ps)
        if beta == 1:
            return _kl(ps, pt)
        m = beta * pt + (1 - beta) * ps
        return beta * _kl(pt, m) + (1 - beta) * _kl(ps, m)
    if loss_type == "skew_forward_kl":
        return _kl(pt, skew_alpha * pt + (1 - skew_alpha) * ps)
    if loss_type == "skew_reverse_kl":
        return _kl(ps, skew_alpha * ps + (1 - skew_alpha) * pt)
    if loss_type == "tvd":
        return 0.5 * (pt - ps).abs().sum(-1)
    return new_reference(loss_type, s_logits, t_logits, temperature)  # taid, ab_divergence, akl with NEW_HYPER


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 5, 11, generator=g) * 2, torch.randn(3, 5, 11, generator=g) * 2


@pytest.mark.parametrize("loss_type", list(LOGIT_LOSSES))
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_matches_closed_form(loss_type, temperature, logits):
    s, t = logits
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(1)) > 0.3
    got = logit_distillation_loss(
        s, t, loss_type=loss_type, temperature=temperature, beta=0.3, skew_alpha=0.2, mask=mask, **NEW_HYPER
    )
    ref = reference(loss_type, s, t, temperature, beta=0.3, skew_alpha=0.2)
    assert torch.allclose(got.double(), ref[mask].mean(), atol=1e-6)
    unmasked = logit_distillation_loss(
        s, t, loss_type=loss_type, temperature=temperature, beta=0.3, skew_alpha=0.2, **NEW_HYPER
    )
    assert torch.allclose(unmasked.double(), ref.mean(), atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_jsd_endpoints_follow_gkd_convention(beta, logits):
    s, t = logits
    got = logit_distillation_loss(s, t, loss_type="jsd", beta=beta)
    if beta == 0:
        assert torch.allclose(got, logit_distillation_loss(s, t, loss_type="forward_kl"))
    elif beta == 1:
        assert torch.allclose(got, logit_distillation_loss(s, t, loss_type="reverse_kl"))
    else:  # symmetric JSD is bounded by log 2
        assert 0 < got.item() <= math.log(2)


@pytest.mark.parametrize("loss_type", list(LOGIT_LOSSES))
def test_zero_for_identical_distributions(loss_type, logits):
    s, _ = logits
    assert logit_distillation_loss(s, s.clone(), loss_type=loss_type, **NEW_HYPER).abs().item() < 1e-6


@pytest.mark.parametrize("loss_type", list(LOGIT_LOSSES))
def test_gradcheck(loss_type):
    g = torch.Generator().manual_seed(2)
    s = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(4, 6, dtype=torch.float64, generator=g)
    mask = torch.tensor([True, False, True, True])

    def ours(x):
        return logit_distillation_loss(
            x, t, loss_type=loss_type, temperature=1.5, beta=0.4, skew_alpha=0.15, mask=mask, **NEW_HYPER
        )

    if loss_type not in STOP_GRADIENT:  # taid / akl: surrogate gradients, checked against the reference below
        assert torch.autograd.gradcheck(ours, (s,), eps=1e-6, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours(s), s)
    (g_ref,) = torch.autograd.grad(reference(loss_type, s, t, 1.5, 0.4, 0.15)[mask].mean(), s)
    assert torch.allclose(g_ours, g_ref, atol=1e-8)


def test_empty_mask_is_zero_not_nan(logits):
    s, t = logits
    s = s.clone().requires_grad_(True)
    loss = logit_distillation_loss(s, t, mask=torch.zeros(3, 5, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(s.grad).all()


def test_errors(logits):
    s, t = logits
    with pytest.raises(ValueError, match="Unknown loss_type"):
        logit_distillation_loss(s, t, loss_type="kl")
    with pytest.raises(ValueError, match="align the vocabularies"):
        logit_distillation_loss(s, t[..., :7])
    with pytest.raises(ValueError, match="mask shape"):
        logit_distillation_loss(s, t, mask=torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_akl_at_mu_one_is_forward_kl_exactly(temperature):
    """At akl_mu = 1 every token is head (the docs' definition), so AKL is forward KL: no token may fall into the tail
    through the rounding of the fp32 cumulative sum (peaked rows over a large vocabulary make it exceed 1)."""
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(64, 4096, generator=gen) * 4, torch.randn(64, 4096, generator=gen) * 4
    akl = logit_divergence(s, t, loss_type="akl", temperature=temperature, akl_mu=1.0)
    fkl = logit_divergence(s, t, loss_type="forward_kl", temperature=temperature)
    assert torch.equal(akl, fkl)
    sparse_ids = t.topk(8, -1).indices
    logp = t.log_softmax(-1)
    tail = logp.scatter(-1, sparse_ids, float("-inf")).logsumexp(-1)
    args = (s, sparse_ids, logp.gather(-1, sparse_ids), tail)
    torch.testing.assert_close(
        sparse_logit_divergence(*args, loss_type="akl", akl_mu=1.0), sparse_logit_divergence(*args), rtol=0, atol=0
    )
