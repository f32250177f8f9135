"""`fused_logit_distillation_loss` against the materialised `logit_distillation_loss` and a float64 reference."""

import pytest
import torch
import torch.nn.functional as F
from paper_divergences import NEW_HYPER, STOP_GRADIENT, new_reference
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from hf_distill.losses import LOGIT_LOSSES, fused_logit_distillation_loss, logit_distillation_loss


LOSS_TYPES = sorted(LOGIT_LOSSES)
HYPER = {"temperature": 1.7, "beta": 0.3, "skew_alpha": 0.2, **NEW_HYPER}
HEADS = {  # student head variants: bias, logit scale, final-logit softcap (teacher gets its own variant)
    "plain": {},
    "bias_scale": {"bias": True, "student_logit_scale": 1.3, "teacher_logit_scale": 0.8},
    "softcap": {"student_softcap": 2.5, "teacher_softcap": 4.0, "student_logit_scale": 1.5},
}


def make_inputs(n=23, h_s=12, h_t=10, vocab=37, lead=None, dtype=torch.float32, bias=False, seed=0):
    torch.manual_seed(seed)
    shape = lead if lead is not None else (n,)
    s_hidden = torch.randn(*shape, h_s, dtype=dtype, requires_grad=True)
    s_weight = torch.randn(vocab, h_s, dtype=dtype, requires_grad=True)
    t_hidden = torch.randn(*shape, h_t, dtype=dtype)
    t_weight = 1.5 * torch.randn(vocab, h_t, dtype=dtype)
    s_bias = torch.randn(vocab, dtype=dtype, requires_grad=True) if bias else None
    t_bias = torch.randn(vocab, dtype=dtype) if bias else None
    return s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias


def head_logits(hidden, weight, bias=None, scale=1.0, softcap=None):
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def materialised(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, head=None, **kwargs):
    head = head or {}
    s_logits = head_logits(
        s_hidden, s_weight, s_bias, head.get("student_logit_scale", 1.0), head.get("student_softcap")
    )
    t_logits = head_logits(
        t_hidden, t_weight, t_bias, head.get("teacher_logit_scale", 1.0), head.get("teacher_softcap")
    )
    return logit_distillation_loss(s_logits, t_logits, **kwargs)


def fused(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, head=None, **kwargs):
    head = {k: v for k, v in (head or {}).items() if k != "bias"}
    return fused_logit_distillation_loss(
        s_hidden, s_weight, t_hidden, t_weight, student_bias=s_bias, teacher_bias=t_bias, **head, **kwargs
    )


