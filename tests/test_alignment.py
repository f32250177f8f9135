"""Character-offset alignment of two tokenizations: merges, splits, whitespace, unicode, supervised spans."""

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_distill.alignment import align_spans, shared_token_ids, token_char_spans, token_strings


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Word level, whitespace pre-tokenizer (offsets exclude the spaces), decodes with single spaces."""
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")  # fmt: skip


def char_tokenizer(chars: str) -> PreTrainedTokenizerFast:
    """One token per character, spaces included (a different tokenizer of the same text)."""
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", *dict.fromkeys(chars)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")  # fmt: skip


def byte_bpe_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `corpus` (multi-byte characters split over byte tokens when rare)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=1, special_tokens=["<pad>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>", eos_token="</s>")


def offsets(tokenizer, text: str) -> list:
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    return [tuple(o) for o in enc["offset_mapping"]]


def texts_of(groups, s_spans, t_spans, text):
    return [
        ("".join(text[slice(*s_spans[k])] for k in g.student), "".join(text[slice(*t_spans[k])] for k in g.teacher))
        for g in groups
    ]


def test_merges_and_splits_with_handmade_spans():
    text = "unbelievable cats"
    student = [(0, 2), (2, 9), (9, 12), (12, 17)]  # "un" "believ" "able" " cats"
    teacher = [(0, 12), (13, 16), (16, 17)]  # "unbelievable" "cat" "s" (the space dropped)
    groups = align_spans(student, teacher, text)
    assert [(g.student, g.teacher) for g in groups] == [([0, 1, 2], [0]), ([3], [1, 2])]
    assert [(g.start, g.end) for g in groups] == [(0, 12), (12, 17)]


def test_unsupervised_tokens_and_straddling_teacher_tokens_drop_groups():
    text = "Q: 2+2=4 ok"
    student = [None, None, None, None, None, (7, 8), (8, 11)]  # only "4" and " ok" supervised
    teacher = [(0, 2), (2, 6), (6, 8), (8, 11)]  # "=4" straddles prompt and completion
    groups = align_spans(student, teacher, text)
    assert [(g.student, g.teacher) for g in groups] == [([6], [3])]  # "4" dropped, " ok" kept
    teacher_split = [(0, 2), (2, 7), (7, 8), (8, 11)]
    groups = align_spans(student, teacher_split, text)
    assert [(g.student, g.teacher) for g in groups] == [([5], [2]), ([6], [3])]


def test_word_vs_char_tokenizers_whitespace():
    text = "the cat  sat"
    s_tok, t_tok = word_tokenizer(["the", "cat", "sat"]), char_tokenizer(text)
    s_spans, t_spans = offsets(s_tok, text), offsets(t_tok, text)
    groups = align_spans(s_spans, t_spans, text)
    assert texts_of(groups, s_spans, t_spans, text) == [
        ("the", "the"),
        ("cat", "cat"),
        ("sat", "sat"),
    ]  # spaces: context
    groups = align_spans(t_spans, s_spans, text)  # the other way round: student chars, teacher words
    assert [len(g.student) for g in groups] == [3, 4, 5]


@pytest.mark.parametrize("use_offsets", [True, False])
@pytest.mark.parametrize("text", ["café über naïve", "smile 😀 ok", "日本語 text"])
def test_unicode_byte_level_vs_char(text, use_offsets):
    s_tok = byte_bpe_tokenizer(["plain english words only", "ok text smile"])
    t_tok = char_tokenizer(text)
    ids = s_tok(text, add_special_tokens=False)["input_ids"]
    decoded, s_spans = token_char_spans(s_tok, ids, use_offsets=use_offsets)
    assert decoded == text
    assert len(ids) > len(text.split())  # rare characters are split into byte tokens
    t_spans = offsets(t_tok, text)
    groups = align_spans(s_spans, t_spans, text)
    assert sum(len(g.student) for g in groups) == len(ids)  # every byte token in a group
    covered = "".join(text[g.start : g.end] for g in groups)
    assert covered == text  # every character aligned once, in order
    for g in groups:  # each group: the same characters on both sides (up to whitespace)
        s_text = text[s_spans[g.student[0]][0] : s_spans[g.student[-1]][1]]
        t_text = text[t_spans[g.teacher[0]][0] : t_spans[g.teacher[-1]][1]]
        assert s_text.strip() == t_text.strip()


@pytest.mark.parametrize("use_offsets,expected", [(True, ["the", "cat"]), (False, ["the", " cat"])])
def test_token_char_spans_skips_special_tokens(use_offsets, expected):
    tok = word_tokenizer(["the", "cat"])
    ids = [tok.bos_token_id, *tok("the cat", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    text, spans = token_char_spans(tok, ids, use_offsets=use_offsets)
    assert text == "the cat"
    assert spans[0] is None and spans[-1] is None
    assert [text[slice(*s)] for s in spans[1:-1]] == expected  # the tokenizer's offsets leave the space out


def test_shared_token_ids_across_space_conventions():
    a = byte_bpe_tokenizer(["the cat sat on the mat", "the dog"])
    b = char_tokenizer("the cat")
    strings_a, strings_b = token_strings(a), token_strings(b)
    assert strings_a[a.convert_tokens_to_ids("Ġthe")] == " the"  # byte-level space read as a space
    s_ids, t_ids = shared_token_ids(a, b)
    assert len(s_ids) == len(t_ids) > 0
    for i, j in zip(s_ids, t_ids):
        assert strings_a[i] == strings_b[j]
    assert a.convert_tokens_to_ids("t") in s_ids
