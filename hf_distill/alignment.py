"""Aligning two tokenizations of the same text by character offsets (cross-tokenizer distillation).

The student's tokens get character spans in the text they decode to (`token_char_spans`); the teacher tokenizes that
text itself with `return_offsets_mapping` (a fast tokenizer). `align_spans` walks both span lists and closes a group
wherever both tokenizations end a token at the same character (the boundaries both tokenizers share, as TRL's GOLD
trainer and ALM do): each group is a run of student tokens and a run of teacher tokens covering the same characters
(up to whitespace that one tokenizer attaches to a token and the other drops). Only groups made of supervised student
tokens are kept, so prompt and padding never count on either side.

`shared_token_ids` pairs the token strings the two vocabularies share (for the `gold` loss).

Conversations: `row_conversation` reads TRL's conversational rows; a teacher with its own chat template reads them
rendered with it (`conversation_templated`, `chat_template_id`), the supervised student tokens located in that text
(`assistant_start`, `relocate_supervised`); `teacher_tokenize` gives the teacher's tokens and spans of the texts.
Used by the cross-tokenizer sources (`teachers.cross_tokenizer*`), the cache writer and `ConversationCollator`.
"""

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from jinja2.exceptions import TemplateError

from .losses import IGNORE_INDEX


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


def shared_special_ids(student_tokenizer: Any, teacher_tokenizer: Any) -> tuple[list[int], list[int]]:
    """Pairs of (student id, teacher id) of special / added tokens spelled the same (`</s>`, `<|im_end|>`), which
    `token_strings` leaves out; TRL's GOLD matches them too (its map compares the vocabularies' raw strings).

    Returns:
        `(student_ids, teacher_ids)`: lists in the same order (ascending teacher id).
    """

    def specials(tok: Any) -> dict[str, int]:
        ids = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}) or {})
        return {tok.convert_ids_to_tokens(i): i for i in sorted(ids) if i < len(tok)}

    theirs, ours = specials(teacher_tokenizer), specials(student_tokenizer)
    pairs = sorted((t_id, ours[text]) for text, t_id in theirs.items() if text in ours)
    return [s for _, s in pairs], [t for t, _ in pairs]


def _is_conversation(value: Any) -> bool:
    """A list of `{"role", "content"}` dicts (TRL's conversational format)."""
    return isinstance(value, list | tuple) and all(isinstance(m, Mapping) and "role" in m for m in value)


def row_conversation(row: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The conversation of a dataset row: its `messages`, or its conversational `prompt` followed by `completion`
    (TRL's two conversational formats); None for a row that is not a conversation.

    Args:
        row (`Mapping`): one dataset row.

    Returns:
        `list[dict]` or None: `[{"role": ..., "content": ...}, ...]`.
    """
    messages = row.get("messages")
    if messages is not None and _is_conversation(messages):
        return [dict(m) for m in messages]
    prompt, completion = row.get("prompt"), row.get("completion")
    if prompt is not None and completion is not None and _is_conversation(prompt) and _is_conversation(completion):
        return [dict(m) for m in (*prompt, *completion)]
    return None


def chat_template_id(tokenizer: Any) -> str | None:
    """sha256 of a tokenizer's chat template (None without one): what a cross-tokenizer cache records of the
    template its teacher read the conversations with."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def conversation_templated(messages: Any, teacher_tokenizer: Any) -> bool:
    """Whether the teacher reads conversations rendered with its own chat template: `messages` (a batch's
    `messages`, or a dataset's conversations) are given and the teacher's tokenizer has a chat template."""
    return messages is not None and bool(getattr(teacher_tokenizer, "chat_template", None))


def assistant_start(tokenizer: Any, messages: list[dict[str, Any]], text: str) -> int:
    """Where the first assistant turn begins in `text` (`messages` rendered with `tokenizer`'s chat template): the
    length of the rendering of the messages before it, when that is a prefix of `text`; else 0.

    Args:
        tokenizer: the teacher's tokenizer. messages (`list[dict]`): one conversation. text (`str`): its rendering.
    """
    first = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), 0)
    if first == 0:
        return 0
    try:
        prefix = tokenizer.apply_chat_template(messages[:first], tokenize=False)
    except (TemplateError, ValueError):  # a template that refuses a conversation without an assistant turn
        return 0
    return len(prefix) if text.startswith(prefix) else 0


def relocate_supervised(
    spans: list[Span | None], labels: list[int], text: str, teacher_text: str, floor: int = 0
) -> list[Span | None]:
    """Student spans moved from the student's decoded `text` into `teacher_text` (the same conversation rendered by
    the teacher's chat template), supervised tokens only.

    Each run of consecutive supervised tokens (`labels != -100`) is looked up in `teacher_text` after the previous
    run, at or after `floor` (where the first assistant turn starts: `assistant_start`) when it is found there, so
    an answer whose text also occurs in the prompt is placed in the answer; a run that is not found (the templates
    changed its text) keeps no spans, so it gets CE only.

    Args:
        spans (`list`): `(T,)` spans in `text`. labels (`list[int]`): `(T,)`. text, teacher_text (`str`).
        floor (`int`): the character of `teacher_text` from which a run is looked up first.

    Returns:
        `list`: `(T,)` spans in `teacher_text`, None outside the supervised runs.
    """
    out: list[Span | None] = [None] * len(spans)
    cursor, j = 0, 0
    while j < len(spans):
        if labels[j] == IGNORE_INDEX or spans[j] is None:
            j += 1
            continue
        run = [j]
        while run[-1] + 1 < len(spans) and labels[run[-1] + 1] != IGNORE_INDEX and spans[run[-1] + 1] is not None:
            run.append(run[-1] + 1)
        start, end = spans[run[0]][0], spans[run[-1]][1]
        piece = text[start:end].strip()
        found = teacher_text.find(piece, max(cursor, floor)) if piece else -1
        if piece and found < 0:
            found = teacher_text.find(piece, cursor)
        if found >= 0:
            shift = found - (start + len(text[start:end]) - len(text[start:end].lstrip()))
            for k in run:
                a, b = spans[k]
                out[k] = (max(found, a + shift), max(found, b + shift))
            cursor = found + len(piece)
        j = run[-1] + 1
    return out


def teacher_tokenize(
    tok: Any, texts: list[str], add_special_tokens: bool = True
) -> tuple[torch.Tensor, list[list[Span | None]]]:
    """The teacher's tokens of each text, its BOS first (so the first text token has a predictor), right-padded.
    A text rendered by a chat template carries its own special tokens (`add_special_tokens=False`).

    Args:
        tok: the teacher's fast tokenizer. texts (`list[str]`): B texts.

    Returns:
        `(ids (B, T_t), spans)`: spans per row (unpadded length), None for special tokens.
    """
    enc = tok(texts, return_offsets_mapping=True, return_special_tokens_mask=True,
              add_special_tokens=add_special_tokens)  # fmt: skip
    bos = tok.bos_token_id
    rows, spans = [], []
    for ids, offsets, special in zip(enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"]):
        row_spans = [None if s or a == b else (a, b) for (a, b), s in zip(offsets, special)]
        if bos is not None and (not ids or ids[0] != bos):
            ids, row_spans = [bos, *ids], [None, *row_spans]
        rows.append(ids)
        spans.append(row_spans)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows]), spans
