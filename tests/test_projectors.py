"""Hint projectors: kinds, width checks, bit-exact safetensors round trip, and a hint step on tiny Llamas."""

import pytest
import torch
from conftest import make_llama
from safetensors import safe_open

from hf_distill.features.projectors import (
    PROJECTOR_KINDS,
    PROJECTORS_FILENAME,
    HintProjectors,
    load_projectors,
    save_projectors,
)
from hf_distill.losses import hint_loss, parse_layer_map


def test_kinds_and_shapes():
    x = torch.randn(2, 5, 8)
    linear = HintProjectors({1: (8, 16), 3: (8, 16)}, kind="linear")
    assert list(linear.projectors) == ["1", "3"]
    assert linear(1, x).shape == (2, 5, 16) and linear("3", x).shape == (2, 5, 16)
    assert torch.allclose(linear(1, x), x @ linear.projectors["1"].weight.T + linear.projectors["1"].bias)
    mlp = HintProjectors.from_layer_map({2: 4}, student_width=8, teacher_width=16, kind="mlp")
    assert mlp(2, x).shape == (2, 5, 16)
    assert sum(p.numel() for p in mlp.parameters()) == 8 * 16 + 16 + 16 * 16 + 16
    identity = HintProjectors({1: (8, 8)}, kind="identity")
    assert identity(1, x) is x
    assert len(list(identity.parameters())) == 0
    with pytest.raises(KeyError, match="configured layers"):
        linear(2, x)
    both = linear({"1": x, 3: 2 * x})  # one forward call for every hint layer (DDP-friendly)
    assert set(both) == {1, 3}
    assert torch.equal(both[1], linear(1, x)) and torch.equal(both[3], linear(3, 2 * x))
    with pytest.raises(ValueError, match="not both"):
        linear({1: x}, x)


def test_identity_width_mismatch_names_both_widths():
    with pytest.raises(ValueError, match=r"student layer 2 has width 32 and its teacher layer 64.*'linear'"):
        HintProjectors({2: (32, 64)}, kind="identity")
    with pytest.raises(ValueError, match="choose one of"):
        HintProjectors({2: (32, 64)}, kind="conv")


def test_half_precision_input_is_cast_to_projector_dtype():
    proj = HintProjectors({1: (8, 16)}, kind="linear")
    assert proj(1, torch.randn(2, 3, 8, dtype=torch.bfloat16)).dtype == torch.float32


@pytest.mark.parametrize("kind", PROJECTOR_KINDS)
def test_save_load_bit_exact(kind, tmp_path):
    widths = {0: (8, 8), 2: (8, 8)} if kind == "identity" else {0: (8, 16), 2: (8, 16)}
    torch.manual_seed(0)
    saved = HintProjectors(widths, kind=kind)
    with torch.no_grad():  # make the weights differ from any default initialisation
        for p in saved.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    path = save_projectors(saved, tmp_path)
    assert path.endswith(PROJECTORS_FILENAME)
    torch.manual_seed(123)
    fresh = HintProjectors(widths, kind=kind)
    assert load_projectors(fresh, tmp_path) is fresh
    for (name, a), (_, b) in zip(saved.state_dict().items(), fresh.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
        assert a.view(torch.int32).equal(b.view(torch.int32))  # same bits, not merely close
    x = torch.randn(2, 3, 8)
    assert torch.equal(saved(2, x), fresh(2, x))
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["kind"] == kind


def test_load_rejects_other_configuration(tmp_path):
    save_projectors(HintProjectors({1: (8, 16)}, kind="linear"), tmp_path)
    with pytest.raises(ValueError, match="same hint_layers and hint_projector"):
        load_projectors(HintProjectors({1: (8, 16)}, kind="mlp"), tmp_path)
    with pytest.raises(ValueError, match="same hint_layers and hint_projector"):
        load_projectors(HintProjectors({2: (8, 16)}, kind="linear"), tmp_path)
    with pytest.raises(FileNotFoundError, match=PROJECTORS_FILENAME):
        load_projectors(HintProjectors({1: (8, 16)}), tmp_path / "nowhere")


def test_hint_step_on_tiny_llamas():
    """Student (2 layers, width 32) hints to teacher (4 layers, width 64): gradients reach student and projectors,
    and a few optimiser steps reduce the hint loss."""
    student = make_llama(num_layers=2, hidden=32, seed=0)
    teacher = make_llama(num_layers=4, hidden=64, seed=1).eval()
    layer_map = parse_layer_map("uniform", 2, 4)
    torch.manual_seed(0)
    projectors = HintProjectors.from_layer_map(layer_map, 32, 64, kind="linear")
    ids = torch.randint(4, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    attn = torch.ones(2, 6, dtype=torch.long)
    attn[0, 4:] = 0
    mask = attn.bool()
    with torch.no_grad():
        t_hidden = teacher(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states
    optimizer = torch.optim.Adam([*student.parameters(), *projectors.parameters()], lr=1e-2)
    losses = []
    for _ in range(5):
        s_hidden = student(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states
        total, count = 0.0, 0
        for i, j in layer_map.items():
            value, n = hint_loss(projectors(i, s_hidden[i]), t_hidden[j], mask, loss_type="mse", normalize="layernorm")
            total, count = total + value, count + n
        loss = total / count
        optimizer.zero_grad()
        loss.backward()
        assert projectors.projectors["1"].weight.grad.abs().sum() > 0
        assert student.model.embed_tokens.weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert count.item() == 2 * mask.sum().item()
    assert losses[-1] < losses[0]
