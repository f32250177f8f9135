"""Batches whose completions a model writes: on-policy student samples (GKD, Agarwal et al. 2024) and sequence-level
KD (teacher generations as targets, Kim & Rush 2016).

Recipe lines: `lmbda: 0.5` (probability that a micro-batch's completions are replaced by student samples drawn at
`generation_temperature`, up to `max_new_tokens`), `seq_kd: true` (first replace them by teacher generations, greedy
unless `seq_kd_do_sample: true`). The teacher then scores the new tokens in the usual way and the loss covers the
generated tokens only.

A batch must be prompt/completion shaped: for a causal LM the prompt of a row is its tokens before the first
supervised label (labels == -100 on the prompt), for an encoder-decoder the encoder input. Everything from the first
supervised token on is replaced (for multi-turn chats: the first assistant turn and all that follows). Rebuilt causal
rows are `prompt + completion`, right-padded; a completion ends with the first EOS it contains (kept, so EOS is learnt)
or after `max_new_tokens`.

The trainer rewrites all micro-batches of a gradient-accumulation window before it counts their supervised tokens
(`DistillationMixin.get_batch_samples`), so the loss stays normalised by the tokens actually trained on. The choice of
which micro-batches to rewrite comes from a `random.Random(seed)` stream that advances identically on every process,
so under DeepSpeed ZeRO-3 all processes generate together.
"""

import random
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig
from trl.trainer.utils import pad

from ..losses import IGNORE_INDEX


def split_prompts(batch: dict[str, torch.Tensor], *, is_encoder_decoder: bool = False) -> list[list[int]]:
    """The prompt token ids of every row of a prompt/completion batch.

    Args:
        batch (`dict`): `input_ids` `(B, T)`, `labels` `(B, T)` (causal: -100 on the prompt and padding; seq2seq:
            decoder targets `(B, T_dec)`), optional `attention_mask` `(B, T)` (left or right padding).
        is_encoder_decoder (`bool`): the prompt is the whole encoder input.

    Returns:
        `list[list[int]]`: B prompts without padding.
    """
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is None:
        if "position_ids" in batch and input_ids.shape[0] == 1:
            raise ValueError(
                "On-policy / sequence-level KD needs padded batches with an attention_mask; padding-free (packed) "
                "batches cannot be cut at their prompts. Set `padding_free=False` and `packing=False`."
            )
        mask = torch.ones_like(input_ids)
    prompts = []
    for b in range(input_ids.shape[0]):
        real = mask[b].nonzero().flatten()
        if real.numel() == 0:
            raise ValueError(f"Row {b} of the batch has no real tokens (attention_mask is all 0).")
        start, end = int(real[0]), int(real[-1]) + 1
        if is_encoder_decoder:
            prompts.append(input_ids[b, start:end].tolist())
            continue
        supervised = (batch["labels"][b, start:end] != IGNORE_INDEX).nonzero().flatten()
        cut = start + int(supervised[0]) if supervised.numel() else end
        if cut == start:
            raise ValueError(
                f"Row {b} is supervised from its first token, so it has no prompt to generate from. On-policy "
                "samples (`lmbda`) and sequence-level KD (`seq_kd`) need prompt/completion data whose labels are "
                "-100 on the prompt (e.g. `prompt`/`completion` columns, or `assistant_only_loss=True`)."
            )
        prompts.append(input_ids[b, start:cut].tolist())
    return prompts


def _cut_at_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            return tokens[: i + 1]
    return tokens


def generate_completions(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    pad_token_id: int,
    eos_token_id: int | list[int] | None,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float = 1.0,
    is_encoder_decoder: bool = False,
) -> list[list[int]]:
    """Generate one completion per prompt (no gradients; the model is put in eval mode for the call).

    Sampling draws from the model's full distribution at `temperature` (no top-k / top-p truncation), as GKD.

    Args:
        model (`nn.Module`): an unwrapped `PreTrainedModel` with `generate`.
        prompts (`list[list[int]]`): B prompts (token ids, no padding).
        pad_token_id (`int`): used to left-pad prompts (causal) / right-pad encoder inputs.
        eos_token_id (`int` or `list[int]`, *optional*): completions end after the first of these.
        max_new_tokens (`int`): maximum completion length.
        do_sample (`bool`): sample at `temperature`, else greedy.
        is_encoder_decoder (`bool`): prompts are encoder inputs; the decoder start token is dropped.

    Returns:
        `list[list[int]]`: B completions (each ends with EOS, or has `max_new_tokens` tokens).
    """
    device = next(model.parameters()).device
    # encoder inputs: right padding; decoder-only generation continues from the last column: left padding
    side = "right" if is_encoder_decoder else "left"
    input_ids = pad([torch.tensor(p, dtype=torch.long) for p in prompts], pad_token_id, side).to(device)  # (B, T)
    attention_mask = pad([torch.ones(len(p), dtype=torch.long) for p in prompts], 0, side).to(device)  # (B, T)
    width = input_ids.shape[1]
    eos_list = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if do_sample else {}
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_token_id,
        eos_token_id=eos_list or None,
        do_sample=do_sample,
        **{k: v for k, v in sampling.items() if k != "do_sample"},
    )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    finally:
        model.train(was_training)
    new = out[:, 1:] if is_encoder_decoder else out[:, width:]
    return [_cut_at_eos(row, set(eos_list)) for row in new.tolist()]


