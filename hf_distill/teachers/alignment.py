"""Aligning two tokenizations of the same text by character offsets (cross-tokenizer distillation).

The student's tokens get character spans in the text they decode to (`token_char_spans`); the teacher tokenizes that
text itself with `return_offsets_mapping` (a fast tokenizer). `align_spans` walks both span lists and closes a group
wherever both tokenizations end a token at the same character (the boundaries both tokenizers share, as TRL's GOLD
trainer and ALM do): each group is a run of student tokens and a run of teacher tokens covering the same characters
(up to whitespace that one tokenizer attaches to a token and the other drops). Only groups made of supervised student
tokens are kept, so prompt and padding never count on either side.

`shared_token_ids` pairs the token strings the two vocabularies share (for the `gold` loss).
"""

from dataclasses import dataclass
from typing import Any


Span = tuple[int, int]  # [start, end) character offsets; start == end: a token with no text of its own


@dataclass
class Group:
    """One aligned span: student tokens `student` and teacher tokens `teacher` (positions in their sequences), both
    covering the characters `[start, end)` of the text."""

    student: list[int]
    teacher: list[int]
    start: int
    end: int


def token_char_spans(tokenizer: Any, ids: list[int], use_offsets: bool = True) -> tuple[str, list[Span | None]]:
    """The text `ids` decode to (special tokens skipped) and each token's character span in it.

    When re-encoding the text gives back the same (non-special) tokens, the tokenizer's own offsets are used.
    Otherwise spans come from decoding every prefix (one batched call, quadratic in T): token k spans
        `[len(decode(ids[:k])), len(decode(ids[:k+1])))`. Special tokens get None. Where a prefix does not decode to a
    prefix of the text (a multi-byte character split over byte tokens), the boundary stays at the previous one that
    does, so the tokens of one character are empty spans up to the last of them, which covers the character (and
    `align_spans` keeps them in one group).

    Args:
        tokenizer: the student's tokenizer (`PreTrainedTokenizerBase`).
        ids (`list[int]`): `(T,)` token ids of one row, padding removed.
        use_offsets (`bool`): try the tokenizer's offsets first (False: always decode prefixes).

    Returns:
        `(text, spans)`: `spans[k]` is `(start, end)` or None.
    """
    special = set(tokenizer.all_special_ids)
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    plain = [k for k, tok in enumerate(ids) if tok not in special]
    if use_offsets and getattr(
        tokenizer, "is_fast", False
    ):  # fast path: re-encoding the text gives back the same tokens
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if enc["input_ids"] == [ids[k] for k in plain]:
            spans: list[Span | None] = [None] * len(ids)
            for k, (start, end) in zip(plain, enc["offset_mapping"]):
                spans[k] = (start, end)
            return text, spans
    prefixes = tokenizer.batch_decode(
        [ids[:k] for k in range(len(ids) + 1)], skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    bounds: list[int | None] = [len(p) if text.startswith(p) else None for p in prefixes]
    for k in range(1, len(bounds)):  # an unreliable boundary takes the previous one; keep them monotone
        bounds[k] = bounds[k - 1] if bounds[k] is None else max(bounds[k], bounds[k - 1])
    spans = [None if tok in special else (bounds[k], bounds[k + 1]) for k, tok in enumerate(ids)]
    return text, spans


def align_spans(student: list[Span | None], teacher: list[Span | None], text: str) -> list[Group]:
    """Groups of student and teacher tokens that cover the same characters of `text`.

    Walks both lists in order (None entries are skipped: special tokens, padding, tokens outside the supervised
    text), closing a group where a student token and a teacher token end at the same character; the tokens of either
    side that end at that character too (bytes of one character) join it. Teacher tokens wholly before the next
    student token are context only. A group is kept when its student tokens are consecutive positions and both sides
    start at the same character up to whitespace, so a teacher token that straddles a prompt/completion boundary
    drops the group.

    Args:
        student (`list`): `(T_s,)` spans of the student's tokens (None: not aligned, e.g. not supervised).
        teacher (`list`): `(T_t,)` spans of the teacher's tokens (None: special tokens, padding).
        text (`str`): the text both spans index.

    Returns:
        `list[Group]` in text order.
    """
    s_items = [(k, span) for k, span in enumerate(student) if span is not None]
    t_items = [(k, span) for k, span in enumerate(teacher) if span is not None]
    groups: list[Group] = []
    s = t = 0
    g_s: list[tuple[int, Span]] = []
    g_t: list[tuple[int, Span]] = []
    while s < len(s_items) and t < len(t_items):
        (_, (s_start, s_end)), (_, (_, t_end)) = s_items[s], t_items[t]
        if not g_s and not g_t and t_end <= s_start and t_end < s_end:  # teacher context before the next group
            t += 1
            continue
        if s_end < t_end:
            g_s.append(s_items[s])
            s += 1
        elif s_end > t_end:
            g_t.append(t_items[t])
            t += 1
        else:
            g_s.append(s_items[s])
            g_t.append(t_items[t])
            s, t = s + 1, t + 1
            while t < len(t_items) and t_items[t][1][1] == s_end and t_items[t][1][0] < s_end:
                g_t.append(t_items[t])
                t += 1
            while s < len(s_items) and s_items[s][1][1] == s_end and s_items[s][1][0] < s_end:
                g_s.append(s_items[s])
                s += 1
            group = _checked_group(g_s, g_t, text)
            if group is not None:
                groups.append(group)
            g_s, g_t = [], []
    return groups


def _checked_group(g_s: list[tuple[int, Span]], g_t: list[tuple[int, Span]], text: str) -> Group | None:
    """The group, or None when its student tokens are not consecutive or the two sides start at different
    characters (other than whitespace)."""
    positions = [k for k, _ in g_s]
    if positions != list(range(positions[0], positions[0] + len(positions))):
        return None
    s_start, t_start = g_s[0][1][0], g_t[0][1][0]
    if text[min(s_start, t_start) : max(s_start, t_start)].strip():
        return None
    end = g_s[-1][1][1]
    if end <= min(s_start, t_start):  # no characters (e.g. a zero-width token at the end)
        return None
    return Group(positions, [k for k, _ in g_t], min(s_start, t_start), end)


def token_strings(tokenizer: Any) -> dict[int, str]:
    """Each regular token's text as it reads inside a sequence (leading space included), special tokens left out.

    Decodes `[anchor, id]` and strips the anchor's text, so byte-level (`Ġ`) and SentencePiece (`▁`) spellings of a
    leading space both read as " ". Tokens that decode to an incomplete character (U+FFFD) are left out.

    Args:
        tokenizer: a `PreTrainedTokenizerBase`.

    Returns:
        `dict[int, str]`: id -> text.
    """
    anchor = tokenizer.encode("a", add_special_tokens=False)[:1]
    if not anchor:
        raise ValueError("token_strings needs a tokenizer that encodes 'a' to at least one token.")
    prefix = tokenizer.decode(anchor, clean_up_tokenization_spaces=False)
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([anchor + [i] for i in ids], clean_up_tokenization_spaces=False)
    out = {}
    for i, full in zip(ids, texts):
        if full.startswith(prefix) and len(full) > len(prefix) and "\ufffd" not in full:
            out[i] = full[len(prefix) :]
    return out


def shared_token_ids(student_tokenizer: Any, teacher_tokenizer: Any) -> tuple[list[int], list[int]]:
    """Pairs of (student id, teacher id) whose token texts are equal (`token_strings`), one pair per text.

    Returns:
        `(student_ids, teacher_ids)`: `(M,)` lists in the same order (ascending teacher id); where several ids of
        one tokenizer read the same text, the lowest is used.
    """
    by_text: dict[str, int] = {}
    for i, text in sorted(token_strings(student_tokenizer).items()):
        by_text.setdefault(text, i)
    student_ids, teacher_ids, seen = [], [], set()
    for i, text in sorted(token_strings(teacher_tokenizer).items()):
        if text in by_text and text not in seen:
            seen.add(text)
            student_ids.append(by_text[text])
            teacher_ids.append(i)
    return student_ids, teacher_ids
