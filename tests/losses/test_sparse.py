"""Sparse (top-k + tail bucket) divergences vs float64 references: k = V equals the dense loss, k < V equals the
bucketed closed form, temperature handling of the tail, gradcheck, bad inputs."""

import math

import pytest
import torch
from paper_divergences import NEW_HYPER

from hf_distill.losses import LOGIT_LOSSES, logit_divergence
from hf_distill.losses.sparse import (
    SPARSE_LOSSES,
    sparse_distillation_loss,
    sparse_logit_divergence,
    student_bucket_log_probs,
    teacher_bucket_log_probs,
)


N, V = 6, 11


def cache_entries(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k ids, their T=1 log-probs and the exact log tail mass, computed independently in float64."""
    logp = torch.log_softmax(teacher_logits.double(), -1)
    values, ids = logp.topk(k, dim=-1)
    rest = torch.ones_like(logp, dtype=torch.bool).scatter(-1, ids, False)
    tail = torch.log((logp.exp() * rest).sum(-1))  # -inf when k == V
    return ids, values, tail


def logits(seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(N, V, generator=g)).to(dtype)


@pytest.mark.parametrize("loss_type", SPARSE_LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_full_vocab_equals_dense_values_and_gradients(loss_type, temperature):
    s, t = logits(0).requires_grad_(), logits(1)
    ids, values, tail = cache_entries(t, V)
    ids = ids.flip(-1)  # any order of the k ids must give the same value
    values = values.flip(-1)
    kw = dict(loss_type=loss_type, temperature=temperature, beta=0.3, **NEW_HYPER)
    sparse = sparse_logit_divergence(s, ids, values, tail, **kw)
    (g_sparse,) = torch.autograd.grad(sparse.sum(), s)
    dense = logit_divergence(s, t, **kw)
    (g_dense,) = torch.autograd.grad(dense.sum(), s)
    assert torch.allclose(sparse, dense, atol=1e-12)
    assert torch.allclose(g_sparse, g_dense, atol=1e-12)


def test_full_vocab_fp32_within_1e5():
    s, t = logits(2, torch.float32).requires_grad_(), logits(3, torch.float32)
    ids, values, tail = cache_entries(t, V)
    sparse = sparse_logit_divergence(s, ids.int(), values.float(), tail.float())
    dense = logit_divergence(s, t)
    assert sparse.dtype == torch.float32
    assert torch.allclose(sparse, dense, atol=1e-5)
    (g1,) = torch.autograd.grad(sparse.sum(), s)
    (g2,) = torch.autograd.grad(logit_divergence(s, t).sum(), s)
    assert torch.allclose(g1, g2, atol=1e-6)


def bucket_reference(s: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, temperature: float) -> tuple:
    """Bucket distributions by explicit loops in float64, the tail's tempered mass as the docstring defines it."""
    q_rows, s_rows = [], []
    for n in range(s.shape[0]):
        p = torch.softmax(t[n].double(), -1)
        top = [int(i) for i in ids[n]]
        rest = [v for v in range(V) if v not in top]
        tail_each = p[rest].sum() / len(rest)
        weights = [p[i] ** (1 / temperature) for i in top] + [len(rest) * tail_each ** (1 / temperature)]
        weights = torch.stack(weights)
        q_rows.append(weights / weights.sum())
        ps = torch.softmax(s[n].double() / temperature, -1)
        s_rows.append(torch.cat([ps[top], ps[rest].sum().view(1)]))
    return torch.stack(q_rows), torch.stack(s_rows)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_topk_buckets_match_loop_reference(temperature):
    s, t = logits(4), logits(5)
    k = 4
    ids, values, tail = cache_entries(t, k)
    q, p_s = bucket_reference(s, t, ids, temperature)
    assert torch.allclose(teacher_bucket_log_probs(values, tail, V, temperature=temperature).exp(), q, atol=1e-12)
    assert torch.allclose(student_bucket_log_probs(s, ids, temperature=temperature).exp(), p_s, atol=1e-12)
    fkl = sparse_logit_divergence(s, ids, values, tail, temperature=temperature)
    assert torch.allclose(fkl, (q * (q.log() - p_s.log())).sum(-1), atol=1e-12)
    rkl = sparse_logit_divergence(s, ids, values, tail, loss_type="reverse_kl", temperature=temperature)
    assert torch.allclose(rkl, (p_s * (p_s.log() - q.log())).sum(-1), atol=1e-12)
    beta = 0.4
    m = beta * q + (1 - beta) * p_s
    jsd_ref = beta * (q * (q / m).log()).sum(-1) + (1 - beta) * (p_s * (p_s / m).log()).sum(-1)
    jsd = sparse_logit_divergence(s, ids, values, tail, loss_type="jsd", temperature=temperature, beta=beta)
    assert torch.allclose(jsd, jsd_ref, atol=1e-12)


def test_uniform_tail_is_exact_at_any_temperature():
    # teacher logits equal outside the top k: the tempered tail bucket is then exact
    t = logits(6)
    k = 3
    t[:, k:] = -1.0
    t[:, :k] = t[:, :k].abs() + 1.0
    s = logits(7)
    ids, values, tail = cache_entries(t, k)
    for temperature in (0.5, 3.0):
        q = torch.softmax(t / temperature, -1)
        ps = torch.softmax(s / temperature, -1)
        q_b = torch.cat([q[:, :k], q[:, k:].sum(-1, keepdim=True)], -1)
        s_b = torch.cat([ps.gather(-1, ids), 1 - ps.gather(-1, ids).sum(-1, keepdim=True)], -1)
        q_b_sorted = torch.cat([q.gather(-1, ids), q_b[:, -1:]], -1)
        expected = (q_b_sorted * (q_b_sorted.log() - s_b.log())).sum(-1)
        got = sparse_logit_divergence(s, ids, values, tail, temperature=temperature)
        assert torch.allclose(got, expected, atol=1e-10)


def test_forward_kl_is_a_lower_bound_of_dense():
    s, t = logits(8), logits(9)
    for k in (1, 3, 7):
        ids, values, tail = cache_entries(t, k)
        assert (sparse_logit_divergence(s, ids, values, tail) <= logit_divergence(s, t) + 1e-12).all()


@pytest.mark.parametrize("loss_type", ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "tvd", "ab_divergence"])
def test_gradcheck_topk(loss_type):
    s, t = logits(10)[:3].requires_grad_(), logits(11)[:3]
    ids, values, tail = cache_entries(t, 4)
    assert torch.autograd.gradcheck(
        lambda x: sparse_logit_divergence(x, ids, values, tail, loss_type=loss_type, temperature=1.5, **NEW_HYPER),
        (s,),
    )


