"""What only the teacher reads (context distillation): a system prompt and a per-row context, put into the teacher's
own prompt; the completion is the student's, token for token.

Context distillation (Askell et al. 2021; Snell et al. 2022, "Learning by Distilling Context") trains a model to
behave as it does with extra text in its prompt, without that text. The teacher reads `context + prompt + completion`,
the student `prompt + completion`; KD is taken on the completion tokens only, position by position.

`TeacherContext` holds the settings (`teacher_system_prompt`, `teacher_context_column`, `teacher_context_template`,
the length limit) and renders a teacher prompt:

- chat rows (`messages`, or conversational `prompt` + `completion`; TRL's `tools` and `chat_template_kwargs` columns
  are passed to the chat template): the system prompt becomes the first system message (prepended to an existing
  one, separated by a blank line) and the last user message before the first assistant turn becomes
  `template.replace("{context}", context).replace("{prompt}", content)`; the teacher's prompt is that conversation up
  to the first assistant turn, rendered with `add_generation_prompt=True` and tokenized;
- plain rows (anything else: TRL's prompt/completion text, `RationaleCollator` rows, tokenized rows): the student's
  prompt tokens are kept as they are, and the teacher's prompt is `[BOS] + tok(system_prompt + "\\n\\n") +
  tok(template before "{prompt}") + student prompt tokens + tok(template after "{prompt}")`.

`ContextCollator` wraps the trainer's collator and adds the teacher's own rows to each batch: `teacher_input_ids`,
`teacher_attention_mask` and `teacher_labels` (right-padded; labels -100 on the teacher's prompt and padding, the
student's labels on the completion, so both sides supervise the same tokens in the same order), and
`teacher_prompt_ids` (the teacher's prompts, per row, from which `rebuild_teacher_rows` makes the rows again after
on-policy samples replace the completions). Tool-result tokens (the rendering of `tool` messages) are never
supervised, on either side.

Faults: a missing context column (or a row without a value) raises, naming the column and the row; a teacher row
longer than `max_length` raises, naming its lengths (the context is never cut or dropped).
"""

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers.data.data_collator import DataCollatorMixin
from trl.trainer.utils import pad

from ..alignment import row_conversation
from ..losses import IGNORE_INDEX


logger = logging.getLogger(__name__)

DEFAULT_CONTEXT_TEMPLATE = "{context}\n\n{prompt}"
PLACEHOLDERS = ("{context}", "{prompt}")
TEACHER_KEYS = ("teacher_input_ids", "teacher_attention_mask", "teacher_labels", "teacher_prompt_ids")
CHAT_COLUMNS = ("messages", "prompt", "completion", "tools", "chat_template_kwargs")


def read_system_prompt(value: str | None) -> str | None:
    """`teacher_system_prompt` as text: the contents of the file when `value` names an existing file, else `value`.

    Raises:
        `ValueError`: the prompt (or the file) is empty.
    """
    if value is None:
        return None
    text, where = value, "`teacher_system_prompt`"
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            text, where = f.read(), f"the `teacher_system_prompt` file {value!r}"
    if not text.strip():
        raise ValueError(f"{where} is empty: give the text the teacher should read, or unset it.")
    return text


def check_context_template(template: str) -> None:
    """Raise a ValueError unless `template` holds `{context}` and `{prompt}` exactly once each."""
    for placeholder in PLACEHOLDERS:
        if template.count(placeholder) != 1:
            raise ValueError(
                f"`teacher_context_template` must contain {placeholder} exactly once (and {PLACEHOLDERS[0]} / "
                f"{PLACEHOLDERS[1]} once each), got {template!r}."
            )


def chat_template_kwargs(row: Mapping[str, Any]) -> dict[str, Any]:
    """The chat-template keyword arguments TRL passes for a row: `tools` (a list, or a JSON string) and the row's
    `chat_template_kwargs`."""
    tools = row.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    kwargs = dict(row.get("chat_template_kwargs") or {})
    return {"tools": tools, **kwargs} if tools else kwargs


