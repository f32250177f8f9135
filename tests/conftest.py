"""Offline, seeded tiny models and tokenizers built from configs (no Hub access anywhere in the tests)."""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)


SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
WORDS = (  # noqa: SIM905
    "the a an is are was of to and in on at it this that cat dog sat mat ran fast slow big small red blue "
    "user assistant system answer question label rationale because so yes no one two three four five six "
    "plus minus equals entailment neutral contradiction"
).split()
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}<|im_start|>assistant "
    "{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %} {% else %}"
    "<|im_start|>{{ message['role'] }} {{ message['content'] }}<|im_end|> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant "
    "{% endif %}"
)


def make_tokenizer(words: list[str] | None = None, chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over `SPECIAL + words` (64 tokens by default), built offline."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + (words if words is not None else WORDS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)  # keep them whole (ids 4 and 5)
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def make_llama(
    num_layers: int = 2, hidden: int = 32, vocab_size: int = 64, heads: int = 4, seed: int = 0, **kwargs
) -> LlamaForCausalLM:
    """A seeded tiny random Llama causal LM (fp32, eval-ready)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
        **kwargs,
    )
    return LlamaForCausalLM(config)


def make_t5(num_layers: int = 2, d_model: int = 32, vocab_size: int = 64, seed: int = 0) -> T5ForConditionalGeneration:
    """A seeded tiny random T5 (encoder and decoder of `num_layers` each)."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=3,
        decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(config)


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture
def teacher() -> LlamaForCausalLM:
    return make_llama(num_layers=4, hidden=64, seed=1)


@pytest.fixture
def student() -> LlamaForCausalLM:
    return make_llama(num_layers=2, hidden=32, seed=0)


@pytest.fixture
def tiny_t5() -> T5ForConditionalGeneration:
    return make_t5()