def test_half_precision_values_close_to_fp32():
    s, t = logits(12, torch.float32), logits(13, torch.float32)
    ids, values, tail = cache_entries(t, 5)
    full = sparse_logit_divergence(s, ids, values.float(), tail.float())
    for dtype in (torch.float16, torch.bfloat16):
        low = sparse_logit_divergence(s, ids, values.to(dtype), tail.to(dtype))
        assert low.dtype == torch.float32
        assert torch.allclose(low, full, atol=3e-2)


def test_zero_teacher_tail_and_mean():
    s = logits(14).requires_grad_()
    t = logits(15)
    ids, values, _ = cache_entries(t, 4)
    values = torch.log_softmax(values, -1)  # all mass on the top 4: tail = -inf
    tail = torch.full((N,), -math.inf, dtype=torch.float64)
    loss = sparse_distillation_loss(s, ids, values, tail)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    empty = sparse_distillation_loss(s[:0], ids[:0], values[:0], tail[:0])
    assert empty.item() == 0.0


def test_bad_inputs():
    s, t = logits(16), logits(17)
    ids, values, tail = cache_entries(t, 3)
    with pytest.raises(ValueError, match="no sparse"):
        sparse_logit_divergence(s, ids, values, tail, loss_type="kl")
    with pytest.raises(ValueError, match="Shapes do not line up"):
        sparse_logit_divergence(s, ids[:, :2], values, tail)
    with pytest.raises(ValueError, match="only 11"):
        student_bucket_log_probs(s, torch.zeros(N, 12, dtype=torch.long))
    with pytest.raises(ValueError, match="vocabulary has only 11"):
        teacher_bucket_log_probs(torch.zeros(N, 12), tail, V)
    assert set(SPARSE_LOSSES) == set(LOGIT_LOSSES)


@pytest.mark.parametrize("loss_type", sorted(SPARSE_LOSSES))
@pytest.mark.parametrize("head", ["plain", "bias_softcap_padded"])
def test_fused_sparse_equals_the_full_logits(loss_type, head):
    """`fused_sparse_distillation_loss` (chunks of 3 rows from hidden states) == the sparse divergence and CE on the
    full logits, values and gradients, float64; with a bias, logit scale, softcap and a padded head too."""
    from hf_distill.losses.fused_sparse import fused_sparse_distillation_loss

    gen = torch.Generator().manual_seed(3)
    n, hdim, vocab, k, width = 7, 5, 13, 4, 13 if head == "plain" else 11
    hidden = torch.randn(n, hdim, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, hdim, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64, requires_grad=True) if head != "plain" else None
    scale, softcap = (1.0, None) if head == "plain" else (0.7, 3.0)
    teacher = torch.randn(n, width, generator=gen, dtype=torch.float64).log_softmax(-1)
    top, ids = teacher.topk(k, -1)
    tail = teacher.scatter(-1, ids, float("-inf")).logsumexp(-1)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[2] = -100
    hyper = {"temperature": 2.0, "beta": 0.3, "skew_alpha": 0.2, "taid_t": 0.6, "ab_alpha": 0.7, "ab_beta": 0.4,
             "akl_mu": 0.5}  # fmt: skip
    hyper = {key: value for key, value in hyper.items() if key in ("temperature", "beta", "skew_alpha")
             or loss_type.startswith(key.split("_")[0])}  # fmt: skip

    def full():
        logits = (torch.nn.functional.linear(hidden, weight, bias)) * scale
        logits = logits if softcap is None else torch.tanh(logits / softcap) * softcap
        kd = sparse_logit_divergence(logits[:, :width], ids, top, tail, loss_type=loss_type, **hyper).sum()
        ce = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        return kd, ce

    stats = {}
    kd, ce = fused_sparse_distillation_loss(hidden, weight, ids, top, tail, labels, loss_type=loss_type,
                                            loss_weights=(0.8, 0.3), chunk_size=3, student_bias=bias,
                                            logit_scale=scale, softcap=softcap, vocab_size=width, stats=stats,
                                            **hyper)  # fmt: skip
    params = [hidden, weight] + ([bias] if bias is not None else [])
    got = torch.autograd.grad(0.8 * kd + 0.3 * ce, params)
    ref_kd, ref_ce = full()
    expected = torch.autograd.grad(0.8 * ref_kd + 0.3 * ref_ce, params)
    torch.testing.assert_close(kd, ref_kd.detach())
    torch.testing.assert_close(ce, ref_ce.detach())
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    assert 0 <= int(stats["top1_agreement"]) <= n
