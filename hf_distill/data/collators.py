"""Collators that turn raw rows into distillation batches.

`RationaleCollator` builds the two task views of distilling step-by-step (Hsieh et al., 2023): every
`{input, label, rationale}` row becomes a label view (`"[label] " + input` -> label) and a rationale view
(`"[rationale] " + input` -> rationale), interleaved `[label, rationale]` per example, with a `task` tensor telling
them apart. `DistillationTrainer` splits the loss by that tensor (see `hf_distill.terms`).

`TeacherCacheCollator` wraps another collator and adds an offline teacher cache's top-k entries to each batch,
aligned by the cache's row-id column (see `hf_distill.cache`).
"""

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import InitVar, dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from transformers.data.data_collator import DataCollatorMixin
from trl.trainer.utils import pad

from ..alignment import row_conversation
from ..heads import unwrap
from ..losses import IGNORE_INDEX
from .context import chat_template_kwargs


logger = logging.getLogger(__name__)

LABEL_TASK, RATIONALE_TASK = 0, 1
VIEWS = {"label": LABEL_TASK, "rationale": RATIONALE_TASK}


@dataclass
class RationaleCollator(DataCollatorMixin):
    r"""
    Two training views per example for distilling step-by-step, for causal LMs and for seq2seq models (T5).

    Causal LMs: each view is prompt + completion in one sequence, with the loss on the completion tokens only; the
    prompt is `prefix + input` in a user turn of the tokenizer's chat template when it has one (the completion is then
    the assistant turn, end-of-turn marker included), else `prefix + input + response_separator` followed by
    `target + eos`. Seq2seq models: the encoder reads `prefix + input`, the decoder labels are `target + eos`.

    Rows are `{input_column, label_column, rationale_column}` mappings of strings; a batch of B rows gives 2B
    sequences ordered `[row 0 label view, row 0 rationale view, row 1 label view, ...]`. Use it with
    `DistillationTrainer`, which keeps these raw columns (it reads `dataset_columns`) and weighs the two views with
    `label_weight` / `rationale_weight`.

    Args:
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): the student's tokenizer.
        model (`PreTrainedModel`, *optional*, init only): the student; sets `seq2seq` from its config, or checks it.
        seq2seq (`bool`, *optional*): build encoder inputs + decoder labels (T5). Defaults to the model's kind, else
            False (causal LM).
        input_column, label_column, rationale_column (`str`): column names (defaults `input`, `label`, `rationale`).
        label_prefix, rationale_prefix (`str`): task prefixes (defaults `"[label] "`, `"[rationale] "`, as the paper).
        views (`tuple[str, ...]`): which views to build, default both; `("label",)` gives plain label fine-tuning.
        use_chat_template (`bool`, *optional*): causal LMs only; default: when the tokenizer has a chat template.
        response_separator (`str`): causal LMs without a chat template: text between prompt and completion.
        max_length (`int`, *optional*): causal LMs: tokens per view (the completion is cut to fit, the prompt keeps
            its last tokens if it alone is too long); seq2seq: encoder tokens. Cuts are counted and logged.
        max_target_length (`int`, *optional*): cap on target tokens (seq2seq decoder labels, causal completions).
        pad_to_multiple_of (`int`, *optional*): pad sequence lengths to a multiple of this.

    Returns (per call):
        `input_ids`, `attention_mask`: `(2B, T)` (encoder inputs for seq2seq); `labels`: `(2B, T)` for causal LMs
        (-100 on prompt and padding), `(2B, T_dec)` for seq2seq (-100 on padding); `task`: `(2B,)`, 0 = label view,
        1 = rationale view.

    Example:
        >>> from tokenizers import Tokenizer, models, pre_tokenizers
        >>> from transformers import PreTrainedTokenizerFast
        >>> words = ["<pad>", "</s>", "<unk>", "[", "]", "label", "rationale", "2", "+", "?", "4", "and", "make"]
        >>> backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        >>> backend.pre_tokenizer = pre_tokenizers.Whitespace()
        >>> tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")
        >>> batch = RationaleCollator(tok)([{"input": "2 + 2 ?", "label": "4", "rationale": "2 and 2 make 4"}])
        >>> batch["task"]
        tensor([0, 1])
        >>> [tok.decode(ids, skip_special_tokens=True) for ids in batch["input_ids"]]
        ['[ label ] 2 + 2 ? 4', '[ rationale ] 2 + 2 ? 2 and 2 make 4']
        >>> batch["labels"][0].tolist()  # prompt and padding -100, loss on "4 </s>" only
        [-100, -100, -100, -100, -100, -100, -100, 10, 1, -100, -100, -100, -100]
    """

    tokenizer: PreTrainedTokenizerBase
    model: InitVar[Any] = None
    seq2seq: bool | None = None
    input_column: str = "input"
    label_column: str = "label"
    rationale_column: str = "rationale"
    label_prefix: str = "[label] "
    rationale_prefix: str = "[rationale] "
    views: tuple[str, ...] = ("label", "rationale")
    use_chat_template: bool | None = None
    response_separator: str = "\n"
    max_length: int | None = 512
    max_target_length: int | None = None
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def __post_init__(self, model: Any) -> None:
        self.views = tuple(self.views)
        unknown = [v for v in self.views if v not in VIEWS]
        if not self.views or unknown or len(set(self.views)) != len(self.views):
            raise ValueError(f"`views` must be distinct names from {list(VIEWS)}, got {self.views}.")
        if model is not None:
            model_is_seq2seq = _is_seq2seq(model)
            if self.seq2seq is None:
                self.seq2seq = model_is_seq2seq
            self.check_model(model)
        self.seq2seq = bool(self.seq2seq)
        if self.use_chat_template is None:
            self.use_chat_template = not self.seq2seq and bool(getattr(self.tokenizer, "chat_template", None))
        if self.use_chat_template and self.seq2seq:
            raise ValueError("`use_chat_template=True` is for causal LMs; a seq2seq collator feeds the encoder text.")
        if self.use_chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("`use_chat_template=True` but the tokenizer has no chat template; set it to False.")
        for name in ("max_length", "max_target_length"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise ValueError(f"`{name}` must be >= 2 (or None), got {value}.")
        self.num_truncated = {"input": 0, "label": 0, "rationale": 0}

    # ------------------------------------------------------------------------------------------- public helpers
    @property
    def dataset_columns(self) -> tuple[str, ...]:
        """Raw dataset columns this collator reads (`DistillationTrainer` keeps them instead of dropping them)."""
        columns = [self.input_column, self.label_column]
        if "rationale" in self.views:
            columns.append(self.rationale_column)
        return tuple(columns)

    def check_model(self, model: Any) -> None:
        """Raise a ValueError when the collator's kind (seq2seq or causal) does not match the model's."""
        model_is_seq2seq = _is_seq2seq(model)
        if bool(self.seq2seq) != model_is_seq2seq:
            built = "encoder inputs + decoder labels (seq2seq)" if self.seq2seq else "prompt + completion (causal LM)"
            kind = "an encoder-decoder (seq2seq) model" if model_is_seq2seq else "a causal LM"
            raise ValueError(
                f"RationaleCollator(seq2seq={bool(self.seq2seq)}) builds {built} batches, but "
                f"{type(unwrap(model)).__name__} is {kind}. Create the collator with `model=` (or "
                f"`seq2seq={model_is_seq2seq}`)."
            )

    def check_rows(self, rows: Sequence[Mapping[str, Any]], offset: int = 0, where: str = "the batch") -> None:
        """Raise a ValueError naming the column and row index of the first row that cannot be collated."""
        columns = [(self.input_column, "input"), (self.label_column, "label")]
        if "rationale" in self.views:
            columns.append((self.rationale_column, "rationale"))
        for i, row in enumerate(rows):
            for column, role in columns:
                ident = f" (id {row['id']!r})" if isinstance(row, Mapping) and "id" in row else ""
                if not isinstance(row, Mapping) or column not in row:
                    keys = sorted(row) if isinstance(row, Mapping) else type(row).__name__
                    raise ValueError(
                        f"Row {offset + i} of {where}{ident} has no {column!r} column (it has {keys}). "
                        f"RationaleCollator reads {role} text from `{role}_column={column!r}`: map your dataset with "
                        "`hf_distill.data.rationales.to_rationale_rows` or set the column names. With a plain "
                        "`transformers.Trainer` also set `remove_unused_columns=False`."
                    )
                value = row[column]
                if not isinstance(value, str) or not value.strip():
                    raise ValueError(
                        f"Row {offset + i} of {where}{ident} has an empty {role} in column {column!r} "
                        f"(value {value!r}). Drop such rows first, e.g. "
                        f"`dataset.filter(lambda r: bool(str(r[{column!r}] or '').strip()))`."
                    )

    def validate(self, dataset: Any) -> None:
        """Check every row of a dataset up front (errors name the dataset row index)."""
        for start in range(0, len(dataset), 1000):
            self.check_rows(_rows(dataset, start, 1000), start, "the dataset")

    def prompt_ids(self, text: str, view: str = "label") -> list[int]:
        """Token ids of one view's prompt (causal) or encoder input (seq2seq), as used in training and inference."""
        prefix = self.label_prefix if view == "label" else self.rationale_prefix
        if self.seq2seq:
            return self.tokenizer(prefix + text, add_special_tokens=True)["input_ids"]
        return self._tokenize_text(self._prompt_text(prefix + text), special=not self.use_chat_template)

    # ------------------------------------------------------------------------------------------- collation
    def torch_call(self, examples: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        self.check_rows(examples)
        sequences, targets, tasks = [], [], []
        truncated = dict.fromkeys(self.num_truncated, 0)
        for row in examples:
            for view in self.views:
                column = self.label_column if view == "label" else self.rationale_column
                source, target, cut = self._view(row[self.input_column], row[column], view)
                truncated["input"] += cut[0]
                truncated[view] += cut[1]
                sequences.append(source)
                targets.append(target)
                tasks.append(VIEWS[view])
        self._log_truncation(truncated)
        batch = self._pad_seq2seq(sequences, targets) if self.seq2seq else self._pad_causal(sequences, targets)
        batch["task"] = torch.tensor(tasks, dtype=torch.long)
        return batch

    def _view(self, text: str, target: str, view: str) -> tuple[list[int], list[int], tuple[int, int]]:
        """(source ids, target ids, (input cut, target cut)); causal: source = prompt, target = completion."""
        prompt = self.prompt_ids(text, view)
        if self.seq2seq:
            completion = self.tokenizer(target, add_special_tokens=True)["input_ids"]
        elif self.use_chat_template:
            completion = self._chat_completion(
                self.label_prefix if view == "label" else self.rationale_prefix, text, target
            )
        else:
            completion = self.tokenizer(target, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        if not self.use_chat_template and eos is not None and (not completion or completion[-1] != eos):
            completion = [*completion, eos]
        cut_input = cut_target = 0
        if self.max_target_length is not None and len(completion) > self.max_target_length:
            completion, cut_target = completion[: self.max_target_length], 1
        if self.seq2seq:
            if self.max_length is not None and len(prompt) > self.max_length:
                prompt, cut_input = prompt[: self.max_length], 1
        elif self.max_length is not None:
            if len(prompt) > self.max_length - 1:  # keep the end of the prompt (generation prompt) and one target
                prompt, cut_input = prompt[len(prompt) - (self.max_length - 1) :], 1
            budget = self.max_length - len(prompt)
            if len(completion) > budget:
                completion, cut_target = completion[:budget], 1
        return prompt, completion, (cut_input, cut_target)

    def _prompt_text(self, user_text: str) -> str:
        if self.use_chat_template:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": user_text}], add_generation_prompt=True, tokenize=False
            )
        return user_text + self.response_separator

    def _chat_completion(self, prefix: str, text: str, target: str) -> list[int]:
        messages = [{"role": "user", "content": prefix + text}, {"role": "assistant", "content": target}]
        full = self.tokenizer.apply_chat_template(messages, tokenize=False)
        prompt = self._prompt_text(prefix + text)
        if not full.startswith(prompt):
            raise ValueError(
                "The tokenizer's chat template does not render the prompt (with add_generation_prompt=True) as a "
                "prefix of the prompt + assistant reply, so the completion cannot be located; set "
                "`use_chat_template=False`."
            )
        return self._tokenize_text(full[len(prompt) :], special=False)

    def _tokenize_text(self, text: str, special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def _log_truncation(self, truncated: dict[str, int]) -> None:
        if not any(truncated.values()):
            return
        first = not any(self.num_truncated.values())
        for key, value in truncated.items():
            self.num_truncated[key] += value
        parts = ", ".join(f"{v} {k}{'s' if v != 1 else ''}" for k, v in truncated.items() if v)
        totals = ", ".join(f"{k} {v}" for k, v in self.num_truncated.items())
        (logger.warning if first else logger.info)(
            "RationaleCollator truncated %s in this batch to fit max_length=%s / max_target_length=%s "
            "(totals so far: %s). Raise the limits or shorten the rationales to keep them whole.",
            parts,
            self.max_length,
            self.max_target_length,
            totals,
        )

    def _pad(self, rows: list[list[int]], value: int) -> torch.Tensor:
        """`(B, T)` long tensor of the rows right-padded with `value` (T: the longest row, rounded up to
        `pad_to_multiple_of`)."""
        if not rows:
            return torch.zeros((0, 0), dtype=torch.long)
        tensors = [torch.tensor(row, dtype=torch.long) for row in rows]
        return pad(tensors, value, "right", self.pad_to_multiple_of or None)

    def _pad_id(self) -> int:
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if candidate is not None:
                return candidate
        return 0

    def _pad_causal(self, prompts: list[list[int]], completions: list[list[int]]) -> dict[str, torch.Tensor]:
        rows = [prompt + completion for prompt, completion in zip(prompts, completions)]
        return {
            "input_ids": self._pad(rows, self._pad_id()),
            "attention_mask": self._pad([[1] * len(row) for row in rows], 0),
            "labels": self._pad([[IGNORE_INDEX] * len(p) + c for p, c in zip(prompts, completions)], IGNORE_INDEX),
        }

    def _pad_seq2seq(self, sources: list[list[int]], targets: list[list[int]]) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self._pad(sources, self._pad_id()),
            "attention_mask": self._pad([[1] * len(source) for source in sources], 0),
            "labels": self._pad(targets, IGNORE_INDEX),
        }


def _is_seq2seq(model: Any) -> bool:
    config = getattr(unwrap(model), "config", None)
    if config is None:
        raise ValueError(f"Cannot tell whether {type(model).__name__} is seq2seq or causal: it has no `config`.")
    return bool(getattr(config, "is_encoder_decoder", False))


def _rows(dataset: Any, start: int, size: int) -> list[Mapping[str, Any]]:
    """Rows `start:start+size` of a `datasets.Dataset` (or any sequence of mappings) as a list of dicts."""
    if hasattr(dataset, "select"):
        return list(dataset.select(range(start, min(start + size, len(dataset)))))
    return list(dataset[start : start + size])


# ----------------------------------------------------------------------------------------------- conversations
CONVERSATION_KEY = "messages"
CONVERSATION_COLUMNS = ("messages", "prompt", "completion")  # TRL's conversational formats
CHAT_KWARGS_COLUMNS = ("tools", "chat_template_kwargs")  # TRL's per-row chat-template arguments
CHAT_KWARGS_KEY = "teacher_chat_kwargs"  # per row: `tools` and `chat_template_kwargs` for the teacher's template
CONTEXT_KEY = "teacher_context"  # per row: the `teacher_context_column` value (cross-tokenizer context distillation)


@dataclass
class ConversationCollator(DataCollatorMixin):
    """Wraps a collator and keeps each row's conversation in the batch as `batch["messages"]`: one list of
    `{"role", "content"}` dicts per row, in row order (row b of `input_ids` is `messages[b]`).

    Used by the trainers with `cross_tokenizer_loss`, so that a teacher with another tokenizer reads the conversation
    rendered with its own chat template (`teachers.cross_tokenizer.CrossTokenizerTeacher.teacher_chat_texts`). The
    conversation comes from a row's `messages` column, or its conversational `prompt` + `completion` columns
    (`row_conversation`); those columns (the trainer keeps them through `remove_unused_columns`: `kept_columns`) are
    removed before `collator` sees the rows, unless `collator` reads them itself (its `dataset_columns`). A batch
    whose rows are not conversations gets no `messages`; a batch mixing both raises. `messages` is never a model
    input (`trainer.NON_MODEL_KEYS`).

    Example:
        >>> from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
        >>> collator = ConversationCollator(DataCollatorForLanguageModeling(pad_token_id=0))
        >>> batch = collator([{"input_ids": [1, 2, 3], "messages": [{"role": "user", "content": "hi"}]},
        ...                   {"input_ids": [4, 5], "prompt": [{"role": "user", "content": "yo"}],
        ...                    "completion": [{"role": "assistant", "content": "ok"}]}])
        >>> batch["input_ids"]
        tensor([[1, 2, 3],
                [4, 5, 0]])
        >>> batch["messages"][1]
        [{'role': 'user', 'content': 'yo'}, {'role': 'assistant', 'content': 'ok'}]

    Rows' chat-template arguments (TRL's `tools` and `chat_template_kwargs` columns) are kept too, as
    `batch["teacher_chat_kwargs"]` (one dict per row), and with `context_column` each row's context as
    `batch["teacher_context"]` (a missing column or value raises).

    Args:
        collator (`Callable`): the wrapped collator.
        context_column (`str`, *optional*): a column only the teacher reads (`teacher_context_column`).
    """

    collator: Callable[[list[dict[str, Any]]], dict[str, Any]]
    context_column: str | None = None
    return_tensors: str = "pt"

    @property
    def dataset_columns(self) -> tuple[str, ...]:
        """The raw columns the wrapped collator reads (e.g. `RationaleCollator`'s), passed through."""
        return tuple(getattr(self.collator, "dataset_columns", ()) or ())

    @property
    def kept_columns(self) -> tuple[str, ...]:
        """Raw columns the trainer keeps through `remove_unused_columns` for this collator."""
        extra = (*CHAT_KWARGS_COLUMNS, *((self.context_column,) if self.context_column else ()))
        return tuple(dict.fromkeys((*getattr(self.collator, "kept_columns", ()), *CONVERSATION_COLUMNS, *extra)))

    def torch_call(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        conversations = [row_conversation(f) for f in features]
        own = set(self.dataset_columns)
        contexts = None
        if self.context_column is not None:
            missing = [i for i, f in enumerate(features) if not isinstance(f.get(self.context_column), str)]
            if missing:
                raise ValueError(
                    f"Rows {missing} of the batch have no text in the context column {self.context_column!r} "
                    "(`teacher_context_column`); give every row one (an empty string is allowed)."
                )
            contexts = [f[self.context_column] for f in features]
        kwargs = [chat_template_kwargs(f) for f in features]
        drop = [c for c in (*CONVERSATION_COLUMNS, *CHAT_KWARGS_COLUMNS, self.context_column) if c and c not in own]
        batch = self.collator([{k: v for k, v in f.items() if k not in drop} for f in features])
        found = [c is not None for c in conversations]
        if any(found) and not all(found):
            raise ValueError(
                f"Rows {[i for i, f in enumerate(found) if not f]} of the batch are not conversations, the others are "
                "(`messages`, or conversational `prompt` + `completion`): give every row the same format."
            )
        if all(found):
            rows = batch["input_ids"].shape[0] if "input_ids" in batch else len(features)
            if rows != len(conversations):
                raise ValueError(
                    f"The collator made {rows} rows of {len(conversations)} conversations (packed or padding-free "
                    "batches): the teacher could not read each row's conversation. Turn packing / padding_free off."
                )
            batch[CONVERSATION_KEY] = conversations
            batch[CHAT_KWARGS_KEY] = kwargs
        if contexts is not None:
            batch[CONTEXT_KEY] = contexts
        return batch
