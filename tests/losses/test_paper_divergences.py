"""TAID, ABKD and AKL: float64 paper references, gradcheck (of the surrogate with its stop-gradient part frozen where
the paper has one), the known limits, and equal values / gradients on the dense, fused and sparse (k = V) paths."""

import pytest
import torch
from paper_divergences import NEW_HYPER, akl_reference, new_reference, taid_reference

from hf_distill.losses import fused_logit_distillation_loss, logit_distillation_loss, logit_divergence
from hf_distill.losses.logits import akl_head_weight
from hf_distill.losses.sparse import sparse_logit_divergence


N, H, V = 9, 6, 13


def tensors(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s_hidden = torch.randn(N, H, generator=g, dtype=dtype).requires_grad_(True)
    s_weight = torch.randn(V, H, generator=g, dtype=dtype).requires_grad_(True)
    t_hidden = torch.randn(N, H, generator=g, dtype=dtype)
    t_weight = 1.5 * torch.randn(V, H, generator=g, dtype=dtype)
    return s_hidden, s_weight, t_hidden, t_weight


def three_paths(loss_type, temperature, **hyper):
    """(value, grads) of the mean divergence on the dense, fused (chunks of 4) and sparse k = V paths."""
    s_hidden, s_weight, t_hidden, t_weight = tensors()
    params = (s_hidden, s_weight)
    t_logits = t_hidden @ t_weight.T
    kw = dict(loss_type=loss_type, temperature=temperature, **hyper)
    dense = logit_distillation_loss(s_hidden @ s_weight.T, t_logits, **kw)
    fused = fused_logit_distillation_loss(s_hidden, s_weight, t_hidden, t_weight, chunk_size=4, **kw)
    logp = torch.log_softmax(t_logits, -1)
    values, ids = logp.topk(V, dim=-1)
    tail = torch.full((N,), float("-inf"), dtype=torch.float64)
    sparse = sparse_logit_divergence(s_hidden @ s_weight.T, ids, values, tail, **kw).mean()
    return {
        name: (loss, torch.autograd.grad(loss, params))
        for name, loss in [("dense", dense), ("fused", fused), ("sparse", sparse)]
    }


@pytest.mark.parametrize("loss_type", ["taid", "ab_divergence", "akl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_paths_equal_the_paper_reference(loss_type, temperature):
    results = three_paths(loss_type, temperature, **NEW_HYPER)
    s_hidden, s_weight, t_hidden, t_weight = tensors()
    ref = new_reference(loss_type, s_hidden @ s_weight.T, t_hidden @ t_weight.T, temperature).mean()
    ref_grads = torch.autograd.grad(ref, (s_hidden, s_weight))
    for name, (value, grads) in results.items():
        torch.testing.assert_close(value, ref, rtol=1e-10, atol=1e-12, msg=name)
        for g, e in zip(grads, ref_grads):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize(
    ("loss_type", "hyper", "same_as"),
    [
        ("taid", {"taid_t": 1.0}, "forward_kl"),
        ("ab_divergence", {"ab_alpha": 1.0, "ab_beta": 0.0}, "forward_kl"),
        ("ab_divergence", {"ab_alpha": 0.0, "ab_beta": 1.0}, "reverse_kl"),
    ],
)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_known_limits_on_all_paths(loss_type, hyper, same_as, temperature):
    got, expected = three_paths(loss_type, temperature, **hyper), three_paths(same_as, temperature)
    for name in got:
        torch.testing.assert_close(got[name][0], expected[name][0], rtol=1e-10, atol=1e-12, msg=name)
        for g, e in zip(got[name][1], expected[name][1]):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11, msg=name)


def test_ab_divergence_is_continuous_at_its_limits_and_hellinger_at_one_half():
    s, t = torch.randn(5, V, dtype=torch.float64), torch.randn(5, V, dtype=torch.float64)
    fkl, rkl = logit_divergence(s, t), logit_divergence(s, t, loss_type="reverse_kl")
    near = dict(loss_type="ab_divergence")
    torch.testing.assert_close(logit_divergence(s, t, ab_alpha=1.0, ab_beta=1e-6, **near), fkl, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logit_divergence(s, t, ab_alpha=1e-6, ab_beta=1.0, **near), rkl, rtol=1e-4, atol=1e-6)
    for a in (0.5, 2.0):  # the beta = 0 and alpha = 0 branches are the limits of the general formula
        torch.testing.assert_close(
            logit_divergence(s, t, ab_alpha=a, ab_beta=1e-7, **near),
            logit_divergence(s, t, ab_alpha=a, ab_beta=0.0, **near),
            rtol=1e-4,
            atol=1e-6,
        )
        torch.testing.assert_close(
            logit_divergence(s, t, ab_alpha=1e-7, ab_beta=a, **near),
            logit_divergence(s, t, ab_alpha=0.0, ab_beta=a, **near),
            rtol=1e-4,
            atol=1e-6,
        )
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    hellinger = 2 * ((p.sqrt() - q.sqrt()) ** 2).sum(-1)
    torch.testing.assert_close(logit_divergence(s, t, ab_alpha=0.5, ab_beta=0.5, **near), hellinger)
    log_sq = 0.5 * ((p.log() - q.log()) ** 2).sum(-1)
    torch.testing.assert_close(logit_divergence(s, t, ab_alpha=0.0, ab_beta=0.0, **near), log_sq)


@pytest.mark.parametrize(
    "hyper", [{"ab_alpha": 0.7, "ab_beta": 0.4}, {"ab_alpha": 0.0, "ab_beta": 0.6}, {"ab_alpha": 1.3, "ab_beta": 0.0}]
)
def test_ab_divergence_gradcheck(hyper):
    s = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 7, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: logit_divergence(x, t, loss_type="ab_divergence", temperature=1.5, **hyper), (s,)
    )


def test_taid_gradient_is_forward_kl_to_the_frozen_target():
    """gradcheck of KL(p_tgt || p_s) with p_tgt frozen at the current student: the gradient TAID trains with."""
    s = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 7, dtype=torch.float64)
    target = torch.softmax((0.3 * s.detach() + 0.7 * t) / 1.5, -1)

    def frozen(x):
        log_q = torch.log_softmax(x / 1.5, -1)
        return (target * (target.log() - log_q)).sum(-1)

    assert torch.autograd.gradcheck(frozen, (s,))
    (ours,) = torch.autograd.grad(logit_divergence(s, t, loss_type="taid", temperature=1.5, taid_t=0.7).sum(), s)
    (expected,) = torch.autograd.grad(frozen(s).sum(), s)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(
        logit_divergence(s, t, loss_type="taid", temperature=1.5, taid_t=0.7), taid_reference(s, t, 1.5, 0.7)
    )
    # t = 0: the target is the student itself, so nothing is learnt
    zero = logit_divergence(s, t, loss_type="taid", taid_t=0.0)
    assert zero.abs().max() < 1e-12
    assert torch.autograd.grad(zero.sum(), s)[0].abs().max() < 1e-12


