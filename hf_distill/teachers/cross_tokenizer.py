"""A live teacher with another tokenizer than the student's: ULD, GOLD or ALM on character-aligned spans.

Per micro-batch (`CrossTokenizerTeacher`):

1. `outputs`: each row's student ids (padding removed) are decoded with the student's tokenizer (special tokens
   skipped) into a text and per-token character spans (`alignment.token_char_spans`). The teacher tokenizes that text
   itself (its BOS first, offsets kept) and its base model runs under no_grad: final hidden states `(B, T_t, H_t)`,
   no `[B, T_t, V_t]` logits. A batch that carries the rows' conversations (`messages`, kept by
   `data.collators.ConversationCollator`) is read rendered with the teacher's own chat template instead, the
   supervised student tokens located in that text (`teacher_texts`, `relocate_supervised`).
2. `terms`: the student's supervised target tokens and the teacher's tokens are grouped where both tokenizations end
   a token at the same character (`alignment.align_spans`); groups with prompt or padding tokens are dropped. Each
   group's distribution is merged as GOLD does: the distribution predicting its first token, times the probabilities
   of its later (actual) tokens. The teacher's rows are reduced chunk by chunk from hidden states
   (`losses.cross_tokenizer.teacher_row_stats`: sorted top-k, tail mass, shared-token probabilities), so at most
   `[chunk, V_t]` teacher probabilities exist at once. `kd` is the sum over groups of `uld`, `gold` or `alm`
   (`losses.cross_tokenizer`; `alm` matches the groups' likelihoods, i.e. the merged probability of their actual
   text), weight `kd_scale(args)`; `ce` is the student's cross-entropy summed over its
   supervised tokens. Both are normalised by the supervised student tokens, like every other source.

Vocabularies: each side's distribution is over its tokenizer's tokens, `len(tokenizer)` of them. An output embedding
padded beyond its tokenizer (the common case: Qwen, many checkpoints rounded to a multiple of 64) has rows that are no
token; they are left out of every divergence (the softmax runs over the first `len(tokenizer)` logits), so a padded
model gives the loss of its unpadded twin. A tokenizer longer than the embedding, or a teacher tokenizer other than the
one saved with the teacher, is refused when the source is built (`models.tokenizer_vocab_size`,
`models.check_saved_tokenizer`).

Supervised student tokens that no group covers (special tokens such as the EOS target, characters the teacher
tokenizes across a prompt/completion boundary) get the CE term only; `cross_tokenizer_aligned` logs the fraction.
"""

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..alignment import (
    Group,
    Span,
    align_spans,
    assistant_start,
    conversation_templated,
    relocate_supervised,
    shared_special_ids,
    shared_token_ids,
    teacher_tokenize,
    token_char_spans,
)
from ..data.collators import CHAT_KWARGS_KEY, CONTEXT_KEY, CONVERSATION_KEY, ConversationCollator
from ..data.context import TeacherContext
from ..heads import decoder_of, lm_head_of
from ..losses import IGNORE_INDEX
from ..losses.cross_tokenizer import GOLD_BETAS, alm, gold_from_parts, sorted_head, teacher_row_stats, uld_from_sorted
from ..model_card import CardTeacher, live_teachers, name_line
from ..models import check_saved_tokenizer, teacher_tokenizer_of, tokenizer_vocab_size
from ..terms import LossTerms, SupervisedView, kd_scale, logit_terms
from .base import SourceContext, SourceRequest, TeacherSource, reads_context
from .live import load_live_teachers


logger = logging.getLogger(__name__)


@dataclass
class CrossTokenizerOutputs:
    """The teacher's side of one micro-batch.

    Attributes:
        last_hidden_state (`torch.Tensor`): `(B, T_t, H_t)` teacher final hidden states, or `(B, T_t, V_t)` logits
            when the teacher's head cannot be applied row by row (the trainer's finiteness check reads it).
        input_ids (`torch.Tensor`): `(B, T_t)` the teacher's tokens (right-padded).
        texts (`list[str]`): the text of each row.
        student_spans (`list[list]`): per row, per student position (T), the token's character span or None.
        teacher_spans (`list[list]`): per row, per teacher position (T_t), the span or None (BOS, padding).
    """

    last_hidden_state: torch.Tensor
    input_ids: torch.Tensor
    texts: list[str]
    student_spans: list[list[Span | None]]
    teacher_spans: list[list[Span | None]]


