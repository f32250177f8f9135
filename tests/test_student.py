"""init_student_from_teacher: layer choice, exact copies, config surgery, save/reload, T5 relative bias, errors."""

import itertools

import pytest
import torch
import transformers
from conftest import make_llama, make_t5
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from hf_distill.student import evenly_spaced_layers, init_student_from_teacher


def _ids(seed: int = 0, shape: tuple[int, int] = (2, 9)) -> torch.Tensor:
    return torch.randint(6, 64, shape, generator=torch.Generator().manual_seed(seed))


def _t5_logits(model, ids, dec):
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=dec).logits


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(
    "depth,n,expected",
    [(30, 10, [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]), (4, 2, [0, 3]), (5, 3, [0, 2, 4]), (6, 6, list(range(6)))],
)
def test_evenly_spaced_layers_values(depth, n, expected):
    assert evenly_spaced_layers(depth, n) == expected


@pytest.mark.parametrize("depth", [1, 2, 7, 12, 30, 61])
def test_evenly_spaced_layers_first_last_distinct(depth):
    for n in range(2, depth + 1):
        chosen = evenly_spaced_layers(depth, n)
        assert chosen[0] == 0 and chosen[-1] == depth - 1
        assert len(chosen) == n and all(b > a for a, b in itertools.pairwise(chosen))
        # the documented formula: round-half-up of the linear ramp i * (L - 1) / (n - 1)
        assert chosen == [int(i * (depth - 1) / (n - 1) + 0.5 + 1e-9) for i in range(n)]
    assert evenly_spaced_layers(depth, 1) == [0]


def test_all_layers_reproduce_llama_exactly():
    teacher = make_llama(num_layers=4, seed=1).eval()
    student = init_student_from_teacher(teacher, num_layers=4).eval()
    assert type(student) is LlamaForCausalLM and student is not teacher
    ids = _ids()
    assert torch.equal(_logits(student, ids), _logits(teacher, ids))
    for (name, p), (t_name, q) in zip(student.named_parameters(), teacher.named_parameters(), strict=True):
        assert name == t_name and torch.equal(p, q) and p.data_ptr() != q.data_ptr()


def test_all_layers_reproduce_t5_exactly():
    teacher = make_t5(num_layers=3, seed=2).eval()
    student = init_student_from_teacher(teacher, layers=[0, 1, 2]).eval()
    ids, dec = _ids(1, (2, 8)), _ids(2, (2, 5))
    assert torch.equal(_t5_logits(student, ids, dec), _t5_logits(teacher, ids, dec))


def test_subset_copies_chosen_layers_and_round_trips(tmp_path):
    teacher = make_llama(num_layers=5, seed=3).eval()
    student = init_student_from_teacher(teacher, layers=[0, 2, -1]).eval()
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1, 2]
    for new, old in enumerate([0, 2, 4]):
        s_layer, t_layer = student.model.layers[new].state_dict(), teacher.model.layers[old].state_dict()
        assert s_layer.keys() == t_layer.keys()
        assert all(torch.equal(s_layer[k], t_layer[k]) for k in s_layer)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    # a copy, not a view: editing the student leaves the teacher alone
    before = teacher.model.embed_tokens.weight.clone()
    with torch.no_grad():
        student.model.embed_tokens.weight.add_(1.0)
    assert torch.equal(teacher.model.embed_tokens.weight, before)

    assert student.config._name_or_path == ""
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is LlamaForCausalLM and reloaded.config.num_hidden_layers == 3
    ids = _ids(4)
    logits = _logits(student, ids)
    assert logits.shape == (2, 9, 64) and torch.isfinite(logits).all()
    assert torch.equal(_logits(reloaded, ids), logits)


def test_generate_with_kv_cache_matches_no_cache():
    teacher = make_llama(num_layers=6, seed=4).eval()
    student = init_student_from_teacher(teacher, num_layers=3).eval()
    ids = _ids(5, (1, 6))
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    cached = student.generate(ids, use_cache=True, **kwargs)
    uncached = student.generate(ids, use_cache=False, **kwargs)
    assert cached.shape == (1, 14) and torch.equal(cached, uncached)


def test_student_is_trainable_even_if_teacher_frozen():
    teacher = make_llama(num_layers=4, seed=5).eval().requires_grad_(False)
    student = init_student_from_teacher(teacher, num_layers=2)
    assert not student.training
    assert all(p.requires_grad for p in student.parameters())
    out = student(input_ids=_ids(6), labels=_ids(6))
    out.loss.backward()
    assert student.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_tied_embeddings_stay_tied(tmp_path):
    config = make_llama(num_layers=4).config
    config.tie_word_embeddings = True
    torch.manual_seed(6)
    teacher = LlamaForCausalLM(config).eval()
    assert teacher.lm_head.weight is teacher.model.embed_tokens.weight
    student = init_student_from_teacher(teacher, num_layers=2).eval()
    assert student.lm_head.weight is student.model.embed_tokens.weight
    assert student.lm_head.weight is not teacher.lm_head.weight
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(_logits(reloaded, _ids(7)), _logits(student, _ids(7)))

    untied = init_student_from_teacher(make_llama(num_layers=4), num_layers=2)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_per_layer_config_fields_are_sliced(tmp_path):
    layer_types = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    config = Qwen3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        use_sliding_window=True,
        sliding_window=4,
        layer_types=layer_types,
        tie_word_embeddings=False,
    )
    torch.manual_seed(7)
    teacher = Qwen3ForCausalLM(config).eval()
    student = init_student_from_teacher(teacher, layers=[1, 3]).eval()
    assert student.config.layer_types == ["sliding_attention", "full_attention"]
    assert [layer.self_attn.sliding_window for layer in student.model.layers] == [4, None]
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.layer_types == ["sliding_attention", "full_attention"]
    ids = _ids(8, (2, 12))  # longer than the sliding window
    assert torch.equal(_logits(reloaded, ids), _logits(student, ids))
    full = init_student_from_teacher(teacher, num_layers=4).eval()
    assert torch.equal(_logits(full, ids), _logits(teacher, ids))


