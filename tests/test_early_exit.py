"""Early-exit self-distillation (`hf_distill.features.early_exit`): layer parsing, the terms and their gradients
against a float64 reference (fused and dense), terms logged per exit, and no parameters added to the student."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import distill_config, make_llama
from transformers import DataCollatorForLanguageModeling

from hf_distill.features.early_exit import EarlyExits, final_norm_of, parse_exit_layers, resolve_exit_layers
from hf_distill.heads import detect_head
from hf_distill.terms import SupervisedView


TEXTS = ["the cat sat on the mat and the dog sat too", "a dog", "the big red dog is slow", "one plus two"]


def test_layers_parse_and_resolve(tmp_path):
    assert parse_exit_layers("uniform") == "uniform"
    assert parse_exit_layers("3, 1") == [1, 3] and parse_exit_layers("[2, 2, 4]") == [2, 4]
    assert resolve_exit_layers("uniform", 10) == [2, 5, 8] and resolve_exit_layers("uniform", 2) == [1]
    assert resolve_exit_layers([1, 3], 4) == [1, 3]
    with pytest.raises(ValueError, match=r"outside \[1, 4\)"):
        resolve_exit_layers([4], 4)
    with pytest.raises(ValueError, match="'uniform' or a list"):
        parse_exit_layers("first")
    with pytest.raises(ValueError, match="early_exit_layers"):
        distill_config(tmp_path, early_exit_layers="x")
    assert distill_config(tmp_path, early_exit_layers="2,1").early_exit_layers == [1, 2]


def reference_terms(model64, batch, layers, temperature, ce_weight):
    """Exit terms written out in float64 from `model64`'s own modules: norm, lm_head, softmax, KL, CE."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model64(**inputs, output_hidden_states=True)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    final = out.logits[:, :-1][mask].detach() / temperature
    sums = {}
    for layer in layers:
        logits = model64.lm_head(model64.model.norm(out.hidden_states[layer][:, :-1][mask]))
        p_t = F.softmax(final, -1)
        kl = (p_t * (F.log_softmax(final, -1) - F.log_softmax(logits / temperature, -1))).sum()
        sums[f"exit{layer}_kd"] = kl
        if ce_weight > 0:
            sums[f"exit{layer}_ce"] = F.cross_entropy(logits, labels[mask], reduction="sum")
    return sums


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(("temperature", "ce_weight"), [(1.0, 0.5), (2.0, 0.0)])
def test_terms_and_gradients_match_a_float64_reference(tmp_path, tokenizer, fused, temperature, ce_weight):
    model = make_llama(4, 32)
    model64 = copy.deepcopy(model).double()
    args = distill_config(tmp_path, early_exit_layers=[1, 3], early_exit_weight=0.7, temperature=temperature,
                          ce_weight=ce_weight, use_fused_kd_loss=fused)  # fmt: skip
    exits = EarlyExits(args, model)
    assert exits.layers == [1, 3] and exits.fused == fused
    batch = DataCollatorForLanguageModeling(tokenizer, mlm=False)([tokenizer(t) for t in TEXTS])
    view = SupervisedView.from_batch(batch, detect_head(model))
    out = model(**{k: v for k, v in batch.items() if k != "labels"}, **exits.forward_kwargs())
    terms = exits.terms(out, view)
    ref = reference_terms(model64, batch, [1, 3], temperature, ce_weight)
    assert set(terms.sums) == set(ref)
    for name, value in ref.items():
        assert torch.allclose(terms.sums[name].double(), value, rtol=1e-5, atol=1e-6), name
        expected_weight = 0.7 * (temperature**2 if name.endswith("kd") else ce_weight)
        assert terms.weights[name] == pytest.approx(expected_weight)
    assert int(terms.n_items) == int(view.n_items)
    assert set(terms.metrics) == {"exit1_agreement", "exit3_agreement"}
    terms.total().backward()
    sum(terms.weights[k] * v for k, v in ref.items()).backward()
    for (name, p), p64 in zip(model.named_parameters(), model64.parameters()):
        if p64.grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        assert torch.allclose(p.grad.double(), p64.grad, rtol=1e-4, atol=1e-6), name
    # the final layer is the teacher: layer 4 (after the last exit) gets no gradient from the exits
    assert (
        model.model.layers[3].mlp.up_proj.weight.grad is None
        or not model.model.layers[3].mlp.up_proj.weight.grad.any()
    )


def test_exits_add_no_parameters_and_need_hidden_states(tmp_path, tokenizer):
    model = make_llama(4, 32)
    names = [n for n, _ in model.named_parameters()]
    exits = EarlyExits(distill_config(tmp_path, early_exit_layers="uniform"), model)
    assert exits.layers == [1, 2, 3] and exits.norm is model.model.norm and final_norm_of(model) is model.model.norm
    assert [n for n, _ in model.named_parameters()] == names
    batch = DataCollatorForLanguageModeling(tokenizer, mlm=False)([tokenizer(t) for t in TEXTS])
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        exits.terms(out, SupervisedView.from_batch(batch, detect_head(model)))
    with pytest.raises(ValueError, match=r"outside \[1, 4\)"):
        EarlyExits(distill_config(tmp_path, early_exit_layers=[0]), model)
    from transformers import LlamaForSequenceClassification

    from hf_distill.student import PeerStudents

    classifier = make_llama(4, 32, cls=LlamaForSequenceClassification, num_labels=3)
    with pytest.raises(ValueError, match="causal LM students.*sequence_classification"):
        EarlyExits(distill_config(tmp_path, early_exit_layers=[1]), classifier)
    with pytest.raises(ValueError, match="PeerStudents.*Remove `early_exit_layers`"):
        EarlyExits(distill_config(tmp_path, early_exit_layers=[1]), PeerStudents([model, make_llama(4, 32, seed=1)]))


@pytest.mark.parametrize("with_teacher", [False, True])
def test_trainer_logs_each_exit_and_exports_an_ordinary_model(tmp_path, tokenizer, with_teacher):
    from conftest import tokenized_texts
    from transformers import AutoModelForCausalLM

    from hf_distill import DistillationTrainer

    trainer = DistillationTrainer(
        model=make_llama(4, 32),
        teacher_model=make_llama(4, 64, seed=1) if with_teacher else None,
        args=distill_config(
            tmp_path,
            early_exit_layers=[1, 2],
            early_exit_weight=0.5,
            kd_weight=0.5 if with_teacher else 0.0,
            ce_weight=0.5,
        ),
        train_dataset=tokenized_texts(tokenizer, TEXTS),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
    )
    trainer.train()
    logged = next(e for e in trainer.state.log_history if "exit1_kd_loss" in e)
    expected = {"exit1_kd_loss", "exit1_ce_loss", "exit2_kd_loss", "exit2_ce_loss", "exit1_agreement", "ce_loss"}
    assert expected <= set(logged) and ("kd_loss" in logged) == with_teacher
    trainer.save_model(str(tmp_path / "export"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert type(reloaded) is type(trainer.model) and reloaded.config.num_hidden_layers == 4
    assert set(reloaded.state_dict()) == set(make_llama(4, 32).state_dict())