def test_akl_gradient_mixes_the_two_kl_gradients_with_frozen_weights():
    s = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    t = 2 * torch.randn(6, 9, dtype=torch.float64)
    log_s, log_t = torch.log_softmax(s.detach(), -1), torch.log_softmax(t, -1)
    w = akl_head_weight(log_s, log_t, 0.5)

    def frozen(x):
        return w * logit_divergence(x, t) + (1 - w) * logit_divergence(x, t, loss_type="reverse_kl")

    assert torch.autograd.gradcheck(frozen, (s,))
    ours = logit_divergence(s, t, loss_type="akl", akl_mu=0.5)
    torch.testing.assert_close(ours, frozen(s))
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), s)[0], torch.autograd.grad(frozen(s).sum(), s)[0])
    torch.testing.assert_close(ours, akl_reference(s, t, 1.0, 0.5))


def test_akl_head_is_the_top_token_when_it_holds_more_than_mu():
    t = torch.tensor([[5.0, 0.0, 0.0, 0.0]], dtype=torch.float64)  # p_t(top) ~ 0.98 > mu
    s = torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    gap = (p - q).abs()[0]
    w = akl_head_weight(q.log(), p.log(), 0.5)
    torch.testing.assert_close(w, (gap[0] / gap.sum()).reshape(1))
    assert akl_head_weight(p.log(), p.log(), 0.5).item() == 0.5  # equal distributions: no gap anywhere


def test_errors_name_the_parameter():
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(ValueError, match="taid_t"):
        logit_divergence(s, t, loss_type="taid")
    with pytest.raises(ValueError, match="taid_t"):
        logit_divergence(s, t, loss_type="taid", taid_t=1.5)
    with pytest.raises(ValueError, match="ab_alpha >= 0 and ab_beta >= 0"):
        logit_divergence(s, t, loss_type="ab_divergence", ab_alpha=-0.1)
    with pytest.raises(ValueError, match="taid_t"):
        fused_logit_distillation_loss(s, torch.randn(5, 5), s, torch.randn(5, 5), loss_type="taid")
