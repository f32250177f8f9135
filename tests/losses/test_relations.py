"""Relation losses against float64 loop references, invariances, batch-size errors, pooling, gradcheck."""

import itertools
import math

import pytest
import torch

from hf_distill.losses import RELATION_LOSSES, pool, relation_loss
from hf_distill.losses.relations import fsp, gram, rkd_angle, rkd_distance, similarity_preserving


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def dist(a: list[float], b: list[float]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def ref_similarity_preserving(s: torch.Tensor, t: torch.Tensor) -> float:
    def normalised_gram(f):
        rows = f.tolist()
        g = [[dot(a, b) for b in rows] for a in rows]
        return [[x / math.sqrt(sum(y * y for y in row)) for x in row] for row in g]

    gs, gt = normalised_gram(s), normalised_gram(t)
    b = len(gs)
    return sum((gs[i][j] - gt[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def ref_rkd_distance(s: torch.Tensor, t: torch.Tensor) -> float:
    def psi(f):
        rows = f.tolist()
        pairs = [(i, j) for i in range(len(rows)) for j in range(len(rows)) if i != j]
        d = {p: dist(rows[p[0]], rows[p[1]]) for p in pairs}
        mu = sum(d.values()) / len(d)
        return {p: v / mu for p, v in d.items()}

    ps, pt = psi(s), psi(t)
    return sum(huber(ps[p] - pt[p]) for p in ps) / len(ps)


def ref_rkd_angle(s: torch.Tensor, t: torch.Tensor) -> float:
    def psi(f):
        rows = f.tolist()
        out = {}
        for i, j, k in itertools.permutations(range(len(rows)), 3):
            e_ji = [a - b for a, b in zip(rows[i], rows[j])]
            e_jk = [a - b for a, b in zip(rows[k], rows[j])]
            out[i, j, k] = dot(e_ji, e_jk) / (math.sqrt(dot(e_ji, e_ji)) * math.sqrt(dot(e_jk, e_jk)))
        return out

    ps, pt = psi(s), psi(t)
    return sum(huber(ps[p] - pt[p]) for p in ps) / len(ps)


def ref_gram(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> float:
    total = 0.0
    for b in range(s.shape[0]):
        valid = [i for i in range(s.shape[1]) if mask[b, i]]

        def cos(f, i, j, b=b):
            a, c = f[b, i].tolist(), f[b, j].tolist()
            return dot(a, c) / math.sqrt(dot(a, a) * dot(c, c))

        sq = [(cos(s, i, j) - cos(t, i, j)) ** 2 for i in valid for j in valid]
        total += sum(sq) / len(sq)
    return total / s.shape[0]


def ref_fsp(s1, s2, t1, t2, mask) -> float:
    total = 0.0
    for b in range(s1.shape[0]):
        valid = [i for i in range(s1.shape[1]) if mask[b, i]]

        def matrix(f1, f2, b=b, valid=valid):
            return [
                [sum(f1[b, n, x].item() * f2[b, n, y].item() for n in valid) / len(valid) for y in range(f2.shape[2])]
                for x in range(f1.shape[2])
            ]

        gs, gt = matrix(s1, s2), matrix(t1, t2)
        entries = [(gs[x][y] - gt[x][y]) ** 2 for x in range(len(gs)) for y in range(len(gs[0]))]
        total += sum(entries) / len(entries)
    return total / s1.shape[0]


@pytest.fixture
def pooled():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    t = torch.randn(3, 5, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    return s, t, mask


POOLED_REFERENCES = {
    similarity_preserving: ref_similarity_preserving,
    rkd_distance: ref_rkd_distance,
    rkd_angle: ref_rkd_angle,
}


@pytest.mark.parametrize("fn", list(POOLED_REFERENCES), ids=lambda f: f.__name__)
def test_pooled_losses_match_loops(fn, pooled):
    s, t = pooled
    value = fn(s, t)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(POOLED_REFERENCES[fn](s, t), rel=1e-10)
    # half-precision inputs are computed in fp32
    assert fn(s.bfloat16(), t.bfloat16()).dtype == torch.float32


def test_huber_branch_is_exercised(pooled):
    """Spread the student far apart so some normalised-distance gaps exceed 1 (the linear branch of Huber)."""
    s, t = pooled
    s = s.clone()
    s[0] *= 40
    value = rkd_distance(s, t)
    assert value.item() == pytest.approx(ref_rkd_distance(s, t), rel=1e-10)


def test_gram_and_fsp_match_loops(tokens):
    s, t, mask = tokens
    assert gram(s, t, mask).item() == pytest.approx(ref_gram(s, t, mask), rel=1e-10)
    g = torch.Generator().manual_seed(3)
    s2, t1, t2 = (torch.randn(3, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    assert fsp(s, s2, t1, t2, mask).item() == pytest.approx(ref_fsp(s, s2, t1, t2, mask), rel=1e-10)


def test_invariances(pooled):
    s, t = pooled
    rotation, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    assert similarity_preserving(s, 2.5 * s).item() < 1e-12  # scale
    assert similarity_preserving(s, s @ rotation).item() < 1e-12  # rotation
    assert rkd_distance(s, 3 * s + 1).item() < 1e-12  # scale + translation
    assert rkd_distance(s, s @ rotation).item() < 1e-12
    assert rkd_angle(s, 0.5 * s - 2).item() < 1e-12
    assert rkd_angle(s, s @ rotation).item() < 1e-12
    for fn in POOLED_REFERENCES:
        assert fn(s, t).item() > 0


def test_token_losses_ignore_padding(tokens):
    s, t, mask = tokens
    junk = torch.full_like(s, float("nan"))
    s2 = torch.where(mask[..., None], s, junk).requires_grad_(True)
    t2 = torch.where(mask[..., None], t, 1e3)
    value = gram(s2, t2, mask)
    assert value.item() == pytest.approx(gram(s, t, mask).item(), rel=1e-12)
    value.backward()
    assert torch.isfinite(s2.grad).all()
    assert gram(s, s * 4, mask).item() < 1e-12
    s_b, t_b = torch.randn_like(s), torch.randn_like(s)
    value = fsp(torch.where(mask[..., None], s, junk), s_b, torch.where(mask[..., None], s, 7.0), t_b, mask)
    assert value.item() == pytest.approx(fsp(s, s_b, s, t_b, mask).item(), rel=1e-12)


@pytest.mark.parametrize("name", ["similarity_preserving", "rkd_distance", "rkd_angle"])
def test_batch_size_one_raises(name):
    x = torch.randn(1, 4)
    with pytest.raises(ValueError, match="relation losses need batch size >= 2; increase per_device_train_batch_size"):
        RELATION_LOSSES[name](x, x)
    with pytest.raises(ValueError, match="batch size >= 2"):
        relation_loss([torch.randn(1, 3, 4)], [torch.randn(1, 3, 8)], loss_type=name)


def test_rkd_angle_needs_three():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="rkd_angle needs batch size >= 3"):
        rkd_angle(x, x)


def test_token_losses_work_with_batch_size_one(tokens):
    s, t, mask = tokens
    assert torch.isfinite(gram(s[:1], t[:1], mask[:1]))
    assert torch.isfinite(relation_loss([s[:1], s[:1]], [s[:1], 2 * s[:1]], mask[:1], loss_type="fsp"))


@pytest.mark.parametrize("name", list(RELATION_LOSSES))
def test_gradcheck(name, tokens):
    s, t, mask = tokens
    s = s[:, :, :3].clone().requires_grad_(True)
    t3 = t[:, :, :3]
    if name == "fsp":
        args = lambda x: ([x, x.flip(-1)], [t3, t3 * 0.5])  # noqa: E731
    else:
        args = lambda x: ([x], [t])  # noqa: E731
    for pooling in ("mean", "last"):
        assert torch.autograd.gradcheck(
            lambda x, pooling=pooling: relation_loss(*args(x), mask, loss_type=name, pooling=pooling), (s,)
        )


def test_pool(tokens):
    s, _, mask = tokens
    for b in range(3):
        valid = [i for i in range(5) if mask[b, i]]
        assert torch.allclose(pool(s, mask, "mean")[b], s[b, valid].mean(0))
        assert torch.equal(pool(s, mask, "first")[b], s[b, valid[0]])
        assert torch.equal(pool(s, mask, "last")[b], s[b, valid[-1]])
    assert torch.allclose(pool(s), s.mean(1))
    assert torch.equal(pool(s, None, "last"), s[:, -1])
    with pytest.raises(ValueError, match="choose one of"):
        pool(s, mask, "max")
    with pytest.raises(ValueError, match="at least one"):
        pool(s, torch.zeros_like(mask))


def test_relation_loss_dispatch(tokens):
    s, t, mask = tokens
    g = torch.Generator().manual_seed(9)
    s_b, t_b = torch.randn(s.shape, generator=g, dtype=torch.float64), torch.randn(t.shape, generator=g).double()
    for how in ("mean", "first", "last"):
        expected = (
            similarity_preserving(pool(s, mask, how), pool(t, mask, how))
            + similarity_preserving(pool(s_b, mask, how), pool(t_b, mask, how))
        ) / 2
        got = relation_loss([s, s_b], [t, t_b], mask, loss_type="similarity_preserving", pooling=how)
        assert torch.allclose(got, expected)
    got = relation_loss([s, s_b], [t, t_b], mask, loss_type="gram")
    assert torch.allclose(got, (gram(s, t, mask) + gram(s_b, t_b, mask)) / 2)
    layers_s = [s, s_b, s * 2]
    layers_t = [s_b, s, s_b * 3]
    got = relation_loss(layers_s, layers_t, mask, loss_type="fsp")
    expected = (fsp(s, s_b, s_b, s, mask) + fsp(s_b, s * 2, s, s_b * 3, mask)) / 2
    assert torch.allclose(got, expected)


def test_relation_loss_errors(tokens):
    s, t, mask = tokens
    with pytest.raises(ValueError, match="student widths"):
        relation_loss([s, s], [t, t], mask, loss_type="fsp")
    with pytest.raises(ValueError, match="at least two mapped layer pairs"):
        relation_loss([s], [s], mask, loss_type="fsp")
    with pytest.raises(ValueError, match="same non-zero number"):
        relation_loss([s], [t, t], mask)
    with pytest.raises(ValueError, match="choose one of"):
        relation_loss([s], [t], mask, loss_type="cka")
    with pytest.raises(ValueError, match="Pool token features"):
        similarity_preserving(s, t)
