"""Online mutual learning (`hf_distill.teachers.peers`): gradients of 2 peers against a float64 reference (dense and
fused), 2 x 2 gradient accumulation equal to a batch of 4, checkpoints of tied peers, every peer saved loadable."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import distill_config, make_llama, one_sgd_step, tokenized_texts
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling

from hf_distill import DistillationTrainer
from hf_distill.heads import detect_head
from hf_distill.student import PeerStudents, peer_folders
from hf_distill.teachers.base import SourceContext
from hf_distill.teachers.peers import MutualLearning
from hf_distill.terms import SupervisedView


TEXTS = ["the cat sat on the mat and the dog sat too", "a dog", "the big red dog is slow", "one plus two"]


def reference_loss(peers64, batch, kd_weight, ce_weight, temperature):
    """sum_i [ce_w * CE_i + kd_w * T^2 * mean_{j != i} KL(sg(p_j) || p_i)] / N, written out in float64."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    rows = [p(**inputs).logits[:, :-1][mask] for p in peers64]
    total = 0.0
    for i, logits in enumerate(rows):
        ce = F.cross_entropy(logits, labels[mask], reduction="sum")
        kl = 0.0
        for j, other in enumerate(rows):
            if j != i:
                q = F.softmax(other.detach() / temperature, -1)
                kl = kl + (q * (q.log() - F.log_softmax(logits / temperature, -1))).sum()
        total = total + ce_weight * ce + kd_weight * temperature**2 * kl / (len(rows) - 1)
    return total / mask.sum()


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("n_peers", [2, 3])
def test_gradients_match_a_float64_reference(tmp_path, tokenizer, fused, n_peers):
    peers = [make_llama(2, 32, seed=s) for s in range(n_peers)]
    peers64 = [copy.deepcopy(p).double() for p in peers]
    model = PeerStudents(peers)
    args = distill_config(tmp_path, kd_weight=0.7, ce_weight=0.3, temperature=2.0, use_fused_kd_loss=fused)
    source = MutualLearning(SourceContext(args, detect_head(model), model))
    assert source.fused == fused and source.name == ("peers-fused" if fused else "peers")
    batch = DataCollatorForLanguageModeling(tokenizer, mlm=False)([tokenizer(t) for t in TEXTS])
    view = SupervisedView.from_batch(batch, detect_head(model))
    out = model(**{k: v for k, v in batch.items() if k != "labels"}, **source.student_forward_kwargs())
    terms = source.terms(out, source.outputs({}, batch), view)
    assert set(terms.sums) == {f"peer{i}_{t}" for i in range(n_peers) for t in ("ce", "kd")}
    loss = terms.total() / view.n_items
    ref = reference_loss(peers64, batch, 0.7, 0.3, 2.0)
    assert torch.allclose(loss.double(), ref, rtol=1e-5)
    loss.backward()
    ref.backward()
    for peer, peer64 in zip(peers, peers64):
        for (name, p), p64 in zip(peer.named_parameters(), peer64.parameters()):
            assert torch.allclose(p.grad.double(), p64.grad, rtol=1e-4, atol=1e-7), name
    assert "top1_agreement" in terms.metrics


def peer_trainer(tmp_path, tok, peers=None, **fields) -> DistillationTrainer:
    """A trainer whose model is `PeerStudents`: its source is mutual learning, no teacher needed."""
    model = PeerStudents(peers or [make_llama(2, 32, seed=0), make_llama(2, 32, seed=1)])
    trainer = DistillationTrainer(
        model=model,
        args=distill_config(tmp_path, kd_weight=0.6, ce_weight=0.4, **fields),
        train_dataset=tokenized_texts(tok, TEXTS),
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok,
    )
    trainer.source = trainer.teacher_source
    assert isinstance(trainer.source, MutualLearning) and trainer.teacher is None
    return trainer


@pytest.mark.parametrize("fused", [False, True])
def test_gradient_accumulation_2x2_equals_batch_4(tmp_path, tokenizer, fused):
    weights = []
    for name, (batch, accumulation) in {"full": (4, 1), "accumulated": (2, 2)}.items():
        trainer = peer_trainer(
            tmp_path / name, tokenizer, use_fused_kd_loss=fused, **one_sgd_step(batch, accumulation)
        )
        trainer.train()
        weights.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
        assert trainer.source.fused == fused
    for key, value in weights[0].items():
        assert torch.allclose(value, weights[1][key], atol=1e-6), key
    assert any(not torch.equal(v, make_llama(2, 32).state_dict()[k[len("peers.0.") :]])
               for k, v in weights[0].items() if k.startswith("peers.0."))  # fmt: skip


