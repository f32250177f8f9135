"""Cross-tokenizer losses (ULD, GOLD hybrid, ALM) against float64 references, TRL's own GOLD loss, gradients, and the
chunked teacher."""

import math
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from hf_distill.losses.cross_tokenizer import (
    CROSS_TOKENIZER_LOSSES,
    alm,
    gold,
    gold_matched,
    sorted_head,
    teacher_row_stats,
    uld,
)


def ref_uld(s: list[float], t: list[float]) -> float:
    """The paper's definition, one row: sort descending, zero-pad the shorter, sum |difference|."""
    s, t = sorted(s, reverse=True), sorted(t, reverse=True)
    n = max(len(s), len(t))
    s, t = s + [0.0] * (n - len(s)), t + [0.0] * (n - len(t))
    return sum(abs(a - b) for a, b in zip(s, t))


def ref_gold(s: list[float], t: list[float], s_ids: list[int], t_ids: list[int], beta: float = 0.0) -> float:
    """Loop reference of TRL 1.16's GOLD hybrid (adaptive weights): the generalized JSD of the shared entries as they
    are (logs floored at 1e-8; beta 0 = forward KL, 1 = reverse KL), weighted M / V_t, plus ULD of the rest, weighted
    1 - M / V_t."""
    ls = [math.log(max(s[i], 1e-8)) for i in s_ids]
    lt = [math.log(max(t[i], 1e-8)) for i in t_ids]
    matched = 0.0
    for a, b in zip(ls, lt):
        if beta == 0:
            matched += math.exp(b) * (b - a)
        elif beta == 1:
            matched += math.exp(a) * (a - b)
        else:
            m = math.log((1 - beta) * math.exp(a) + beta * math.exp(b))
            matched += beta * math.exp(b) * (b - m) + (1 - beta) * math.exp(a) * (a - m)
    s_rest = [p for i, p in enumerate(s) if i not in set(s_ids)]
    t_rest = [p for i, p in enumerate(t) if i not in set(t_ids)]
    weight = len(s_ids) / len(t)
    return weight * matched + (1 - weight) * ref_uld(s_rest, t_rest)


def rows(g: int, v: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(g, v, generator=gen, dtype=torch.float64) * 2).softmax(-1) * scale


@pytest.mark.parametrize("vs,vt", [(7, 11), (11, 7), (9, 9)])
def test_uld_matches_reference(vs, vt):
    s, t = rows(5, vs, 0), rows(5, vt, 1, scale=0.7)  # unnormalised teacher rows, as after a span merge
    expected = torch.tensor([ref_uld(a.tolist(), b.tolist()) for a, b in zip(s, t)], dtype=torch.float64)
    torch.testing.assert_close(uld(s, t).double(), expected, rtol=1e-6, atol=1e-6)


def test_uld_is_zero_for_a_permutation_and_two_for_disjoint_onehots():
    p = rows(3, 8, 2)
    assert uld(p, p[:, torch.randperm(8)]).abs().max() < 1e-6
    torch.testing.assert_close(uld(torch.eye(4)[:1], torch.eye(6)[:1]), torch.zeros(1))  # same sorted vector
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5, 0.0]])
    torch.testing.assert_close(uld(a, b), torch.tensor([1.0]))


def test_uld_top_k_bound():
    s, t = rows(6, 50, 3), rows(6, 80, 4)
    exact = uld(s, t)
    for k in (1, 5, 20):
        approx = uld(s, t, top_k=k)
        _, s_tail = sorted_head(s, k)
        _, t_tail = sorted_head(t, k)
        assert (approx <= exact + 1e-6).all()  # a lower bound
        assert (exact - approx <= 2 * torch.minimum(s_tail, t_tail) + 1e-6).all()  # documented error bound
    torch.testing.assert_close(uld(s, t, top_k=80), exact)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gold_matches_reference(beta):
    s, t = rows(4, 10, 5), rows(4, 13, 6, scale=0.9)
    s_ids, t_ids = torch.tensor([0, 3, 4, 9]), torch.tensor([12, 1, 5, 2])
    got = gold(s, t, s_ids, t_ids, beta=beta)
    expected = [ref_gold(a.tolist(), b.tolist(), s_ids.tolist(), t_ids.tolist(), beta) for a, b in zip(s, t)]
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    # all tokens shared (same vocabulary, identity map): gold is the forward KL
    p, q = rows(3, 6, 7), rows(3, 6, 8)
    ids = torch.arange(6)
    kl = (q * (q.log() - p.log())).sum(-1)
    torch.testing.assert_close(gold(p, q, ids, ids).double(), kl, rtol=1e-5, atol=1e-6)


def _word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=words[0]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=words[0])


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_gold_equals_trls_gold_loss_on_the_same_tensors(beta):
    """TRL 1.16's `ULDLoss` with `uld_use_hybrid_loss` and adaptive weights, on the same aligned probability rows."""
    from trl.experimental.gold.gold_trainer import ULDLoss

    student_tok = _word_tokenizer(["<unk>", "a", "b", "c", "d", "e", "f", "g", "h"])
    teacher_tok = _word_tokenizer(["<unk>", "x", "c", "y", "a", "z", "g", "b", "w", "v", "q", "r"])
    config = SimpleNamespace(uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
                             uld_teacher_temperature=1.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
                             use_extended_uld=True, uld_token_merge_strategy="bayesian", uld_use_hybrid_loss=True,
                             uld_hybrid_matched_weight=None, uld_hybrid_unmatched_weight=None, beta=beta)  # fmt: skip
    trl_loss = ULDLoss(config, student_tokenizer=student_tok, teacher_tokenizer=teacher_tok)
    t_ids = torch.tensor(sorted(trl_loss._teacher_matched_ids))
    s_ids = trl_loss.mapping_tensor[t_ids]
    s, t = rows(6, len(student_tok), 11).float(), rows(6, len(teacher_tok), 12).float()
    t[0, t_ids[0]] = 0.0  # a zero probability: both floor its log at 1e-8
    expected = trl_loss._compute_hybrid_uld_loss(s, t)  # TRL: the mean over the rows
    torch.testing.assert_close(gold(s, t, s_ids, t_ids, beta=beta).mean(), expected, rtol=1e-5, atol=1e-6)


