"""GGUF export: round trip through transformers' GGUF loader (logits per format, tokenizer, chat template), the
block quantizer against gguf's reference, exact q4_0 storage of QAT weights, clear errors, and the CLI."""

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)


gguf = pytest.importorskip("gguf")

from hf_distill.export import export_gguf, quantize_blocks  # noqa: E402


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "hello world, this is a tiny corpus for a byte-level tokenizer",
    "the quick brown fox jumps over the lazy dog 12345",
    "Premise: a man sits. Hypothesis: a person rests. Label: entailment",
] * 10
TEXTS = [
    "hello   world, the quick fox! 1234",
    "ünïcödé and emoji 🙂 are bytes too",
    "<|im_start|>user\nhi<|im_end|>",
    "  leading spaces\nand\ttabs",
]
# max |logit difference| allowed against the source model, per weight type (random fp32 model, logits ~ N(0, 1))
TOLERANCE = {"f16": 2e-3, "q8_0": 3e-2, "q4_0": 0.3}


def make_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 / SmolLM2 style) trained offline on a few sentences, with a chat template."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_student(tok, tie: bool, seed: int = 0, hidden: int = 64, intermediate: int = 128) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention: Q and K are permuted with different head counts
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    return make_bpe_tokenizer()


def _save(model, tok, folder) -> str:
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _load_gguf(path):
    folder, name = str(path.parent), path.name
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval(), AutoTokenizer.from_pretrained(
        folder, gguf_file=name
    )


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0"])
def test_gguf_round_trip(tmp_path, bpe_tokenizer, quant, tie):
    tok = bpe_tokenizer
    model = make_student(tok, tie)
    source = _save(model, tok, tmp_path / "student")
    result = export_gguf(source, str(tmp_path / "gguf" / "model.gguf"), quant=quant)
    expected = {"f16": "f16", "q8_0": "q8_0", "q4_0": "q4_0"}[quant]
    assert result["tensors"]["blk.0.attn_q.weight"] == expected
    assert result["tensors"]["blk.0.attn_norm.weight"] == "f32"
    assert ("output.weight" in result["tensors"]) is not tie

    loaded, loaded_tok = _load_gguf(tmp_path / "gguf" / "model.gguf")
    assert loaded.config.tie_word_embeddings is tie
    assert loaded.config.num_key_value_heads == 2
    ids = tok(TEXTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        want, got = model(**ids).logits, loaded(**ids).logits
    diff = (got - want).abs().max().item()
    assert diff < TOLERANCE[quant], f"{quant}: max |logit diff| {diff}"
    if quant != "f16":  # quantization really happened (the tolerance is not vacuous)
        assert diff > 1e-4

    for text in TEXTS:
        assert loaded_tok(text).input_ids == tok(text).input_ids, text
        assert loaded_tok.decode(tok(text).input_ids) == tok.decode(tok(text).input_ids)
    assert loaded_tok.chat_template == CHAT_TEMPLATE
    messages = [{"role": "user", "content": "hello fox"}, {"role": "assistant", "content": "the dog"}]
    assert loaded_tok.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(
        messages, tokenize=False
    )
    assert (loaded_tok.bos_token, loaded_tok.eos_token, loaded_tok.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
    )


def test_f16_round_trip_equals_half_precision_weights(tmp_path, bpe_tokenizer):
    """The permutation of Q/K is undone exactly: the GGUF model equals the source with fp16-rounded weights."""
    model = make_student(bpe_tokenizer, tie=False, seed=3)
    export_gguf(_save(model, bpe_tokenizer, tmp_path / "s"), str(tmp_path / "g" / "m.gguf"), quant="f16")
    loaded, _ = _load_gguf(tmp_path / "g" / "m.gguf")
    state = loaded.state_dict()
    for name, weight in model.state_dict().items():
        reference = weight.half().float() if weight.ndim == 2 else weight
        torch.testing.assert_close(state[name], reference, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize(("quant", "qtype"), [("q4_0", "Q4_0"), ("q8_0", "Q8_0")])
def test_quantize_blocks_layout_and_accuracy(quant, qtype):
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((16, 96)).astype(np.float32)
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    ours = quantize_blocks(weights, quant)
    reference = gguf.quants.quantize(weights, kind)
    assert ours.shape == reference.shape and ours.dtype == np.uint8
    # off-grid weights are quantized as llama.cpp does (gguf's reference implementation)
    np.testing.assert_allclose(
        gguf.quants.dequantize(ours, kind), gguf.quants.dequantize(reference, kind), rtol=0, atol=1e-6
    )
    # a block already on an integer grid (scale s, ints in range) is stored exactly, up to the fp16 scale
    qmin, qmax = (-8, 7) if quant == "q4_0" else (-128, 127)
    scales = rng.uniform(0.01, 0.1, size=(16 * 3, 1)).astype(np.float16).astype(np.float32)
    ints = rng.integers(qmin, qmax + 1, size=(16 * 3, 32))
    ints[:, 0] = qmin  # torchao's grid reaches qmin, so the largest magnitude is -qmin * s
    grid = (ints * scales).reshape(16, 96).astype(np.float32)
    np.testing.assert_allclose(gguf.quants.dequantize(quantize_blocks(grid, quant), kind), grid, rtol=0, atol=1e-7)


def test_qat_student_exports_to_q4_0_without_further_rounding(tmp_path, bpe_tokenizer):
    pytest.importorskip("torchao")
    from hf_distill.quantization import fake_quantized_weights, prepare_qat_student

    model = prepare_qat_student(make_student(bpe_tokenizer, tie=True, seed=5), "int4w", 32)
    with fake_quantized_weights(model):
        grid = {k: v.clone() for k, v in model.state_dict().items()}
        source = _save(model, bpe_tokenizer, tmp_path / "qat")
    export_gguf(source, str(tmp_path / "g" / "m.gguf"), quant="q4_0")
    loaded, _ = _load_gguf(tmp_path / "g" / "m.gguf")
    state = loaded.state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        torch.testing.assert_close(state[name], grid[name], rtol=2e-3, atol=1e-6)  # fp16 scale only
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.v_proj.weight"):
        torch.testing.assert_close(state[name], grid[name], rtol=2e-3, atol=1e-6)
    # the same weights before QAT rounding lose more to q4_0 than the fp16 scale
    plain = make_student(bpe_tokenizer, tie=True, seed=5)
    export_gguf(_save(plain, bpe_tokenizer, tmp_path / "fp"), str(tmp_path / "g2" / "m.gguf"), quant="q4_0")
    loaded_fp, _ = _load_gguf(tmp_path / "g2" / "m.gguf")
    name = "model.layers.0.mlp.down_proj.weight"
    assert (loaded_fp.state_dict()[name] - plain.state_dict()[name]).abs().max() > 1e-3


def test_export_rejects_other_architectures(tmp_path, bpe_tokenizer):
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(bpe_tokenizer), n_embd=32, n_layer=1, n_head=2))
    source = _save(model, bpe_tokenizer, tmp_path / "gpt2")
    with pytest.raises(ValueError, match="LlamaForCausalLM.*'gpt2'"):
        export_gguf(source, str(tmp_path / "x.gguf"))