def student_grads(loss, inputs):
    params = [t for t in inputs[:3] if t is not None]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_materialised(loss_type, masked, head):
    cfg = HEADS[head]
    lead = (3, 9) if masked else None  # (B, T, H) input for the masked case, (N, H) otherwise
    inputs = make_inputs(lead=lead, bias=cfg.get("bias", False))
    mask = (torch.rand(3, 9) > 0.4) if masked else None
    kwargs = {"loss_type": loss_type, "mask": mask, **HYPER}

    expected = materialised(*inputs, head=cfg, **kwargs)
    expected_grads = student_grads(expected, inputs)
    got = fused(*inputs, head=cfg, chunk_size=5, **kwargs)  # 5 divides neither 27 nor the masked count
    got_grads = student_grads(got, inputs)

    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert expected.item() > 1e-3  # a non-trivial value, so the comparison means something
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("loss_type", "hyper", "same_as"),
    [
        ("jsd", {"beta": 0.0}, "forward_kl"),
        ("jsd", {"beta": 1.0}, "reverse_kl"),
        ("skew_forward_kl", {"skew_alpha": 0.0}, "forward_kl"),
        ("skew_reverse_kl", {"skew_alpha": 0.0}, "reverse_kl"),
    ],
)
def test_exact_endpoints(loss_type, hyper, same_as):
    inputs = make_inputs()
    got = fused(*inputs, loss_type=loss_type, chunk_size=4, **hyper)
    got_grads = student_grads(got, inputs)
    expected = materialised(*inputs, loss_type=same_as)
    expected_grads = student_grads(expected, inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def reference_float64(s_logits, t_logits, loss_type, temperature, beta, skew_alpha, **hyper):
    """Independent float64 formulas on probabilities (not `logits.py`, which computes in fp32)."""
    if loss_type in ("taid", "ab_divergence", "akl"):
        return new_reference(loss_type, s_logits, t_logits, temperature, **hyper).mean()
    p_s = torch.softmax(s_logits / temperature, -1)
    p_t = torch.softmax(t_logits / temperature, -1)

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)

    per_position = {
        "forward_kl": lambda: kl(p_t, p_s),
        "reverse_kl": lambda: kl(p_s, p_t),
        "jsd": lambda: (
            beta * kl(p_t, beta * p_t + (1 - beta) * p_s) + (1 - beta) * kl(p_s, beta * p_t + (1 - beta) * p_s)
        ),
        "skew_forward_kl": lambda: kl(p_t, skew_alpha * p_t + (1 - skew_alpha) * p_s),
        "skew_reverse_kl": lambda: kl(p_s, skew_alpha * p_s + (1 - skew_alpha) * p_t),
        "tvd": lambda: 0.5 * (p_t - p_s).abs().sum(-1),
    }[loss_type]()
    return per_position.mean()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_float64_reference_and_gradcheck(loss_type):
    s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias = make_inputs(n=7, vocab=11, dtype=torch.float64, bias=True)
    cfg = {"student_logit_scale": 1.2, "student_softcap": 3.0}
    got = fused_logit_distillation_loss(
        s_hidden, s_weight, t_hidden, t_weight, student_bias=s_bias, teacher_bias=t_bias, loss_type=loss_type,
        chunk_size=3, **cfg, **HYPER,
    )  # fmt: skip
    s_logits = head_logits(s_hidden, s_weight, s_bias, 1.2, 3.0)
    expected = reference_float64(s_logits, t_hidden @ t_weight.T + t_bias, loss_type, **HYPER)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    for g, e in zip(
        student_grads(got, (s_hidden, s_weight, s_bias)), student_grads(expected, (s_hidden, s_weight, s_bias))
    ):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)

    def loss_of(h, w, b):
        return fused_logit_distillation_loss(
            h, w, t_hidden, t_weight, student_bias=b, teacher_bias=t_bias, loss_type=loss_type, chunk_size=3,
            **cfg, **HYPER,
        )  # fmt: skip

    if loss_type not in STOP_GRADIENT:  # taid / akl: surrogate gradients, compared with the reference above
        assert torch.autograd.gradcheck(loss_of, (s_hidden, s_weight, s_bias))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_all_false_mask_gives_zero_loss_and_zero_grads(loss_type):
    inputs = make_inputs(lead=(2, 5), bias=True)
    labels = torch.randint(0, 37, (2, 5))
    kd, ce = fused(*inputs, loss_type=loss_type, mask=torch.zeros(2, 5, dtype=torch.bool), labels=labels, **HYPER)
    assert kd.item() == 0.0 and ce.item() == 0.0
    for g in student_grads(kd + ce, inputs):
        assert torch.isfinite(g).all() and (g == 0).all()
    nothing = torch.zeros(2, 5, dtype=torch.bool)
    assert materialised(*inputs, loss_type=loss_type, mask=nothing, **NEW_HYPER).item() == 0.0