@dataclass
class TeacherContext:
    """The text only the teacher reads, and how it is put into the teacher's prompt (module docstring).

    Args:
        tokenizer: the teacher's tokenizer (the student's for a same-tokenizer teacher).
        system_prompt (`str`, *optional*): the text (already read from a file: `read_system_prompt`).
        column (`str`, *optional*): the per-row context column.
        template (`str`): where the context goes; holds `{context}` and `{prompt}` once each.
        max_length (`int`, *optional*): the most tokens a teacher row may have (prompt + completion).
    """

    tokenizer: Any
    system_prompt: str | None = None
    column: str | None = None
    template: str = DEFAULT_CONTEXT_TEMPLATE
    max_length: int | None = None

    @classmethod
    def from_args(cls, args: Any, tokenizer: Any, max_length: int | None = None) -> "TeacherContext":
        """The settings of a config (`teacher_system_prompt`, read from its file; `teacher_context_column`;
        `teacher_context_template`)."""
        return cls(tokenizer, read_system_prompt(args.teacher_system_prompt), args.teacher_context_column,
                   args.teacher_context_template, max_length)  # fmt: skip

    @property
    def active(self) -> bool:
        """Whether the teacher reads anything the student does not."""
        return self.system_prompt is not None or self.column is not None

    def row_context(self, row: Mapping[str, Any], index: int = 0) -> str | None:
        """The row's context (None without a context column). Raises when the column or its value is missing."""
        if self.column is None:
            return None
        if self.column not in row:
            raise ValueError(
                f"Row {index} of the batch has no {self.column!r} column (`teacher_context_column`); it has "
                f"{sorted(row)}. Add the column, or unset `teacher_context_column`."
            )
        value = row[self.column]
        if not isinstance(value, str):
            raise TypeError(
                f"Row {index} has {value!r} in the context column {self.column!r}: each row needs a text (an empty "
                "string is allowed); drop or fill such rows first."
            )
        return value

    def fill(self, prompt: str, context: str | None) -> str:
        """`prompt` with the context put in by the template (`prompt` unchanged without a context)."""
        if context is None:
            return prompt
        return self.template.replace("{context}", context).replace("{prompt}", prompt)

    def teacher_messages(self, messages: list[dict[str, Any]], context: str | None) -> list[dict[str, Any]]:
        """The teacher's conversation: the system prompt as (the start of) the first system message, and the context
        put into the last user message before the first assistant turn (`fill`)."""
        messages = [dict(m) for m in messages]
        first = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), len(messages))
        if context is not None:
            user = next((i for i in range(first - 1, -1, -1) if messages[i].get("role") == "user"), None)
            if user is None or not isinstance(messages[user].get("content"), str):
                raise ValueError(
                    "The context (`teacher_context_column`) goes into the last user message before the first "
                    f"assistant turn, and this conversation has no such text message: {messages[:first]}."
                )
            messages[user]["content"] = self.fill(messages[user]["content"], context)
        if self.system_prompt is not None:
            if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
                messages[0]["content"] = self.system_prompt + "\n\n" + messages[0]["content"]
            else:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def chat_prompt_ids(self, row: Mapping[str, Any], messages: list[dict[str, Any]], index: int = 0) -> list[int]:
        """The teacher's prompt tokens of a chat row: its conversation up to the first assistant turn, with the
        system prompt and context (`teacher_messages`), rendered with `add_generation_prompt=True`."""
        teacher = self.teacher_messages(messages, self.row_context(row, index))
        first = next((i for i, m in enumerate(teacher) if m.get("role") == "assistant"), len(teacher))
        text = self.tokenizer.apply_chat_template(teacher[:first], add_generation_prompt=True, tokenize=False,
                                                  **chat_template_kwargs(row))  # fmt: skip
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def plain_text(self, prompt: str, context: str | None) -> str:
        """The teacher's prompt text of a plain row from the student's prompt text (the cross-tokenizer path): the
        system prompt and a blank line, then `fill(prompt, context)`."""
        text = self.fill(prompt, context)
        return text if self.system_prompt is None else self.system_prompt + "\n\n" + text

    def plain_prompt_ids(self, row: Mapping[str, Any], prompt_ids: list[int], index: int = 0) -> list[int]:
        """The teacher's prompt tokens of a plain row from the student's `prompt_ids` (kept as they are)."""
        bos = self.tokenizer.bos_token_id
        head = [bos] if bos is not None and prompt_ids[:1] == [bos] else []
        body = prompt_ids[len(head) :]
        before, after = "", ""
        context = self.row_context(row, index)
        if context is not None:
            before, after = self.template.replace("{context}", context).split("{prompt}")
        if self.system_prompt is not None:
            before = self.system_prompt + "\n\n" + before
        encode = lambda text: self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []  # noqa: E731
        return head + encode(before) + body + encode(after)