def test_every_peer_is_saved_and_loadable_and_logs_its_terms(tmp_path, tokenizer):
    trainer = peer_trainer(tmp_path, tokenizer, max_steps=2)
    trainer.train()
    logged = next(e for e in trainer.state.log_history if "peer0_kd_loss" in e)
    assert {"peer0_ce_loss", "peer1_ce_loss", "peer1_kd_loss", "top1_agreement"} <= set(logged)
    trainer.save_model(str(tmp_path / "export"))  # the trainer's export: one folder per peer, with the tokenizer
    folders = peer_folders(tmp_path / "export")
    assert len(folders) == 2 and not (tmp_path / "export" / "model.safetensors").exists()
    for folder, peer in zip(folders, trainer.model.peers):
        assert AutoTokenizer.from_pretrained(folder).vocab_size == tokenizer.vocab_size
        reloaded = AutoModelForCausalLM.from_pretrained(folder)
        assert type(reloaded) is type(peer)
        for name, value in reloaded.state_dict().items():
            assert torch.equal(value, peer.state_dict()[name]), name


def test_tied_peers_checkpoint_and_resume_exactly(tmp_path, tokenizer):
    def tied_peers():
        peers = [make_llama(2, 32, seed=0), make_llama(2, 32, seed=1)]
        for p in peers:
            p.lm_head.weight = p.model.embed_tokens.weight
        return peers

    run = dict(max_steps=4, save_strategy="steps", save_steps=2, learning_rate=1e-2)
    full = peer_trainer(tmp_path / "full", tokenizer, tied_peers(), **run)
    full.train()
    resumed = peer_trainer(tmp_path / "resumed", tokenizer, tied_peers(), **run)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full/out/checkpoint-2"))
    for (name, x), y in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(x, y), name
    assert resumed.model.peers[0].lm_head.weight is resumed.model.peers[0].model.embed_tokens.weight


def test_needs_two_peers_and_a_peer_model(tmp_path):
    with pytest.raises(ValueError, match="at least 2 peer"):
        PeerStudents([make_llama(2, 32)])
    args = distill_config(tmp_path)
    student = make_llama(2, 32)
    with pytest.raises(ValueError, match="PeerStudents"):
        MutualLearning(SourceContext(args, detect_head(student), student))
    assert not MutualLearning.active(student) and MutualLearning.active(PeerStudents([student, make_llama(2, 32)]))


@pytest.mark.distributed
@pytest.mark.parametrize("fused", [False, True])
def test_two_processes_equal_one_process(tmp_path, fused):
    """torchrun 2 x batch 2 (DDP over gloo, the PeerStudents wrapper as the one model) == 1 x batch 4."""
    import sys
    from pathlib import Path

    from conftest import run_processes
    from safetensors.torch import load_file

    script = Path(__file__).resolve().parent / "distributed" / "peers_equivalence.py"
    flags = ["--fused"] if fused else []
    run_processes([sys.executable, str(script), str(tmp_path / "one"), "--batch_size", "4", *flags])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    run_processes([*torchrun, str(script), str(tmp_path / "two"), "--batch_size", "2", *flags])
    one, two = (json.loads((tmp_path / n / "result.json").read_text()) for n in ("one", "two"))
    assert (one["num_processes"], two["num_processes"], two["wrapper"]) == (1, 2, "DistributedDataParallel")
    assert len(one["log_history"]) == len(two["log_history"]) == 3
    for a, b in zip(one["log_history"], two["log_history"]):
        for key in ("loss", "peer0_kd_loss", "peer1_ce_loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
    for peer in ("peer0", "peer1"):
        w1 = load_file(tmp_path / "one/final" / peer / "model.safetensors")
        w2 = load_file(tmp_path / "two/final" / peer / "model.safetensors")
        for key in w1:
            torch.testing.assert_close(w1[key], w2[key], atol=1e-5, rtol=0, msg=key)


def test_peers_of_other_vocabularies_or_head_kinds_are_refused(tmp_path):
    from transformers import LlamaForSequenceClassification

    from hf_distill.student import output_size

    small, large = make_llama(2, 32, vocab_size=64), make_llama(2, 32, vocab_size=72)
    assert (output_size(small), output_size(large)) == (64, 72)
    with pytest.raises(ValueError, match=r"different output sizes \[64, 72\].*one tokenizer"):
        PeerStudents([small, large])
    classifier = make_llama(2, 32, cls=LlamaForSequenceClassification, num_labels=3)
    assert output_size(classifier) == 3
    with pytest.raises(ValueError, match="different head kinds"):
        PeerStudents([small, classifier])
    with pytest.raises(ValueError, match="same model is given twice"):
        PeerStudents([small, small])
    assert len(PeerStudents([small, make_llama(3, 48, seed=1)]).peers) == 2  # other sizes, one vocabulary: fine