def test_padded_vocab_is_sliced_to_the_shared_vocabulary():
    real = 37
    s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias = make_inputs(vocab=real + 9, bias=True)
    s_weight = s_weight.detach()[: real + 3].requires_grad_()  # student padded to 40 rows, teacher to 46
    s_bias = s_bias.detach()[: real + 3].requires_grad_()
    got = fused_logit_distillation_loss(
        s_hidden, s_weight, t_hidden, t_weight, student_bias=s_bias, teacher_bias=t_bias, vocab_size=real,
        loss_type="jsd", chunk_size=6,
    )  # fmt: skip
    expected = logit_distillation_loss(
        s_hidden @ s_weight[:real].T + s_bias[:real], t_hidden @ t_weight[:real].T + t_bias[:real], loss_type="jsd"
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    got_grads = torch.autograd.grad(got, (s_hidden, s_weight, s_bias))
    expected_grads = torch.autograd.grad(expected, (s_hidden, s_weight, s_bias))
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert (got_grads[1][real:] == 0).all() and (got_grads[2][real:] == 0).all()  # padding rows get no gradient

    with pytest.raises(ValueError, match="vocab_size=len\\(tokenizer\\)"):
        fused_logit_distillation_loss(s_hidden, s_weight, t_hidden, t_weight)
    with pytest.raises(ValueError, match="vocab_size=41"):
        fused_logit_distillation_loss(s_hidden, s_weight, t_hidden, t_weight, vocab_size=41)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_cross_entropy_in_the_same_pass(reduction, temperature):
    inputs = make_inputs(lead=(3, 8), bias=True)
    s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias = inputs
    head = {"student_logit_scale": 1.1, "student_softcap": 5.0}
    labels = torch.randint(0, 37, (3, 8))
    labels[0, :3] = -100
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[2, 5:] = False  # a masked-out position with a real label: CE must skip it too
    kd, ce = fused(
        *inputs, head=head, loss_type="forward_kl", temperature=temperature, mask=mask, labels=labels,
        chunk_size=7, reduction=reduction,
    )  # fmt: skip

    s_logits = head_logits(s_hidden, s_weight, s_bias, 1.1, 5.0)
    expected_ce = F.cross_entropy(s_logits[mask], labels[mask], ignore_index=-100, reduction=reduction)
    expected_kd = logit_distillation_loss(
        s_logits, t_hidden @ t_weight.T + t_bias, temperature=temperature, mask=mask
    ) * (mask.sum() if reduction == "sum" else 1)
    torch.testing.assert_close(ce, expected_ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kd, expected_kd, rtol=1e-5, atol=1e-5)

    # the two outputs carry separate gradients: any weighted combination matches
    got_grads = student_grads(0.3 * kd + 2.0 * ce, inputs)
    expected_grads = student_grads(0.3 * expected_kd + 2.0 * expected_ce, inputs)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_only_one_output_used_and_no_grad_mode():
    inputs = make_inputs(bias=True)
    labels = torch.randint(0, 37, (23,))
    _, ce = fused(*inputs, labels=labels)
    s_logits = inputs[0] @ inputs[1].T + inputs[2]
    got_grads = student_grads(ce, inputs)  # kd unused: its gradient is None in backward
    expected_grads = student_grads(F.cross_entropy(s_logits, labels), inputs)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)

    with torch.no_grad():
        value = fused(*inputs, loss_type="tvd")
    assert not value.requires_grad
    torch.testing.assert_close(value, materialised(*inputs, loss_type="tvd").detach(), rtol=1e-5, atol=1e-6)


def test_automatic_chunk_size_and_teacher_gets_no_gradient():
    s_hidden, s_weight, _, t_hidden, t_weight, _ = make_inputs()
    t_hidden.requires_grad_()
    got = fused_logit_distillation_loss(s_hidden, s_weight, t_hidden, t_weight, loss_type="reverse_kl")
    expected = logit_distillation_loss(s_hidden @ s_weight.T, (t_hidden @ t_weight.T).detach(), loss_type="reverse_kl")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    got.backward()
    assert t_hidden.grad is None and s_hidden.grad is not None


def test_retained_graph_backward_twice_accumulates():
    inputs = make_inputs(bias=True)
    labels = torch.randint(0, 37, (23,))
    kd, ce = fused(*inputs, labels=labels, loss_type="skew_reverse_kl")
    loss = 0.5 * kd + ce
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in inputs[:3]]
    loss.backward()
    for t, g in zip(inputs[:3], first):
        torch.testing.assert_close(t.grad, 2 * g)