class CrossTokenizerTeacher(TeacherSource):
    """One live causal-LM teacher whose tokenizer differs from the student's (`cross_tokenizer_loss`: uld | gold |
    alm).

    Args:
        context (`SourceContext`): the run; `context.tokenizer` (the student's, a fast tokenizer) is required.
        teacher (`nn.Module`, *optional*): the teacher causal LM (None for a subclass that reads the teacher's
            distributions elsewhere: `cross_tokenizer_cache.CachedCrossTokenizerTeacher`).
        teacher_tokenizer: the teacher's fast tokenizer.
    """

    kind = "cross-tokenizer"
    name = "cross-tokenizer"
    batch_keys = (CONVERSATION_KEY, CHAT_KWARGS_KEY, CONTEXT_KEY)

    def __init__(self, context: SourceContext, teacher: nn.Module | None, teacher_tokenizer: Any):
        super().__init__(context)
        args = context.args
        if context.head.kind != "causal_lm":
            raise ValueError(
                f"`cross_tokenizer_loss` distils causal LMs (the student is a {context.head.kind} model); use a "
                "teacher with the student's tokenizer for other heads."
            )
        if context.tokenizer is None:
            raise ValueError("`cross_tokenizer_loss` needs the student's tokenizer: pass `processing_class=`.")
        for role, tok in (("student", context.tokenizer), ("teacher", teacher_tokenizer)):
            if not getattr(tok, "is_fast", False):
                raise ValueError(
                    f"`cross_tokenizer_loss` aligns tokens by character offsets, which needs a fast tokenizer; the "
                    f"{role}'s is {type(tok).__name__}. Load it with `use_fast=True` (a `tokenizer.json`)."
                )
        if context.feature_kwargs:
            raise ValueError("`cross_tokenizer_loss` does not combine with hidden-state / attention terms.")
        if teacher is not None:
            check_saved_tokenizer(teacher, teacher_tokenizer)
        # each side's real vocabulary (<= its embedding's rows, checked once here): padded rows are no token
        self.student_vocab = tokenizer_vocab_size(context.student, context.tokenizer, "student")
        self.teacher_vocab = tokenizer_vocab_size(teacher, teacher_tokenizer, "teacher")
        self.models = [teacher] if teacher is not None else []
        self.teacher_tokenizer = teacher_tokenizer
        self.loss = args.cross_tokenizer_loss
        self.top_k = args.cross_tokenizer_top_k
        self.chunk_size = args.kd_chunk_size or 64
        self._shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # context distillation: what only the teacher reads (system prompt, context column), in its own template
        self.reader = TeacherContext.from_args(args, teacher_tokenizer) if reads_context(args) else None

    @classmethod
    def requested(cls, request: SourceRequest) -> bool:
        args = request.args
        return args.cross_tokenizer_loss is not None and args.teacher_cache is None and len(request.teachers) == 1

    def card_teacher(self) -> CardTeacher:
        """The teacher by name and revision or fingerprint, its own tokenizer and the cross-tokenizer loss."""
        teacher = live_teachers(self.context.args, self.models)
        return CardTeacher(f"{teacher.description}, {self.tokenizer_line()}", teacher.base_models)

    def tokenizer_line(self) -> str:
        """`read with its own tokenizer `<name>` (<V_t> tokens); cross-tokenizer loss `<loss>``, for the card."""
        tok = self.teacher_tokenizer
        name = getattr(tok, "name_or_path", None) or type(tok).__name__
        return f"read with its own tokenizer {name_line(name)} ({len(tok)} tokens); cross-tokenizer loss `{self.loss}`"

    @classmethod
    def describe(cls, request: SourceRequest) -> str:
        return "`teacher_model` (with `cross_tokenizer_loss`)"

    @classmethod
    def from_request(cls, request: SourceRequest, context: SourceContext) -> TeacherSource:
        """The teacher loaded with its own tokenizer (`models.teacher_tokenizer_of`: `teacher_processing_class`,
        else `teacher_tokenizer_name_or_path`, else the teacher's own), checked to be a causal LM like the student,
        and placed; the `none` source when no term needs it."""
        if not request.needs_teacher:
            logger.info("kd_weight is 0 and no hint/relation term is on: the teacher is not loaded or run.")
            return TeacherSource(context)
        args = context.args
        gguf_file = (args.teacher_model_init_kwargs or {}).get("gguf_file")
        tokenizer = teacher_tokenizer_of(request.teacher, request.teacher_processing_class,
                                         args.teacher_tokenizer_name_or_path, gguf_file)  # fmt: skip
        (teacher,), _ = load_live_teachers(context, [request.teacher], [tokenizer])
        return cls(context, teacher, tokenizer)

    def wrap_collator(self, collator: Any) -> ConversationCollator:
        """Rows' conversations kept in the batch (`messages`, with their `tools` / `chat_template_kwargs`), for the
        teacher's own chat template; and each row's context (`teacher_context_column`)."""
        return ConversationCollator(collator, self.reader.column if self.reader is not None else None)

    @classmethod
    def from_args(
        cls, context: SourceContext, teacher: nn.Module, teacher_tokenizer: Any = None
    ) -> "CrossTokenizerTeacher":
        """The source for a run with `cross_tokenizer_loss` set, outside the trainer: the teacher's tokenizer is
        `teacher_tokenizer` when given, else `models.teacher_tokenizer_of` (`teacher_tokenizer_name_or_path`, else
        `teacher_model_name_or_path`, else the name the teacher was loaded from)."""
        args = context.args
        name = args.teacher_model_name_or_path
        tokenizer = teacher_tokenizer_of(name if isinstance(name, str) else teacher, teacher_tokenizer,
                                         args.teacher_tokenizer_name_or_path)  # fmt: skip
        return cls(context, teacher, tokenizer)

    def shared_ids(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(student_ids (M,), teacher_ids (M,), teacher_to_student (V_t,))` of the shared token strings, computed
        once (`alignment.shared_token_ids`, and the special tokens spelled the same: `shared_special_ids`);
        `teacher_to_student` is -1 for teacher ids without a student twin."""
        if self._shared is None:
            s_ids, t_ids = shared_token_ids(self.context.tokenizer, self.teacher_tokenizer)
            special_s, special_t = shared_special_ids(self.context.tokenizer, self.teacher_tokenizer)
            s_ids, t_ids = s_ids + special_s, t_ids + special_t
            if not s_ids:
                raise ValueError(
                    "The student's and teacher's vocabularies share no token string, so `cross_tokenizer_loss: gold` "
                    "has no exact part; use `uld`."
                )
            s, t = torch.tensor(s_ids), torch.tensor(t_ids)
            t_vocab = max(len(self.teacher_tokenizer), int(t.max()) + 1)
            to_student = torch.full((t_vocab,), -1, dtype=torch.long).index_copy(0, t, s)
            self._shared = (s, t, to_student)
        return tuple(x.to(device) for x in self._shared)

    def student_texts(self, model_inputs: dict[str, Any]) -> tuple[list[str], list[list[Span | None]]]:
        """Each row's text (its student ids, padding removed, decoded) and per student position `(T,)` the token's
        character span in it (None for padding and special tokens)."""
        input_ids = model_inputs["input_ids"]
        mask = model_inputs.get("attention_mask")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
        texts, student_spans = [], []
        for ids, row_mask in zip(input_ids.tolist(), mask.tolist()):
            positions = [j for j, m in enumerate(row_mask) if m]
            text, spans = token_char_spans(self.context.tokenizer, [ids[j] for j in positions])
            row_spans: list[Span | None] = [None] * len(ids)
            for j, span in zip(positions, spans):
                row_spans[j] = span
            texts.append(text)
            student_spans.append(row_spans)
        return texts, student_spans

    def teacher_texts(
        self, model_inputs: dict[str, Any], batch: dict[str, Any]
    ) -> tuple[list[str], list[list[Span | None]], bool]:
        """The text the teacher reads for each row and the student's spans in it: the conversation rendered with the
        teacher's chat template when the batch carries `messages` and the teacher has a template (supervised student
        tokens relocated into it, `relocate_supervised`), else the decoded student text (`student_texts`).

        Returns:
            `(texts, student_spans, templated)`: B texts, per row `(T,)` spans, and whether the template was used.
        """
        texts, student_spans = self.student_texts(model_inputs)
        templated = self.teacher_chat_texts(batch)
        if templated is None:
            if self.reader is None:
                return texts, student_spans, False
            return (*self.plain_context_texts(texts, student_spans, batch), False)
        messages = self.teacher_conversations(batch)
        floors = [assistant_start(self.teacher_tokenizer, m, t) for m, t in zip(messages, templated)]
        rows = zip(student_spans, batch["labels"].tolist(), texts, templated, floors)
        return templated, [relocate_supervised(*row) for row in rows], True

    def outputs(self, model_inputs: dict[str, Any], batch: dict[str, Any]) -> CrossTokenizerOutputs:
        texts, student_spans, templated = self.teacher_texts(model_inputs, batch)
        t_ids, t_spans = self.teacher_tokenize(texts, add_special_tokens=not templated)
        device = next(self.model.parameters()).device
        t_ids = t_ids.to(device)
        t_mask = torch.zeros_like(t_ids)
        for b, spans in enumerate(t_spans):
            t_mask[b, : len(spans)] = 1
        t_spans = [spans + [None] * (t_ids.shape[1] - len(spans)) for spans in t_spans]
        with torch.no_grad():
            if lm_head_of(self.model) is not None:
                hidden = decoder_of(self.model)(input_ids=t_ids, attention_mask=t_mask).last_hidden_state
            else:
                hidden = self.model(input_ids=t_ids, attention_mask=t_mask).logits
        return CrossTokenizerOutputs(hidden, t_ids, texts, student_spans, t_spans)

    def teacher_chat_texts(self, batch: dict[str, Any]) -> list[str] | None:
        """The conversations of the batch rendered with the teacher's own chat template, when the batch carries them
        (`messages`: one list of `{"role", "content"}` dicts per row, kept by the collator) and the teacher's
        tokenizer has a template; else None (the teacher reads the decoded student text)."""
        messages = batch.get("messages")
        if not conversation_templated(messages, self.teacher_tokenizer):
            return None
        if len(messages) != batch["input_ids"].shape[0]:
            raise ValueError(f"`messages` has {len(messages)} conversations for {batch['input_ids'].shape[0]} rows.")
        kwargs = batch.get(CHAT_KWARGS_KEY) or [{}] * len(messages)
        messages = self.teacher_conversations(batch)
        return [self.teacher_tokenizer.apply_chat_template(m, tokenize=False, **k) for m, k in zip(messages, kwargs)]

    def teacher_conversations(self, batch: dict[str, Any]) -> list[list[dict[str, Any]]]:
        """The batch's conversations as the teacher reads them: with the system prompt and each row's context
        (`data.context.TeacherContext.teacher_messages`) when the teacher reads a context."""
        if self.reader is None:
            return batch["messages"]
        contexts = batch.get(CONTEXT_KEY) or [None] * len(batch["messages"])
        return [self.reader.teacher_messages(m, c) for m, c in zip(batch["messages"], contexts)]

    def plain_context_texts(
        self, texts: list[str], student_spans: list[list[Span | None]], batch: dict[str, Any]
    ) -> tuple[list[str], list[list[Span | None]]]:
        """Plain rows with a context: each text's prompt (before its first supervised token) replaced by the
        teacher's (`TeacherContext.plain_text`); the supervised spans moved with the completion, the prompt's
        dropped (they are never aligned)."""
        contexts = batch.get(CONTEXT_KEY) or [None] * len(texts)
        out_texts, out_spans = [], []
        for text, spans, labels, context in zip(texts, student_spans, batch["labels"].tolist(), contexts):
            first = next((j for j, s in enumerate(spans) if s is not None and labels[j] != IGNORE_INDEX), None)
            cut = spans[first][0] if first is not None else len(text)
            prompt = self.reader.plain_text(text[:cut], context)
            shift = len(prompt) - cut
            moved = [
                None if s is None or j < (first or 0) else (s[0] + shift, s[1] + shift) for j, s in enumerate(spans)
            ]
            out_texts.append(prompt + text[cut:])
            out_spans.append(moved)
        return out_texts, out_spans

    def teacher_tokenize(
        self, texts: list[str], add_special_tokens: bool = True
    ) -> tuple[torch.Tensor, list[list[Span | None]]]:
        """`teacher_tokenize` with this source's teacher tokenizer."""
        return teacher_tokenize(self.teacher_tokenizer, texts, add_special_tokens)

    def groups(self, outputs: CrossTokenizerOutputs, labels: torch.Tensor) -> list[list[Group]]:
        """Per row, the aligned groups of supervised student tokens (`labels != -100`) with a predictor row on both
        sides (student position >= 1, teacher position >= 1)."""
        out = []
        for b, row_labels in enumerate(labels.tolist()):
            student = [
                span if j >= 1 and row_labels[j] != IGNORE_INDEX else None
                for j, span in enumerate(outputs.student_spans[b])
            ]
            groups = align_spans(student, outputs.teacher_spans[b], outputs.texts[b])
            out.append([g for g in groups if g.teacher[0] >= 1])
        return out

    def teacher_stats(self, teacher_outputs: Any, rows: torch.Tensor, n_groups: int) -> dict[str, torch.Tensor]:
        """The teacher's side of the groups (`losses.cross_tokenizer.teacher_row_stats`, chunk by chunk from its hidden
        states): `rows` `(R,)` are flat `(B * T_t)` indices of predictor rows, the first `n_groups` the groups' first
        rows; returns `target_logprobs (R,)` (of the token each row predicts) and, for those first rows, `top (G, K)`,
        `tail (G,)`, `argmax (G,)` and with gold `shared (G, M)`."""
        args = self.context.args
        t_hidden = teacher_outputs.last_hidden_state.reshape(-1, teacher_outputs.last_hidden_state.shape[-1])
        t_ids = teacher_outputs.input_ids.reshape(-1).to(t_hidden.device)
        rows = rows.to(t_hidden.device)
        head = lm_head_of(self.model)
        shared_t = self.shared_ids(t_hidden.device)[1]
        return teacher_row_stats(
            t_hidden[rows],
            None if head is None else head.weight,
            t_ids[rows + 1],
            torch.arange(n_groups, device=t_hidden.device),
            top_k=self.top_k,
            shared_ids=shared_t if self.loss == "gold" else None,
            vocab_size=self.teacher_vocab,
            temperature=args.temperature,
            bias=None if head is None else head.bias,
            logit_scale=1.0 if head is None else head.logit_scale,
            softcap=None if head is None else head.softcap,
            chunk_size=self.chunk_size,
        )

    def teacher_vocab_size(self, teacher_outputs: Any) -> int:
        """V_t, the size of the teacher's distributions (its tokenizer's tokens; rows of a padded lm_head beyond them
        are left out): the denominator of gold's matched weight."""
        return self.teacher_vocab

    def terms(self, student_outputs: Any, teacher_outputs: CrossTokenizerOutputs, view: SupervisedView) -> LossTerms:
        if view.shift_labels is not None:
            raise ValueError("`cross_tokenizer_loss` does not support padding-free batches (`shift_labels`) yet.")
        args, logits = self.context.args, student_outputs.logits
        terms = logit_terms(logits, None, view, args)
        groups = self.groups(teacher_outputs, view.labels)
        s_base, s_later, s_later_group, t_base, t_later, t_later_group = [], [], [], [], [], []
        T, T_t = logits.shape[1], teacher_outputs.input_ids.shape[1]
        for b, row in enumerate(groups):
            for g in row:
                index = len(s_base)
                s_base.append(b * T + g.student[0] - 1)
                t_base.append(b * T_t + g.teacher[0] - 1)
                s_later += [b * T + j - 1 for j in g.student[1:]]
                s_later_group += [index] * (len(g.student) - 1)
                t_later += [b * T_t + i - 1 for i in g.teacher[1:]]
                t_later_group += [index] * (len(g.teacher) - 1)
        n_groups = len(s_base)
        terms.metric("cross_tokenizer_aligned", logits.new_tensor(sum(len(g.student) for r in groups for g in r)),
                     terms.n_items)  # fmt: skip
        if n_groups == 0:
            return terms.add("kd", logits.sum() * 0.0, kd_scale(args))  # keeps the graph (DDP) with no group
        device = logits.device
        as_index = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        s_base, s_later, s_later_group = as_index(s_base), as_index(s_later), as_index(s_later_group)
        t_base, t_later, t_later_group = as_index(t_base), as_index(t_later), as_index(t_later_group)

        # Student: the distribution predicting each group's first token, times the probabilities of its later tokens.
        # Padded rows of the student's lm_head (beyond its tokenizer) are no token: left out of the softmax.
        s_ids = view.batch["input_ids"].reshape(-1).to(device)
        flat = logits.reshape(-1, logits.shape[-1])[:, : self.student_vocab]  # (B * T, V_s)
        s_logprobs = (flat[s_base].float() / args.temperature).log_softmax(-1)  # (G, V_s)
        s_log_c = torch.zeros(n_groups, device=device)
        if s_later.numel():
            later = (flat[s_later].float() / args.temperature).log_softmax(-1).gather(-1, s_ids[s_later + 1, None])
            s_log_c = s_log_c.index_add(0, s_later_group, later.squeeze(-1))
        s_probs = (s_logprobs + s_log_c[:, None]).exp()  # (G, V_s), unnormalised when a group merges tokens

        # Teacher: reduced chunk by chunk from hidden states (no [rows, V_t] tensor beyond one chunk).
        stats = self.teacher_stats(teacher_outputs, torch.cat([t_base, t_later]), n_groups)
        shared_s, _, t_to_s = self.shared_ids(device)
        stats = {key: value.to(device) for key, value in stats.items()}
        t_log_c = torch.zeros(n_groups, device=device)
        if t_later.numel():
            t_log_c = t_log_c.index_add(0, t_later_group, stats["target_logprobs"][n_groups:])
        t_scale = t_log_c.exp()[:, None]
        t_top, t_tail = stats["top"] * t_scale, stats["tail"] * t_scale[:, 0]

        if self.loss == "alm":  # the chunk's likelihood on each side: its first token's probability times the rest
            s_loglik = s_logprobs.gather(-1, s_ids[s_base + 1, None]).squeeze(-1) + s_log_c
            kd = alm(s_loglik, stats["target_logprobs"][:n_groups] + t_log_c)
        elif self.loss == "gold":  # TRL's hybrid: kd_loss's divergence on the shared tokens, ULD on the rest
            rest = torch.ones(s_probs.shape[-1], dtype=torch.bool, device=device)
            rest[shared_s] = False
            beta = GOLD_BETAS.get(args.kd_loss, args.beta)
            weight = shared_s.numel() / self.teacher_vocab_size(teacher_outputs)
            kd = gold_from_parts(s_probs[:, shared_s], stats["shared"] * t_scale,
                                 sorted_head(s_probs[:, rest], self.top_k), (t_top, t_tail), weight, beta)  # fmt: skip
        else:
            kd = uld_from_sorted(*sorted_head(s_probs, self.top_k), t_top, t_tail)
        terms.add("kd", kd.sum(), kd_scale(args))
        # top-1 agreement, defined where the teacher's top token has a student twin (same token string)
        twin = t_to_s[stats["argmax"]]
        defined = twin >= 0
        agree = (twin == s_logprobs.argmax(-1)) & defined
        return terms.metric("top1_agreement", agree.sum().float(), defined.sum())