def rebuild_batch(
    prompts: list[list[int]],
    completions: list[list[int]],
    *,
    pad_token_id: int,
    device: torch.device | str = "cpu",
    is_encoder_decoder: bool = False,
) -> dict[str, torch.Tensor]:
    """A right-padded batch training on the completions only.

    Returns:
        `dict`: causal: `input_ids`, `attention_mask`, `labels`, all `(B, max(len(prompt) + len(completion)))`, labels
        -100 on prompts and padding. Seq2seq: `input_ids`, `attention_mask` `(B, max prompt length)` and `labels`
        `(B, max completion length)` padded with -100.
    """

    def right_pad(rows: list[list[int]], value: int) -> torch.Tensor:  # (B, max(1, longest row))
        padded = pad([torch.tensor(row, dtype=torch.long) for row in rows], value, "right")
        if padded.shape[1] == 0:  # all rows empty: one column of padding
            padded = torch.full((len(rows), 1), value, dtype=torch.long)
        return padded.to(device)

    if is_encoder_decoder:
        input_ids = right_pad(prompts, pad_token_id)
        attention_mask = right_pad([[1] * len(p) for p in prompts], 0)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": right_pad(completions, IGNORE_INDEX),
        }
    rows = [p + c for p, c in zip(prompts, completions)]
    labels = [[IGNORE_INDEX] * len(p) + c for p, c in zip(prompts, completions)]
    return {
        "input_ids": right_pad(rows, pad_token_id),
        "attention_mask": right_pad([[1] * len(r) for r in rows], 0),
        "labels": right_pad(labels, IGNORE_INDEX),
    }


def replace_completions(
    model: nn.Module,
    batch: dict[str, Any],
    *,
    pad_token_id: int,
    eos_token_id: int | list[int] | None,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float = 1.0,
    is_encoder_decoder: bool = False,
) -> dict[str, torch.Tensor]:
    """`batch` with its completions replaced by `model`'s generations (prompts kept). Shapes as `rebuild_batch`.

    Only `input_ids`, `attention_mask` and `labels` are kept: other per-token keys (position ids, completion masks)
    would no longer line up.
    """
    prompts = split_prompts(batch, is_encoder_decoder=is_encoder_decoder)
    completions = generate_completions(
        model,
        prompts,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        is_encoder_decoder=is_encoder_decoder,
    )
    return rebuild_batch(
        prompts,
        completions,
        pad_token_id=pad_token_id,
        device=batch["input_ids"].device,
        is_encoder_decoder=is_encoder_decoder,
    )


class PolicyBatchRewriter:
    """Per micro-batch: teacher generations first when `seq_kd`, then student samples with probability `lmbda`.

    Args:
        args: the distillation config (`lmbda`, `seq_kd`, `seq_kd_do_sample`, `max_new_tokens`,
            `generation_temperature`, `seed`).
        pad_token_id (`int`), eos_token_id (`int` or `list[int]`): the tokenizer's.
        is_encoder_decoder (`bool`): seq2seq student and teacher.
    """

    def __init__(self, args: Any, pad_token_id: int, eos_token_id: int | list[int] | None, is_encoder_decoder: bool):
        self.args = args
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id
        self.is_encoder_decoder = is_encoder_decoder
        self.rng = random.Random(args.seed)  # same stream on every process: all ranks generate on the same steps
        self.num_student_batches, self.num_teacher_batches = 0, 0

    @staticmethod
    def active(args: Any) -> bool:
        """Whether the config asks for on-policy samples (`lmbda > 0`) or sequence-level KD (`seq_kd`)."""
        return args.lmbda > 0 or args.seq_kd

    @classmethod
    def for_student(cls, args: Any, tokenizer: Any, config: Any, is_encoder_decoder: bool) -> "PolicyBatchRewriter":
        """The rewriter with the tokenizer's pad / eos ids, falling back to the student `config`'s (pad: 0)."""
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = pad if pad is not None else config.pad_token_id if config.pad_token_id is not None else 0
        eos = getattr(tokenizer, "eos_token_id", None)
        return cls(args, pad, eos if eos is not None else config.eos_token_id, is_encoder_decoder)

    def _generate(self, model: nn.Module, accelerator: Any, batch: dict, do_sample: bool) -> dict:
        from trl.models import unwrap_model_for_generation

        with unwrap_model_for_generation(model, accelerator) as unwrapped:
            return replace_completions(
                unwrapped,
                batch,
                pad_token_id=self.pad_token_id,
                eos_token_id=self.eos_token_id,
                max_new_tokens=self.args.max_new_tokens,
                do_sample=do_sample,
                temperature=self.args.generation_temperature,
                is_encoder_decoder=self.is_encoder_decoder,
            )

    def __call__(self, batch: dict, *, student: nn.Module, teacher: nn.Module | None, accelerator: Any) -> dict:
        """The micro-batch to train on (the same object when nothing is replaced)."""
        if "task" in batch:
            raise ValueError(
                "On-policy samples (`lmbda`) and `seq_kd` rewrite single prompt/completion batches; they do not apply "
                "to the two task views of a RationaleCollator batch."
            )
        if self.args.seq_kd:
            if teacher is None:
                raise ValueError("`seq_kd=True` needs a live teacher to generate the targets (not a teacher cache).")
            batch = self._generate(teacher, accelerator, batch, do_sample=self.args.seq_kd_do_sample)
            self.num_teacher_batches += 1
        if self.rng.random() < self.args.lmbda:
            batch = self._generate(student, accelerator, batch, do_sample=True)
            self.num_student_batches += 1
        return batch