def test_input_errors_name_the_problem():
    s_hidden, s_weight, _, t_hidden, t_weight, _ = make_inputs()
    with pytest.raises(ValueError, match="Unknown loss_type"):
        fused_logit_distillation_loss(s_hidden, s_weight, t_hidden, t_weight, loss_type="kl")
    with pytest.raises(ValueError, match="mask shape"):
        fused_logit_distillation_loss(s_hidden, s_weight, t_hidden, t_weight, mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="same positions"):
        fused_logit_distillation_loss(s_hidden, s_weight, t_hidden[:5], t_weight)
    with pytest.raises(ValueError, match="lm_head weight"):
        fused_logit_distillation_loss(s_hidden, s_weight.T, t_hidden, t_weight)
    with pytest.raises(ValueError, match="reduction"):
        fused_logit_distillation_loss(s_hidden, s_weight, t_hidden, t_weight, reduction="batchmean")


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor any aten op returns (inside autograd Functions too)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def largest_vocab_block_rows(run, vocab):
    """Largest `numel / V` over all tensors with a V-sized dimension created while `run()` executes."""
    with ShapeRecorder() as recorder:
        run()
    return max(
        (torch.Size(s).numel() // vocab for s in recorder.shapes if vocab in s),
        default=0,
    )


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_no_tensor_larger_than_one_chunk_of_logits(loss_type):
    n, h, vocab, chunk = 64, 6, 50, 8  # h < chunk, so the (V, H) weight gradient is below the bound
    s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias = make_inputs(n=n, h_s=h, h_t=h - 1, vocab=vocab, bias=True)
    labels = torch.randint(0, vocab, (n,))
    mask = torch.rand(n) > 0.3

    def run_fused():
        kd, ce = fused_logit_distillation_loss(
            s_hidden, s_weight, t_hidden, t_weight, student_bias=s_bias, teacher_bias=t_bias, loss_type=loss_type,
            mask=mask, labels=labels, chunk_size=chunk, **HYPER,
        )  # fmt: skip
        (kd + ce).backward()

    def run_materialised():
        materialised(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, loss_type=loss_type, **HYPER).backward()

    assert largest_vocab_block_rows(run_materialised, vocab) >= n  # the recorder does see full [N, V] logits
    assert largest_vocab_block_rows(run_fused, vocab) == chunk  # here at most one chunk's block ever exists
    assert s_weight.grad is not None and torch.isfinite(s_weight.grad).all()


def test_stats_count_top1_agreement():
    g = torch.Generator().manual_seed(3)
    hs, ws = torch.randn(13, 8, generator=g), torch.randn(20, 8, generator=g)
    ht, wt = torch.randn(13, 8, generator=g), torch.randn(20, 8, generator=g)
    stats = {}
    fused_logit_distillation_loss(hs, ws, ht, wt, chunk_size=4, stats=stats)
    expected = ((hs @ ws.T).argmax(-1) == (ht @ wt.T).argmax(-1)).sum()
    assert int(stats["top1_agreement"]) == int(expected)
    stats = {}
    fused_logit_distillation_loss(hs, ws, hs, ws, chunk_size=5, stats=stats)
    assert int(stats["top1_agreement"]) == 13


def test_automatic_chunk_size_splits_rows_evenly(monkeypatch):
    import hf_distill.losses.fused as fused_module

    vocab = 37
    monkeypatch.setattr(fused_module, "_AUTO_BLOCK_ELEMENTS", 10 * vocab)  # at most 10 rows per block
    s_hidden, s_weight, _, t_hidden, t_weight, _ = make_inputs(n=23, h_s=6, h_t=5, vocab=vocab)  # H < rows

    def run():
        fused_logit_distillation_loss(s_hidden, s_weight, t_hidden, t_weight, loss_type="jsd").backward()

    assert largest_vocab_block_rows(run, vocab) == 8  # 23 rows in 3 even chunks of <= 8, not 10 + 10 + 3


def test_bfloat16_inputs_match_materialised_bfloat16_logits():
    inputs = make_inputs(dtype=torch.bfloat16, bias=True)
    got = fused(*inputs, loss_type="jsd", chunk_size=6)
    expected = materialised(*inputs, loss_type="jsd")  # bf16 logits, fp32 divergence, as a bf16 model would give
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=1e-3)
    for g, e in zip(student_grads(got, inputs), student_grads(expected, inputs)):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), e.float(), rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("weights", [(0.7, 0.3), (2.0, 0.0), (1.0, 1.0)])
