"""Hint losses against float64 per-position loops, masking, normalisation, gradcheck; layer-map parsing."""

import json
import math

import pytest
import torch

from hf_distill.losses import HINT_LOSSES, hint_loss, parse_layer_map, uniform_layer_map
from hf_distill.losses.features import hint_count, hint_normalize


def reference_position(loss_type: str, s: list[float], t: list[float]) -> float:
    """One position's loss from plain Python floats."""
    h = len(s)
    if loss_type == "mse":
        return sum((a - b) ** 2 for a, b in zip(s, t)) / h
    if loss_type == "l1":
        return sum(abs(a - b) for a, b in zip(s, t)) / h
    if loss_type == "smooth_l1":
        return sum(0.5 * (a - b) ** 2 if abs(a - b) < 1 else abs(a - b) - 0.5 for a, b in zip(s, t)) / h
    if loss_type == "cosine":
        dot = sum(a * b for a, b in zip(s, t))
        norm_s = math.sqrt(sum(a * a for a in s))
        norm_t = math.sqrt(sum(b * b for b in t))
        return 1 - dot / (norm_s * norm_t)
    raise KeyError(loss_type)


@pytest.fixture
def hidden():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 4, 6, generator=g, dtype=torch.float64) * 1.5
    t = torch.randn(3, 4, 6, generator=g, dtype=torch.float64) * 1.5
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
    return s, t, mask


@pytest.mark.parametrize("loss_type", list(HINT_LOSSES))
def test_matches_per_position_loop(loss_type, hidden):
    s, t, mask = hidden
    expected = sum(
        reference_position(loss_type, s[b, i].tolist(), t[b, i].tolist())
        for b in range(3)
        for i in range(4)
        if mask[b, i]
    )
    value, count = hint_loss(s, t, mask, loss_type=loss_type)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(expected, rel=1e-10)
    assert count.item() == 8
    everything = sum(
        reference_position(loss_type, s[b, i].tolist(), t[b, i].tolist()) for b in range(3) for i in range(4)
    )
    assert HINT_LOSSES[loss_type](s, t).item() == pytest.approx(everything, rel=1e-10)
    assert hint_count(None, s).item() == 12


@pytest.mark.parametrize("loss_type", list(HINT_LOSSES))
def test_padded_positions_never_count(loss_type, hidden):
    s, t, mask = hidden
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = float("nan")
    t2[~mask] = 1e6
    s2.requires_grad_(True)
    value, _ = hint_loss(s2, t2, mask, loss_type=loss_type)
    value.backward()
    assert value.item() == pytest.approx(hint_loss(s, t, mask, loss_type=loss_type)[0].item(), rel=1e-12)
    assert torch.isfinite(s2.grad).all() and (s2.grad[~mask] == 0).all()


@pytest.mark.parametrize("loss_type", list(HINT_LOSSES))
def test_zero_for_identical_and_fp32_for_half_inputs(loss_type, hidden):
    s, _, mask = hidden
    assert hint_loss(s, s.clone(), mask, loss_type=loss_type)[0].abs().item() < 1e-12
    value, _ = hint_loss(s.bfloat16(), (s + 0.5).bfloat16(), mask, loss_type=loss_type)
    assert value.dtype == torch.float32


@pytest.mark.parametrize("loss_type", list(HINT_LOSSES))
def test_gradcheck(loss_type, hidden):
    s, t, mask = hidden
    s = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: hint_loss(x, t, mask, loss_type=loss_type)[0], (s,))
    assert torch.autograd.gradcheck(
        lambda x: hint_loss(x, t, mask, loss_type=loss_type, normalize="layernorm")[0], (s,)
    )


def test_layernorm_normalization_matches_formula(hidden):
    s, t, mask = hidden
    mean = s.mean(-1, keepdim=True)
    var = s.var(-1, unbiased=False, keepdim=True)
    assert torch.allclose(hint_normalize(s, "layernorm"), (s - mean) / torch.sqrt(var + 1e-5))
    assert hint_normalize(s, "none") is s
    # layernorm removes scale and shift differences between the two sides
    value, _ = hint_loss(3 * t + 2, t, mask, loss_type="mse", normalize="layernorm")
    assert value.item() < 1e-5
    with pytest.raises(ValueError, match="layernorm"):
        hint_normalize(s, "batchnorm")


def test_errors(hidden):
    s, t, mask = hidden
    with pytest.raises(ValueError, match="project the student"):
        hint_loss(s[..., :4], t, mask)
    with pytest.raises(ValueError, match="mask shape"):
        hint_loss(s, t, mask[:, :3])
    with pytest.raises(ValueError, match="choose one of"):
        hint_loss(s, t, mask, loss_type="kl")


def test_empty_mask_gives_zero(hidden):
    s, t, mask = hidden
    value, count = hint_loss(s, t, torch.zeros_like(mask), loss_type="cosine")
    assert value.item() == 0 and count.item() == 0


# ----------------------------------------------------------------------------------------------- layer maps
@pytest.mark.parametrize(
    ("n_s", "n_t", "expected"),
    [
        (2, 4, {1: 2, 2: 4}),
        (3, 12, {1: 4, 2: 8, 3: 12}),
        (4, 30, {1: 8, 2: 15, 3: 23, 4: 30}),
        (3, 3, {1: 1, 2: 2, 3: 3}),
        (4, 2, {1: 1, 2: 1, 3: 2, 4: 2}),
    ],
)
def test_uniform_layer_map(n_s, n_t, expected):
    got = uniform_layer_map(n_s, n_t)
    assert got == expected
    assert got[n_s] == n_t and min(got.values()) >= 1
    assert parse_layer_map("uniform", n_s, n_t) == expected
    assert parse_layer_map(" Uniform ", n_s, n_t) == expected


def test_parse_layer_map_dict_and_json():
    expected = {0: 0, 1: 3, 2: 6}
    assert parse_layer_map({2: 6, 1: 3, 0: 0}, 2, 6) == expected
    assert list(parse_layer_map({2: 6, 1: 3, 0: 0}, 2, 6)) == [0, 1, 2]
    assert parse_layer_map({"1": 3, "2": "6", "0": 0}, 2, 6) == expected
    assert parse_layer_map(json.dumps({"1": 3, "2": 6, "0": 0}), 2, 6) == expected
    assert parse_layer_map({1: 6, 2: 6}, 2, 6) == {1: 6, 2: 6}  # several students may read one teacher layer


@pytest.mark.parametrize(
    "bad",
    [{3: 1}, {1: 7}, {-1: 2}, {"1": -2}, '{"9": 1}'],
)
def test_parse_layer_map_out_of_range_lists_valid_ranges(bad):
    with pytest.raises(ValueError, match=r"student layers are 0\.\.2 and teacher layers 0\.\.6"):
        parse_layer_map(bad, 2, 6)


@pytest.mark.parametrize("bad", ["{not json", "[1, 2]", {}, {1: "x"}, {1.5: 2}, {True: 1}, {1: 2, "1": 3}, 5])
def test_parse_layer_map_rejects_malformed(bad):
    with pytest.raises(ValueError):
        parse_layer_map(bad, 2, 6)