def tool_result_mask(
    tokenizer: Any, row: Mapping[str, Any], messages: list[dict[str, Any]], ids: list[int]
) -> list[bool]:
    """Per token of `ids` (a row's real tokens, the rendering of `messages` with `tokenizer`'s chat template, maybe cut
    at the end), whether it renders a `tool` message (its result): such tokens are never supervised.

    The characters of message k are those the rendering of `messages[:k + 1]` adds to that of `messages[:k]`; tokens
    are placed by the tokenizer's offsets. Raises when `ids` is not that rendering (the result cannot be located).
    """
    tool_turns = [k for k, m in enumerate(messages) if m.get("role") == "tool"]
    if not tool_turns:
        return [False] * len(ids)
    kwargs = chat_template_kwargs(row)
    render = lambda ms: tokenizer.apply_chat_template(ms, tokenize=False, **kwargs) if ms else ""  # noqa: E731
    text = render(messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if encoded["input_ids"][: len(ids)] != ids:
        raise ValueError(
            "A conversation with tool messages was not tokenized as its chat-template rendering, so its tool results "
            "cannot be kept out of the loss; tokenize it with the tokenizer's chat template (as TRL does)."
        )
    spans = []
    for k in tool_turns:
        start, end = len(render(messages[:k])), len(render(messages[: k + 1]))
        if not text.startswith(render(messages[: k + 1])):
            raise ValueError(f"The chat template does not render message {k} (a tool result) as a prefix extension.")
        spans.append((start, end))
    offsets = encoded["offset_mapping"][: len(ids)]
    return [any(a <= s < b for a, b in spans) for s, _ in offsets]


@dataclass
class ContextCollator(DataCollatorMixin):
    """Wraps the trainer's collator; adds the teacher's own rows (`teacher_input_ids`, `teacher_attention_mask`,
    `teacher_labels`: `(B, T_t)`; `teacher_prompt_ids`: B lists) built by `context` (module docstring).

    Each row of the wrapped collator's batch (or each of an example's consecutive rows, when the collator makes
    several per example, as `RationaleCollator`'s two views) is cut where its supervised tokens start (the first
    label != -100); the teacher's row is the teacher's prompt followed by the student's tokens from there on, with
    their labels, so the i-th supervised token of a student row is the i-th of its teacher row. Tool-result tokens of
    chat rows get label -100 on both sides. Packed / padding-free batches are refused (a row must be one example).

    Args:
        collator (`Callable`): the wrapped collator.
        context (`TeacherContext`): what the teacher reads.
        pad_token_id (`int`): padding of `teacher_input_ids`.
    """

    collator: Callable[[list[dict[str, Any]]], dict[str, Any]]
    context: TeacherContext
    pad_token_id: int = 0
    return_tensors: str = "pt"

    @property
    def dataset_columns(self) -> tuple[str, ...]:
        """The raw columns the wrapped collator reads, passed through."""
        return tuple(getattr(self.collator, "dataset_columns", ()) or ())

    @property
    def kept_columns(self) -> tuple[str, ...]:
        """Raw columns the trainer keeps through `remove_unused_columns`: the conversation, tools and context."""
        own = (*CHAT_COLUMNS, *((self.context.column,) if self.context.column else ()))
        return tuple(dict.fromkeys((*getattr(self.collator, "kept_columns", ()), *own)))

    def torch_call(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        keep = set(self.dataset_columns) | set(getattr(self.collator, "kept_columns", ()))
        drop = {c for c in self.kept_columns if c not in keep}
        batch = self.collator([{k: v for k, v in f.items() if k not in drop} for f in features])
        rows = batch["input_ids"].shape[0] if "input_ids" in batch else 0
        if not rows or rows % len(features) or "position_ids" in batch:
            raise ValueError(
                f"Context distillation needs whole examples as batch rows (the teacher's prompt differs per row), got "
                f"{rows} rows for {len(features)} examples: turn packing / padding_free off."
            )
        per = rows // len(features)  # views per example (RationaleCollator: [label, rationale] per example)
        ids, labels = batch["input_ids"], batch["labels"]
        mask = batch.get("attention_mask", torch.ones_like(ids))
        prompts = []
        for b in range(rows):
            row = features[b // per]
            start, cut, end = row_bounds(ids[b], labels[b], mask[b])
            messages = row_conversation(row)
            if messages is not None:
                real = ids[b, start:end].tolist()
                tool = tool_result_mask(self.context.tokenizer, row, messages, real)
                if any(tool):
                    labels[b, start:end][torch.tensor(tool)] = IGNORE_INDEX
                prompts.append(self.context.chat_prompt_ids(row, messages, b))
            else:
                prompts.append(self.context.plain_prompt_ids(row, ids[b, start:cut].tolist(), b))
        batch.update(rebuild_teacher_rows(batch, prompts, self.pad_token_id, self.context.max_length))
        return batch


def row_bounds(ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[int, int, int]:
    """`(start, cut, end)` of one row: its real tokens are `[start, end)` (`mask` `(T,)`), its supervised part starts
    at `cut` (the first label != -100; `end` when none is)."""
    real = mask.nonzero().flatten()
    if real.numel() == 0:
        return 0, 0, 0
    start, end = int(real[0]), int(real[-1]) + 1
    supervised = (labels[start:end] != IGNORE_INDEX).nonzero().flatten()
    return start, start + int(supervised[0]) if supervised.numel() else end, end


def rebuild_teacher_rows(
    batch: dict[str, Any], prompts: list[list[int]], pad_token_id: int, max_length: int | None = None
) -> dict[str, Any]:
    """The teacher's rows of a batch: each row's teacher prompt (`prompts[b]`) followed by the batch row's tokens from
    its first supervised one on, with their labels (-100 on the prompt and padding; also on a completion's first
    token when the student row has no prompt, since the student has no position predicting it).

    Args:
        batch (`dict`): `input_ids`, `labels` `(B, T)`, optional `attention_mask` `(B, T)`.
        prompts (`list[list[int]]`): B teacher prompts.
        pad_token_id (`int`): padding of `teacher_input_ids`.
        max_length (`int`, *optional*): the most tokens of a teacher row; longer raises (a context is never cut).

    Returns:
        `dict`: `teacher_input_ids`, `teacher_attention_mask`, `teacher_labels` `(B, T_t)`, `teacher_prompt_ids`.
    """
    ids, labels = batch["input_ids"], batch["labels"]
    mask = batch.get("attention_mask", torch.ones_like(ids))
    rows, row_labels = [], []
    for b, prompt in enumerate(prompts):
        start, cut, end = row_bounds(ids[b], labels[b], mask[b])
        completion, targets = ids[b, cut:end].tolist(), labels[b, cut:end].tolist()
        if cut == start and targets:  # no student prompt: the student never predicts its first token
            targets[0] = IGNORE_INDEX
        if max_length is not None and len(prompt) + len(completion) > max_length:
            raise ValueError(
                f"Row {b}: the teacher's prompt ({len(prompt)} tokens, with the system prompt / context) plus the "
                f"completion ({len(completion)} tokens) is {len(prompt) + len(completion)} tokens, over the limit of "
                f"{max_length} (`max_length`, else the teacher's `max_position_embeddings`). The context is never "
                "cut: shorten it or the system prompt, or raise `max_length`."
            )
        rows.append(prompt + completion)
        row_labels.append([IGNORE_INDEX] * len(prompt) + targets)
    device = ids.device
    as_tensor = lambda xs, value: pad([torch.tensor(x, dtype=torch.long) for x in xs], value, "right").to(device)  # noqa: E731
    return {
        "teacher_input_ids": as_tensor(rows, pad_token_id),
        "teacher_attention_mask": as_tensor([[1] * len(r) for r in rows], 0),
        "teacher_labels": as_tensor(row_labels, IGNORE_INDEX),
        "teacher_prompt_ids": [list(p) for p in prompts],
    }