def test_gold_matched_is_zero_for_equal_rows():
    p = rows(2, 5, 3)
    for beta in (0.0, 0.5, 1.0):
        assert gold_matched(p, p, beta).abs().max() < 1e-12


def test_gradcheck():
    s_logits = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    t = rows(3, 9, 9)
    ids_s, ids_t = torch.tensor([1, 2]), torch.tensor([4, 0])
    assert torch.autograd.gradcheck(lambda x: uld(x.softmax(-1), t).sum(), (s_logits,))
    assert torch.autograd.gradcheck(lambda x: uld(x.softmax(-1), t, top_k=3).sum(), (s_logits,))
    assert torch.autograd.gradcheck(lambda x: gold(x.softmax(-1), t, ids_s, ids_t).sum(), (s_logits,))
    assert torch.autograd.gradcheck(lambda x: gold(x.softmax(-1), t, ids_s, ids_t, top_k=2).sum(), (s_logits,))


def test_gold_gradient_on_shared_tokens_points_to_the_teacher():
    s_logits = torch.zeros(1, 4, requires_grad=True)
    t = torch.tensor([[0.0, 0.9, 0.1, 0.0]])
    ids = torch.arange(4)
    gold(s_logits.softmax(-1), t, ids, ids).sum().backward()
    assert s_logits.grad[0, 1] < 0 and s_logits.grad[0, 3] > 0  # descent raises token 1, lowers token 3


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("top_k", [None, 4])
def test_teacher_row_stats_matches_dense(shared, top_k):
    torch.manual_seed(0)
    r, h, v = 11, 5, 37
    hidden, weight, bias = torch.randn(r, h), torch.randn(v, h), torch.randn(v)
    targets = torch.randint(0, v, (r,))
    base = torch.tensor([9, 0, 4, 5])
    ids = torch.tensor([3, 30, 7]) if shared else None
    out = teacher_row_stats(hidden, weight, targets, base, top_k=top_k, shared_ids=ids, temperature=2.0, bias=bias,
                            logit_scale=0.5, softcap=3.0, chunk_size=3)  # fmt: skip
    logits = torch.tanh((hidden @ weight.T + bias) * 0.5 / 3.0) * 3.0 / 2.0
    logprobs = logits.log_softmax(-1)
    torch.testing.assert_close(out["target_logprobs"], logprobs.gather(-1, targets[:, None]).squeeze(-1))
    probs = logprobs[base].exp()
    if shared:
        torch.testing.assert_close(out["shared"], probs[:, ids])
        rest = torch.ones(v, dtype=torch.bool).index_fill(0, ids, False)
        probs = probs[:, rest]
    top, tail = sorted_head(probs, top_k)
    torch.testing.assert_close(out["top"], top)
    torch.testing.assert_close(out["tail"], tail)


def ref_alm(s: float, t: float, tau: float) -> float:
    """Binary KL between Bernoulli(exp(t / tau)) and Bernoulli(exp(s / tau)), in float64 by hand."""
    import math

    ps, pt = math.exp(s / tau), math.exp(t / tau)
    return pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))


@pytest.mark.parametrize("tau", [1.0, 0.5, 3.0])
def test_alm_matches_reference(tau):
    torch.manual_seed(0)
    s = -torch.rand(12, dtype=torch.float64) * 6 - 1e-3  # chunk log-likelihoods, from near 0 to about -6
    t = -torch.rand(12, dtype=torch.float64) * 6 - 1e-3
    s[0], t[0] = -1e-4, -30.0  # a near-certain chunk and a near-impossible one
    expected = torch.tensor([ref_alm(a, b, tau) for a, b in zip(s.tolist(), t.tolist())], dtype=torch.float64)
    torch.testing.assert_close(alm(s, t, tau), expected, rtol=1e-9, atol=1e-12)
    assert (alm(s, t, tau) >= 0).all()
    torch.testing.assert_close(alm(t, t, tau), torch.zeros_like(t))
    torch.testing.assert_close(alm(s.float(), t.float(), tau).double(), expected, rtol=1e-4, atol=1e-6)


def test_alm_gradcheck_and_direction():
    torch.manual_seed(0)
    s = (-torch.rand(6, dtype=torch.float64) * 4 - 0.05).requires_grad_()
    t = -torch.rand(6, dtype=torch.float64) * 4 - 0.05
    assert torch.autograd.gradcheck(lambda x: alm(x, t, 0.7), (s,))
    alm(s, t).sum().backward()
    assert ((s.grad > 0) == (s.detach() > t)).all()  # descent moves each chunk's likelihood towards the teacher's
    with pytest.raises(ValueError, match="one teacher chunk per student chunk"):
        alm(s, t[:3])


def test_table():
    assert set(CROSS_TOKENIZER_LOSSES) == {"uld", "gold", "alm"}