def test_export_rejects_non_byte_level_tokenizer(tmp_path):
    tok = make_tokenizer()  # word-level
    source = _save(make_student(tok, tie=False), tok, tmp_path / "wl")
    with pytest.raises(ValueError, match="byte-level BPE"):
        export_gguf(source, str(tmp_path / "x.gguf"))


def test_export_of_a_folder_without_tokenizer_names_the_missing_files(tmp_path, bpe_tokenizer, capsys):
    from hf_distill.cli.main import main

    make_student(bpe_tokenizer, tie=True).save_pretrained(tmp_path / "student")  # weights only
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--model", str(tmp_path / "student"), "--output", str(tmp_path / "m.gguf")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and f"No tokenizer in {tmp_path / 'student'}: none of tokenizer.json" in err
    assert "sentencepiece" not in err and "--tokenizer" in err and not (tmp_path / "m.gguf").exists()
    bpe_tokenizer.save_pretrained(tmp_path / "tok")  # its own folder, named with --tokenizer: exported
    main(["export", "--model", str(tmp_path / "student"), "--tokenizer", str(tmp_path / "tok")]
         + ["--output", str(tmp_path / "m.gguf")])  # fmt: skip
    assert (tmp_path / "m.gguf").exists()


def test_export_rejects_unknown_quant(tmp_path):
    with pytest.raises(ValueError, match="q4_0"):
        export_gguf(str(tmp_path), str(tmp_path / "x.gguf"), quant="q2_k")