def test_loss_weights_share_one_gradient_buffer(weights):
    g = torch.Generator().manual_seed(4)
    hs = torch.randn(11, 8, generator=g, requires_grad=True)
    ws = torch.randn(20, 8, generator=g, requires_grad=True)
    ht, wt = torch.randn(11, 8, generator=g), torch.randn(20, 8, generator=g)
    labels = torch.randint(0, 20, (11,), generator=g)
    labels[3] = -100
    kw = dict(loss_type="jsd", temperature=2.0, labels=labels, reduction="sum", chunk_size=4)
    kd, ce = fused_logit_distillation_loss(hs, ws, ht, wt, **kw)
    (0.5 * (weights[0] * kd + weights[1] * ce)).backward()
    expected = (hs.grad.clone(), ws.grad.clone())
    hs.grad = ws.grad = None
    kd2, ce2 = fused_logit_distillation_loss(hs, ws, ht, wt, loss_weights=weights, **kw)
    assert torch.equal(kd, kd2) and torch.equal(ce, ce2)
    (0.5 * (weights[0] * kd2 + weights[1] * ce2)).backward()
    assert torch.allclose(hs.grad, expected[0], atol=1e-6) and torch.allclose(ws.grad, expected[1], atol=1e-6)


def test_loss_weights_refuse_other_ratios():
    g = torch.Generator().manual_seed(5)
    hs = torch.randn(5, 8, generator=g, requires_grad=True)
    ws, ht, wt = torch.randn(20, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(20, 8, generator=g)
    kd, ce = fused_logit_distillation_loss(hs, ws, ht, wt, labels=torch.arange(5), loss_weights=(1.0, 1.0))
    with pytest.raises(RuntimeError, match="not in that ratio"):
        (kd + 3 * ce).backward()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_blocks_are_allocated_once_per_call_and_reused_by_every_chunk(loss_type, temperature):
    import hf_distill.losses.fused as fused_module

    n, h, vocab, chunk = 64, 6, 50, 8  # 8 chunks
    s_hidden, s_weight, _, t_hidden, t_weight, _ = make_inputs(n=n, h_s=h, h_t=h - 1, vocab=vocab)
    labels = torch.randint(0, vocab, (n,))
    storages = set()

    class StorageRecorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] == vocab and t.shape[0] > 1:
                    storages.add(t.untyped_storage().data_ptr())
            return out

    with StorageRecorder():
        kd, ce = fused_logit_distillation_loss(
            s_hidden, s_weight, t_hidden, t_weight, loss_type=loss_type, temperature=temperature, labels=labels,
            chunk_size=chunk, loss_weights=(0.5, 0.5), beta=0.3, skew_alpha=0.2, taid_t=0.6,
        )  # fmt: skip
    storages -= {w.untyped_storage().data_ptr() for w in (s_weight, t_weight)}  # `weight.T` views of the inputs
    expected = 2 + fused_module._SCRATCH[loss_type] + (temperature != 1.0)
    if loss_type in fused_module.BY_AUTOGRAD:  # autograd on each chunk: new blocks per chunk, one chunk at a time
        assert len(storages) > expected
    else:
        assert len(storages) == expected  # the same few blocks for all 8 chunks, not new ones per chunk or per op
    (0.5 * kd + 0.5 * ce).backward()
    assert torch.isfinite(s_weight.grad).all()
