import math

import torch
import torch.nn.functional as F
from conftest import make_llama

from hf_distill.evaluation import teacher_student_metrics


def batch():
    ids = torch.tensor([[2, 6, 7, 8, 9, 0], [2, 10, 11, 12, 13, 14]])
    labels = ids.clone()
    labels[0, 0:2] = -100  # prompt
    labels[0, 5] = -100  # padding
    return {"input_ids": ids, "attention_mask": (labels != -100) | (torch.arange(6) < 5), "labels": labels}


def test_self_agreement():
    model = make_llama(2, 32)
    m = teacher_student_metrics(model, model, [batch()])
    assert abs(m["kl"]) < 1e-6 and m["top1_agreement"] == 1.0
    assert math.isclose(m["perplexity"], m["teacher_perplexity"])
    assert m["tokens"] == 3 + 5


def test_matches_manual_computation():
    student, teacher = make_llama(2, 32), make_llama(4, 64, seed=1)
    b = batch()
    m = teacher_student_metrics(student, teacher, [b, b])
    with torch.no_grad():
        s = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    mask = b["labels"][:, 1:] != -100
    s, t, y = s[mask], t[mask], b["labels"][:, 1:][mask]
    kl = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean()
    assert math.isclose(m["kl"], kl.item(), rel_tol=1e-5)
    assert math.isclose(m["perplexity"], math.exp(F.cross_entropy(s, y).item()), rel_tol=1e-5)
    assert m["top1_agreement"] == (s.argmax(-1) == t.argmax(-1)).float().mean().item()