_FAMILY_KW = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4}
_FAMILY_KW.update(num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)


@pytest.mark.parametrize(
    "family,extra,expected",
    [
        ("Qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2}, {"max_window_layers": 1}),
        ("Mistral", {"sliding_window": 4}, {}),
        ("Gemma3Text", {"sliding_window": 4}, {}),
        ("SmolLM3", {"pad_token_id": 0}, {"no_rope_layers": [1, 0]}),
    ],
)
def test_llama_family_models(family, extra, expected, tmp_path):
    config_class = getattr(transformers, f"{family}Config")
    model_class = getattr(transformers, f"{family.removesuffix('Text')}ForCausalLM")
    torch.manual_seed(10)
    teacher = model_class(config_class(**_FAMILY_KW, **extra)).eval()
    ids = _ids(11, (2, 12))
    full = init_student_from_teacher(teacher, num_layers=4).eval()
    assert torch.equal(_logits(full, ids), _logits(teacher, ids))
    student = init_student_from_teacher(teacher, layers=[1, 3]).eval()
    for name in ("layer_types", "no_rope_layers"):
        if getattr(teacher.config, name, None) is not None:
            assert getattr(student.config, name) == [getattr(teacher.config, name)[i] for i in (1, 3)]
    for name, value in expected.items():
        assert getattr(student.config, name) == value
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is model_class
    assert torch.equal(_logits(reloaded, ids), _logits(student, ids))
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    assert torch.equal(student.generate(ids[:1], **kwargs), student.generate(ids[:1], use_cache=False, **kwargs))


def test_t5_relative_bias_moves_to_first_kept_block(tmp_path):
    teacher = make_t5(num_layers=3, seed=8).eval()
    student = init_student_from_teacher(teacher, layers=[1, 2], decoder_layers=[2]).eval()
    assert (student.config.num_layers, student.config.num_decoder_layers) == (2, 1)
    for stack, t_stack, kept in [(student.encoder, teacher.encoder, [1, 2]), (student.decoder, teacher.decoder, [2])]:
        first = stack.block[0].layer[0].SelfAttention
        assert first.has_relative_attention_bias
        assert torch.equal(
            first.relative_attention_bias.weight,
            t_stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight,
        )
        for new, old in enumerate(kept):
            assert torch.equal(
                stack.block[new].layer[0].SelfAttention.q.weight, t_stack.block[old].layer[0].SelfAttention.q.weight
            )
            assert stack.block[new].layer[0].SelfAttention.layer_idx == new
    ids, dec = _ids(9, (2, 7)), _ids(10, (2, 4))
    logits = _t5_logits(student, ids, dec)
    assert logits.shape == (2, 4, 64) and torch.isfinite(logits).all()
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_t5_logits(reloaded, ids, dec), logits)
    generated = student.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, student.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False))


def test_t5_num_layers_applies_to_both_stacks():
    teacher = make_t5(num_layers=4, seed=9)
    student = init_student_from_teacher(teacher, num_layers=2)
    assert (student.config.num_layers, student.config.num_decoder_layers) == (2, 2)
    assert torch.equal(
        student.decoder.block[1].layer[2].DenseReluDense.wi.weight,
        teacher.decoder.block[3].layer[2].DenseReluDense.wi.weight,
    )
    student = init_student_from_teacher(teacher, num_layers=2, decoder_num_layers=1)
    assert (student.config.num_layers, student.config.num_decoder_layers) == (2, 1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"layers": [0, 4]}, "out of range"),
        ({"layers": [-5]}, "out of range"),
        ({"layers": [1, 1]}, "repeats"),
        ({"layers": [0, -4]}, "repeats"),
        ({"layers": []}, "empty"),
        ({"num_layers": 0}, "between 1 and"),
        ({"num_layers": 5}, "between 1 and"),
        ({}, "exactly one"),
        ({"layers": [0], "num_layers": 1}, "exactly one"),
        ({"layers": [0], "decoder_layers": [0]}, "encoder-decoders"),
    ],
)
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        init_student_from_teacher(make_llama(num_layers=4), **kwargs)


def test_type_errors():
    with pytest.raises(TypeError, match="ints"):
        init_student_from_teacher(make_llama(num_layers=4), layers=[0.5])
    with pytest.raises(TypeError, match="PreTrainedModel"):
        init_student_from_teacher(torch.nn.Linear(2, 2), num_layers=1)


def test_unknown_architecture_error():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_embd=8, n_layer=2, n_head=2, n_positions=16))
    with pytest.raises(ValueError, match="no supported layer stack"):
        init_student_from_teacher(gpt2, num_layers=1)
    with pytest.raises(ValueError, match="decoder_layers"):
        init_student_from_teacher(make_t5(num_layers=2), layers=[0], decoder_layers=[5])