def test_cli_export(tmp_path, bpe_tokenizer):
    source = _save(make_student(bpe_tokenizer, tie=True), bpe_tokenizer, tmp_path / "s")
    out = tmp_path / "cli" / "model.gguf"
    cmd = [sys.executable, "-m", "hf_distill.cli.main", "export", "--model", source, "--format", "gguf"]
    proc = subprocess.run([*cmd, "--quant", "q8_0", "--output", str(out)], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Wrote" in proc.stdout and out.exists()
    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.1.ffn_down.weight"] == "Q8_0" and types["output_norm.weight"] == "F32"
    helped = subprocess.run(
        [sys.executable, "-m", "hf_distill.cli.main", "export", "--help"], check=False, capture_output=True, text=True
    )
    assert helped.returncode == 0 and "--quant" in helped.stdout and "q4_0" in helped.stdout


@pytest.mark.parametrize("quant", ["q4_0", "q8_0"])
def test_tensors_that_cannot_take_the_block_size_are_listed_and_refused(tmp_path, bpe_tokenizer, quant, caplog):
    """Hidden 48 (no 2-D weight splits into blocks of 32) or intermediate 80 (only ffn_down): refused, each such
    tensor named with its shape and --allow_fallback named; with allow_fallback they are f16, warned once."""
    out = tmp_path / "x.gguf"
    narrow = _save(make_student(bpe_tokenizer, tie=True, hidden=48, intermediate=96), bpe_tokenizer, tmp_path / "n")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight \(48, 48\).*--allow_fallback"):
        export_gguf(narrow, str(out), quant=quant)
    assert not out.exists()  # nothing written
    mixed = _save(make_student(bpe_tokenizer, tie=False, intermediate=80), bpe_tokenizer, tmp_path / "m")
    with pytest.raises(ValueError, match=r"2 of the 16 2-D tensors have rows of length \[80\].*"
                                         r"model\.layers\.1\.mlp\.down_proj\.weight \(64, 80\)"):  # fmt: skip
        export_gguf(mixed, str(out), quant=quant)
    with caplog.at_level("WARNING", logger="hf_distill.export"):
        result = export_gguf(mixed, str(out), quant=quant, allow_fallback=True)
    warned = [r for r in caplog.records if "--allow_fallback" in r.getMessage()]
    assert len(warned) == 1 and "model.layers.0.mlp.down_proj.weight (64, 80)" in warned[0].getMessage()
    assert result["fallback"] == [(f"model.layers.{i}.mlp.down_proj.weight", (64, 80)) for i in range(2)]
    assert result["tensors"]["blk.0.ffn_down.weight"] == "f16" and result["tensors"]["blk.0.ffn_up.weight"] == quant
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.1.ffn_down.weight"] == "F16" and types["blk.1.ffn_gate.weight"] == quant.upper()


def test_block_fallbacks():
    from hf_distill.export import block_fallbacks

    assert block_fallbacks({"a": (4, 64), "b": (4, 80), "norm": (80,)}, "q4_0") == [("b", (4, 80))]
    assert block_fallbacks({"b": (4, 80)}, "f16") == []


def test_cli_export_refuses_a_block_fallback_unless_allowed(tmp_path, bpe_tokenizer, capsys):
    from hf_distill.cli.main import main

    source = _save(make_student(bpe_tokenizer, tie=True, intermediate=80), bpe_tokenizer, tmp_path / "s")
    argv = ["export", "--model", source, "--quant", "q4_0", "--output", str(tmp_path / "m.gguf")]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 1 and "down_proj.weight (64, 80)" in err and "--allow_fallback" in err
    main([*argv, "--allow_fallback"])
    assert re.search(r"[^0-9]2 f16", capsys.readouterr().out) and (tmp_path / "m.gguf").exists()
