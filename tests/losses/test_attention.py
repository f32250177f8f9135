"""Attention-map transfer against float64 loops: padding never counts, head grouping, gradcheck, tiny Llama maps."""

import math

import pytest
import torch
from conftest import make_llama

from hf_distill.losses import ATTENTION_LOSSES, attention_loss, uniform_layer_map


def causal_maps(b: int, heads: int, t: int, seed: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Row-stochastic causal attention probabilities (float64); padded keys get zero mass when `mask` is given."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, heads, t, t, generator=g, dtype=torch.float64) * 2
    allowed = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    # fully masked (padded) query rows of left padding would be all -inf: let them attend to themselves
    allowed = allowed | torch.eye(t, dtype=torch.bool)[None, None]
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)


def reference(
    loss_type: str, s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, key_mask: torch.Tensor | None = None
) -> float:
    """Loops: group teacher heads, keep valid keys, renormalise, compare rows, mean over heads, sum over queries."""
    b, h_s, n, _ = s.shape
    g = t.shape[1] // h_s
    key_mask = mask if key_mask is None else key_mask
    total = 0.0
    for bi in range(b):
        keys = [k for k in range(n) if key_mask[bi, k]]
        for q in range(n):
            if not mask[bi, q]:
                continue
            per_head = []
            for h in range(h_s):
                t_row = [sum(t[bi, h * g + j, q, k].item() for j in range(g)) / g for k in keys]
                s_row = [s[bi, h, q, k].item() for k in keys]
                t_row = [x / sum(t_row) for x in t_row]
                s_row = [x / sum(s_row) for x in s_row]
                if loss_type == "kl":
                    per_head.append(sum(a * math.log(a / c) for a, c in zip(t_row, s_row) if a > 0))
                else:
                    per_head.append(sum((c - a) ** 2 for a, c in zip(t_row, s_row)))
            total += sum(per_head) / h_s
    return total


@pytest.fixture
def mask():
    # row 0 right-padded, row 1 left-padded, row 2 full
    return torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)


@pytest.mark.parametrize("loss_type", list(ATTENTION_LOSSES))
@pytest.mark.parametrize("teacher_heads", [2, 4, 6])
@pytest.mark.parametrize("student_masks_keys", [True, False], ids=["masked-keys", "mass-on-padded-keys"])
def test_matches_loop_reference(loss_type, teacher_heads, student_masks_keys, mask):
    s = causal_maps(3, 2, 6, seed=0, mask=mask if student_masks_keys else None)
    t = causal_maps(3, teacher_heads, 6, seed=1, mask=mask)
    value, count = attention_loss(s, t, mask, loss_type=loss_type)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(reference(loss_type, s, t, mask), rel=1e-10)
    assert count.item() == mask.sum().item() == 14


@pytest.mark.parametrize("loss_type", list(ATTENTION_LOSSES))
def test_separate_query_and_key_masks(loss_type, mask):
    """Queries: only supervised positions; keys: every real token (prompt included)."""
    s = causal_maps(3, 2, 6, seed=0)
    t = causal_maps(3, 4, 6, seed=1, mask=mask)
    supervised = mask.clone()
    supervised[:, :3] = False
    value, count = attention_loss(s, t, supervised, key_mask=mask, loss_type=loss_type)
    assert count.item() == supervised.sum().item()
    assert value.item() == pytest.approx(reference(loss_type, s, t, supervised, mask), rel=1e-10)
    only_supervised_keys, _ = attention_loss(s, t, supervised, loss_type=loss_type)
    assert only_supervised_keys.item() == pytest.approx(reference(loss_type, s, t, supervised), rel=1e-10)
    assert only_supervised_keys.item() != pytest.approx(value.item(), rel=1e-3)
    with pytest.raises(ValueError, match="key_mask shape"):
        attention_loss(s, t, supervised, key_mask=mask[:, :4])


@pytest.mark.parametrize("loss_type", list(ATTENTION_LOSSES))
def test_head_grouping_equals_explicit_teacher_average(loss_type, mask):
    s = causal_maps(3, 2, 6, seed=0, mask=mask)
    t = causal_maps(3, 4, 6, seed=1, mask=mask)
    averaged = torch.stack([t[:, 0:2].mean(1), t[:, 2:4].mean(1)], dim=1)
    grouped, _ = attention_loss(s, t, mask, loss_type=loss_type)
    explicit, _ = attention_loss(s, averaged, mask, loss_type=loss_type)
    assert torch.allclose(grouped, explicit, rtol=1e-12)


