"""Float64 references for TAID, ABKD and AKL written from each paper's formula on explicit probabilities.

Independent of `hf_distill.losses` (no shared helpers): explicit powers of probabilities, a per-row loop for AKL's
head/tail split. The stop-gradients the papers prescribe (TAID's target, AKL's weights) are kept, so autograd through
these gives the gradients the method trains with.
"""

import torch


# Losses whose gradient is a surrogate (part of the formula carries no gradient): a numerical gradcheck of the whole
# formula does not apply; tests compare with the references below instead.
STOP_GRADIENT = {"taid", "akl"}
# Hyper-parameters the table-driven tests pass to every divergence (each reads only its own).
NEW_HYPER = {"taid_t": 0.6, "ab_alpha": 0.7, "ab_beta": 0.4, "akl_mu": 0.5}


def _softmax(logits, temperature):
    return torch.softmax(logits.double() / temperature, dim=-1)


def _kl(p, q):
    return (p * (p.log() - q.log())).sum(-1)


def taid_reference(s_logits, t_logits, temperature=1.0, taid_t=0.6):
    """Shing et al. 2025, eq. for p_t: softmax((1 - t) * sg(z_s) + t * z_t) on tempered logits; J = KL(p_t || q)."""
    z_s, z_t = s_logits.double() / temperature, t_logits.double() / temperature
    target = torch.softmax((1 - taid_t) * z_s.detach() + taid_t * z_t, dim=-1)
    return _kl(target, torch.softmax(z_s, dim=-1))


def ab_reference(s_logits, t_logits, temperature=1.0, ab_alpha=0.7, ab_beta=0.4):
    """Wang et al. 2025 (Cichocki et al. 2011) D_AB^(a,b)(p || q), p = teacher, q = student, with its limits."""
    p, q = _softmax(t_logits, temperature), _softmax(s_logits, temperature)
    a, b = ab_alpha, ab_beta
    if a == 0 and b == 0:
        return 0.5 * ((p.log() - q.log()) ** 2).sum(-1)
    if b == 0:
        return (p**a * (p**a / q**a).log() - p**a + q**a).sum(-1) / a**2
    if a == 0:
        return (q**b * (q**b / p**b).log() - q**b + p**b).sum(-1) / b**2
    return -(p**a * q**b - a / (a + b) * p ** (a + b) - b / (a + b) * q ** (a + b)).sum(-1) / (a * b)


def akl_reference(s_logits, t_logits, temperature=1.0, akl_mu=0.5):
    """Wu et al. 2025: head = teacher-sorted tokens before the cumulative teacher mass exceeds mu (top token always),
    g_head / g_tail = sum |p - q| over each part, AKL = g_head / g * FKL + g_tail / g * RKL, weights without
    gradient."""
    p, q = _softmax(t_logits, temperature), _softmax(s_logits, temperature)
    flat_p, flat_q = p.reshape(-1, p.shape[-1]).detach(), q.reshape(-1, q.shape[-1]).detach()
    weights = []
    for row_p, row_q in zip(flat_p.tolist(), flat_q.tolist()):
        order = sorted(range(len(row_p)), key=lambda i: -row_p[i])
        g_head = g_tail = cumulative = 0.0
        for rank, i in enumerate(order):
            cumulative += row_p[i]
            gap = abs(row_p[i] - row_q[i])
            if rank == 0 or cumulative <= akl_mu:
                g_head += gap
            else:
                g_tail += gap
        weights.append(g_head / (g_head + g_tail) if g_head + g_tail > 0 else 0.5)
    w_head = torch.tensor(weights, dtype=torch.float64).reshape(p.shape[:-1])
    return w_head * _kl(p, q) + (1 - w_head) * _kl(q, p)


def new_reference(loss_type, s_logits, t_logits, temperature=1.0, **hyper):
    """Per-position reference of taid / ab_divergence / akl with `hyper` (defaults `NEW_HYPER`)."""
    h = {**NEW_HYPER, **hyper}
    if loss_type == "taid":
        return taid_reference(s_logits, t_logits, temperature, h["taid_t"])
    if loss_type == "ab_divergence":
        return ab_reference(s_logits, t_logits, temperature, h["ab_alpha"], h["ab_beta"])
    if loss_type == "akl":
        return akl_reference(s_logits, t_logits, temperature, h["akl_mu"])
    raise KeyError(loss_type)
