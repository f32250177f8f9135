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
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, TrainerCallback
from trl.trainer.utils import pad

from ..losses import IGNORE_INDEX
from .completion_log import CompletionLog


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


def cut_at_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    """`tokens` up to and including the first of `eos_ids` (all of them when there is none)."""
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
    return [cut_at_eos(row, set(eos_list)) for row in new.tolist()]


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


@dataclass
class _Item:
    """One micro-batch of a window on its way to training: after `seq_kd`, whether the `lmbda` draw made it
    on-policy, and (vLLM) its prompts and the request sampling them."""

    batch: dict
    on_policy: bool
    prompts: list[list[int]] | None = None
    future: Future | None = None
    policy_step: int | None = None


class PolicyBatchRewriter:
    """Per micro-batch: teacher generations first when `seq_kd`, then student samples with probability `lmbda`.

    The student samples come from `generate` on the student, or from a vLLM server that follows it (`sampler`, a
    `vllm_sampler.VLLMStudentSampler`: `use_vllm`). Which micro-batches are on-policy is drawn from one
    `random.Random(seed)` stream in micro-batch order, whichever path samples them, so every process (and both paths)
    rewrite the same micro-batches.

    Args:
        args: the distillation config (`lmbda`, `seq_kd`, `seq_kd_do_sample`, `max_new_tokens`,
            `generation_temperature` (0 = greedy), `seed`, `vllm_overlap_generation`, `log_completions`).
        pad_token_id (`int`), eos_token_id (`int` or `list[int]`): the tokenizer's.
        is_encoder_decoder (`bool`): seq2seq student and teacher.
        sampler (`VLLMStudentSampler`, *optional*): sample the student through vLLM.
        tokenizer (*optional*): decodes the logged completions (`log_completions`).
    """

    def __init__(
        self,
        args: Any,
        pad_token_id: int,
        eos_token_id: int | list[int] | None,
        is_encoder_decoder: bool,
        sampler: Any = None,
        tokenizer: Any = None,
    ):
        self.args = args
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id
        self.is_encoder_decoder = is_encoder_decoder
        self.rng = random.Random(args.seed)  # same stream on every process: all ranks generate on the same steps
        self.num_student_batches, self.num_teacher_batches = 0, 0
        if sampler is not None and is_encoder_decoder:
            raise ValueError("`use_vllm` samples decoder-only students; an encoder-decoder student uses `generate`.")
        self.sampler = sampler
        self.overlap = sampler is not None and getattr(args, "vllm_overlap_generation", False)
        self.batch_requests = "window"  # vLLM: one request per accumulation window ("micro_batch": one per batch)
        self.log = None
        if getattr(args, "log_completions", False):
            self.log = CompletionLog(args.output_dir, tokenizer, args.logging_steps, args.num_completions_to_print)
        self._queue: deque[_Item] = deque()  # read ahead (vllm_overlap_generation), in iterator order
        self._queue_source: Any = None  # the epoch iterator the queue was read from

    @staticmethod
    def active(args: Any) -> bool:
        """Whether the config asks for on-policy samples (`lmbda > 0`) or sequence-level KD (`seq_kd`)."""
        return args.lmbda > 0 or args.seq_kd

    @classmethod
    def for_student(
        cls, args: Any, tokenizer: Any, config: Any, is_encoder_decoder: bool, sampler: Any = None
    ) -> "PolicyBatchRewriter":
        """The rewriter with the tokenizer's pad / eos ids, falling back to the student `config`'s (pad: 0)."""
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = pad if pad is not None else config.pad_token_id if config.pad_token_id is not None else 0
        eos = getattr(tokenizer, "eos_token_id", None)
        eos = eos if eos is not None else config.eos_token_id
        return cls(args, pad, eos, is_encoder_decoder, sampler=sampler, tokenizer=tokenizer)

    def _generate(self, model: nn.Module, accelerator: Any, batch: dict, do_sample: bool) -> dict:
        from trl.models import unwrap_model_for_generation

        with unwrap_model_for_generation(model, accelerator) as unwrapped:
            return replace_completions(
                unwrapped,
                batch,
                pad_token_id=self.pad_token_id,
                eos_token_id=self.eos_token_id,
                max_new_tokens=self.args.max_new_tokens,
                do_sample=do_sample and self.args.generation_temperature > 0,
                temperature=self.args.generation_temperature,
                is_encoder_decoder=self.is_encoder_decoder,
            )

    def _prepare(self, batch: dict, teacher: nn.Module | None, accelerator: Any) -> _Item:
        """`seq_kd` first, then the `lmbda` draw (one draw per micro-batch, in order)."""
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
        return _Item(batch, self.rng.random() < self.args.lmbda)

    def __call__(self, batch: dict, *, student: nn.Module, teacher: nn.Module | None, accelerator: Any) -> dict:
        """The micro-batch to train on (the same object when nothing is replaced), sampled with `generate`."""
        item = self._prepare(batch, teacher, accelerator)
        if item.on_policy:
            self.num_student_batches += 1
            return self._generate(student, accelerator, item.batch, do_sample=True)
        return item.batch

    def next_window(
        self,
        epoch_iterator: Iterator[dict],
        num_batches: int,
        *,
        student: nn.Module,
        teacher: nn.Module | None,
        accelerator: Any,
        step: int,
        complete: Callable[[dict, dict], dict] | None = None,
    ) -> list[dict]:
        """The accumulation window that optimizer step `step + 1` trains on: up to `num_batches` micro-batches read
        from `epoch_iterator` (or read ahead at the previous call), each rewritten as `__call__` does.

        With a vLLM sampler the window's on-policy prompts go to the server in one request (after pushing the
        weights of step `step` when a sync is due); with `vllm_overlap_generation` the next window is read and its
        request sent before returning, so it is sampled while this one trains (from the weights of step `step`,
        one step older than without overlap).

        Args:
            epoch_iterator (`Iterator[dict]`): the epoch's micro-batches (collated, on device).
            num_batches (`int`): micro-batches in the window (fewer at the end of the epoch).
            student (`nn.Module`), teacher (`nn.Module`, *optional*): as the trainer holds them.
            accelerator (`accelerate.Accelerator`): the run's accelerator.
            step (`int`): optimizer steps done so far (`state.global_step`).
            complete (`Callable`, *optional*): `complete(batch, new_batch)` for each rewritten micro-batch, with the
                batch as read: adds the teacher source's own keys to the new one (`TeacherSource.rewritten`).

        Returns:
            `list[dict]`: the micro-batches to train on; rewritten ones hold `input_ids`, `attention_mask` and
            `labels` (shapes as `rebuild_batch`).
        """
        if self._queue_source is not epoch_iterator:
            self._queue.clear()  # a new epoch: what was read ahead of the old one is never trained on
            self._queue_source = epoch_iterator
        items = [self._queue.popleft() for _ in range(min(num_batches, len(self._queue)))]
        items += [self._prepare(b, teacher, accelerator) for b in _take(epoch_iterator, num_batches - len(items))]
        if self.sampler is None:
            out, rows = [], []
            for item in items:
                batch = item.batch
                if item.on_policy:
                    batch = self._generate(student, accelerator, item.batch, do_sample=True)
                    batch = complete(item.batch, batch) if complete is not None else batch
                    self.num_student_batches += 1
                    if self.log is not None:
                        rows += self.log.rows(step + 1, step, *_parts(item.batch, batch))
                out.append(batch)
            self._write_log(rows, accelerator, step + 1)
            return out
        completions = {id(item): item.future.result() for item in items if item.future is not None}  # read ahead
        ahead = []
        if self.overlap:
            ahead = [self._prepare(b, teacher, accelerator) for b in _take(epoch_iterator, self._window_size())]
        now = [item for item in items if item.on_policy and item.future is None]
        if (now or any(item.on_policy for item in ahead)) and self.sampler.due(step):
            self.sampler.sync(student, accelerator, step)
        for item in now + [item for item in ahead if item.on_policy]:
            item.prompts = split_prompts(item.batch)
            item.policy_step = self.sampler.synced_step
        completions.update(self._sample(now))
        if any(item.on_policy for item in ahead):
            chosen = [item for item in ahead if item.on_policy]
            future = self.sampler.submit([p for item in chosen for p in item.prompts])
            for item in chosen:
                item.future = _Slice(future, chosen, item)
        self._queue.extend(ahead)
        out, rows = [], []
        for item in items:
            if not item.on_policy:
                out.append(item.batch)
                continue
            batch = rebuild_batch(item.prompts, completions[id(item)], pad_token_id=self.pad_token_id,
                                  device=item.batch["input_ids"].device)  # fmt: skip
            batch = complete(item.batch, batch) if complete is not None else batch
            self.num_student_batches += 1
            if self.log is not None:
                rows += self.log.rows(step + 1, item.policy_step, item.prompts, completions[id(item)])
            out.append(batch)
        self._write_log(rows, accelerator, step + 1)
        return out

    def _window_size(self) -> int:
        return int(getattr(self.args, "gradient_accumulation_steps", 1) or 1)

    def _sample(self, items: list[_Item]) -> dict[int, list[list[int]]]:
        """Completions of `items` (on-policy, prompts set) from the server: one request for all of them, or one per
        micro-batch (`batch_requests`)."""
        if not items:
            return {}
        if self.batch_requests == "micro_batch":
            return {id(item): self.sampler.sample(item.prompts) for item in items}
        flat = self.sampler.sample([p for item in items for p in item.prompts])
        out, start = {}, 0
        for item in items:
            out[id(item)] = flat[start : start + len(item.prompts)]
            start += len(item.prompts)
        return out

    def _write_log(self, rows: list[dict], accelerator: Any, step: int) -> None:
        if self.log is not None:
            self.log.write(rows, accelerator, step)

    def callbacks(self) -> list[TrainerCallback]:
        """Callbacks the trainer adds: `close` when training ends."""
        return [_CloseAtTrainEnd(self)]

    def close(self) -> None:
        """Drop what was read ahead and release the sampler's server-side state (the last adapter)."""
        self._queue.clear()
        self._queue_source = None
        if self.sampler is not None:
            self.sampler.close()


class _CloseAtTrainEnd(TrainerCallback):
    def __init__(self, rewriter: PolicyBatchRewriter):
        self.rewriter = rewriter

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.rewriter.close()


class _Slice:
    """The part of a window request's future that belongs to one micro-batch (`result()` as a future's)."""

    def __init__(self, future: Future, items: list[_Item], item: _Item):
        start = 0
        for other in items:
            if other is item:
                break
            start += len(other.prompts)
        self.future, self.start, self.stop = future, start, start + len(item.prompts)

    def result(self) -> list[list[int]]:
        return self.future.result()[self.start : self.stop]


def _take(iterator: Iterator[dict], n: int) -> list[dict]:
    """Up to `n` items of `iterator` (fewer when it ends)."""
    out = []
    for _ in range(n):
        try:
            out.append(next(iterator))
        except StopIteration:
            break
    return out


def _parts(old: dict, new: dict) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, completions) of a causal batch rebuilt by `rebuild_batch` from `old` (for the completion log)."""
    prompts = split_prompts(old)
    completions = []
    for b, prompt in enumerate(prompts):
        row = new["input_ids"][b][new["attention_mask"][b].bool()].tolist()
        completions.append(row[len(prompt) :])
    return prompts, completions