@pytest.mark.parametrize("loss_type", list(ATTENTION_LOSSES))
def test_padding_values_never_count(loss_type, mask):
    s = causal_maps(3, 2, 6, seed=0, mask=mask)
    t = causal_maps(3, 4, 6, seed=1, mask=mask)
    base, _ = attention_loss(s, t, mask, loss_type=loss_type)
    g = torch.Generator().manual_seed(5)
    pad_query = ~mask[:, None, :, None]  # padded query rows
    pad_key = ~mask[:, None, None, :]  # padded key columns
    junk_s = torch.rand(s.shape, generator=g, dtype=torch.float64)
    junk_t = torch.rand(t.shape, generator=g, dtype=torch.float64)
    s2 = torch.where(pad_query | pad_key, junk_s, s).requires_grad_(True)
    t2 = torch.where(pad_query | pad_key, junk_t, t)
    value, _ = attention_loss(s2, t2, mask, loss_type=loss_type)
    assert value.item() == pytest.approx(base.item(), rel=1e-12)
    value.backward()
    assert torch.isfinite(s2.grad).all()
    assert (s2.grad.masked_select(pad_query.expand_as(s2) | pad_key.expand_as(s2)) == 0).all()


def test_kl_zero_for_same_maps_and_positive_otherwise(mask):
    s = causal_maps(3, 2, 6, seed=0, mask=mask)
    assert attention_loss(s, s.clone(), mask)[0].abs().item() < 1e-12
    assert attention_loss(s, causal_maps(3, 2, 6, seed=3, mask=mask), mask)[0].item() > 0


def test_no_mask_counts_every_row():
    s, t = causal_maps(2, 2, 5, seed=0), causal_maps(2, 2, 5, seed=1)
    value, count = attention_loss(s, t, None, loss_type="mse")
    assert count.item() == 10
    ones = torch.ones(2, 5, dtype=torch.bool)
    assert value.item() == pytest.approx(reference("mse", s, t, ones), rel=1e-10)


@pytest.mark.parametrize("loss_type", list(ATTENTION_LOSSES))
def test_gradcheck_through_softmax(loss_type, mask):
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(3, 2, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    t = causal_maps(3, 4, 6, seed=1, mask=mask)

    def fn(x):
        probs = torch.softmax(x.masked_fill(~causal, float("-inf")), -1)
        return attention_loss(probs, t, mask, loss_type=loss_type)[0]

    assert torch.autograd.gradcheck(fn, (scores,))


def test_errors(mask):
    s = causal_maps(3, 2, 6, seed=0)
    with pytest.raises(ValueError, match=r"teacher has 3 heads and the student 2"):
        attention_loss(s, causal_maps(3, 3, 6, seed=1), mask)
    with pytest.raises(ValueError, match="teacher has 2 heads and the student 4"):
        attention_loss(causal_maps(3, 4, 6, seed=0), s, mask)
    with pytest.raises(ValueError, match="eager"):
        attention_loss(s[0], s[0], mask)
    with pytest.raises(ValueError, match="same inputs"):
        attention_loss(s, causal_maps(3, 2, 5, seed=1), mask)
    with pytest.raises(ValueError, match="mask shape"):
        attention_loss(s, s, mask[:, :5])
    with pytest.raises(ValueError, match="choose one of"):
        attention_loss(s, s, mask, loss_type="js")


def test_tiny_llama_attentions_with_left_padding():
    """Real eager attention maps of a 2-head student vs a 4-head teacher, paired by the uniform layer map."""
    student = make_llama(num_layers=2, hidden=32, heads=2, seed=0, attn_implementation="eager")
    teacher = make_llama(num_layers=4, hidden=64, heads=4, seed=1, attn_implementation="eager")
    ids = torch.randint(4, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    attn_mask = torch.ones(2, 7, dtype=torch.long)
    attn_mask[1, :3] = 0  # left padding
    s_out = student(input_ids=ids, attention_mask=attn_mask, output_attentions=True)
    with torch.no_grad():
        t_out = teacher(input_ids=ids, attention_mask=attn_mask, output_attentions=True)
    layer_map = uniform_layer_map(2, 4)
    mask = attn_mask.bool()
    total = sum(
        attention_loss(s_out.attentions[i - 1], t_out.attentions[j - 1], mask)[0] for i, j in layer_map.items()
    )
    assert torch.isfinite(total) and total.item() > 0
    total.backward()
    grads = [p.grad for p in student.model.layers[0].self_attn.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # changing the padded tokens' ids changes nothing for the valid rows
    ids2 = ids.clone()
    ids2[1, :3] = 5
    with torch.no_grad():
        s2 = student(input_ids=ids2, attention_mask=attn_mask, output_attentions=True).attentions
        t2 = teacher(input_ids=ids2, attention_mask=attn_mask, output_attentions=True).attentions
        again = sum(attention_loss(s2[i - 1], t2[j - 1], mask)[0] for i, j in layer_map.items())
    assert again.item() == pytest.approx(total.item(), rel=1e-5)
