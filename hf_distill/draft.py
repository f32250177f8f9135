"""Draft models for speculative decoding: how often a target accepts a draft's tokens, how much faster it generates.

A draft (transformers' `assistant_model`) proposes `K` tokens per round; the target checks them in one forward pass
and keeps the longest prefix it agrees with, plus one token of its own. Under greedy decoding the output is the
target's own greedy output whatever the draft; the speed-up depends on how many draft tokens the target accepts.

`evaluate_draft` runs, prompt by prompt, greedy generation of the target alone and then with the draft as
`assistant_model` (back to back, so both see the same machine load), and reports the acceptance rate, the mean number
of tokens per target forward pass, tokens/s of both runs, the speed-up and whether every assisted output equals the
target's own. A draft with another tokenizer goes through transformers' universal assisted generation
(`generate(tokenizer=..., assistant_tokenizer=...)`).

Acceptance is counted, or for greedy decoding computed without generating, by `hf_distill.draft_acceptance`
(`count_acceptance`, `greedy_acceptance`, `AcceptanceCounts`; re-exported here).
"""

import contextlib
import copy
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .draft_acceptance import AcceptanceCounts, count_acceptance, greedy_acceptance
from .models.checks import tokenizer_vocab_size


__all__ = [
    "AcceptanceCounts",
    "DraftReport",
    "count_acceptance",
    "encode_prompt",
    "evaluate_draft",
    "greedy_acceptance",
    "prompts_from_dataset",
    "same_vocabulary",
]


logger = logging.getLogger(__name__)


def same_vocabulary(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Whether two tokenizers map every token to the same id (then a draft needs no universal assisted generation)."""
    return a is b or a.get_vocab() == b.get_vocab()


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, use_chat_template: bool | None = None) -> list[int]:
    """Token ids of `prompt`: a user turn with the generation prompt when the tokenizer has a chat template (or
    `use_chat_template=True`), else the plain text with the tokenizer's special tokens."""
    if use_chat_template is None:
        use_chat_template = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        return list(ids)
    return tokenizer(prompt)["input_ids"]


@contextlib.contextmanager
def _assistant_settings(draft: PreTrainedModel, num_assistant_tokens: int, confidence_threshold: float) -> Iterator:
    """The draft's generation config with a fixed number of tokens per round; restored afterwards."""
    saved = draft.generation_config
    config = copy.deepcopy(saved)
    config.num_assistant_tokens = num_assistant_tokens
    config.num_assistant_tokens_schedule = "constant"
    config.assistant_confidence_threshold = confidence_threshold
    draft.generation_config = config
    try:
        yield
    finally:
        draft.generation_config = saved


def _greedy_kwargs(target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int) -> dict:
    config = copy.deepcopy(target.generation_config)
    config.do_sample, config.num_beams, config.max_new_tokens, config.max_length = False, 1, max_new_tokens, None
    config.temperature = config.top_p = config.top_k = config.min_p = None
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"generation_config": config}


@dataclass
class DraftReport:
    """What `evaluate_draft` measured (its `to_dict()` is the JSON that `hf-distill draft evaluate` writes).

    Attributes:
        acceptance_rate (`float`): accepted / proposed draft tokens over all prompts.
        token_acceptance_rate (`float`): accepted / checked draft tokens (`AcceptanceCounts.token_acceptance_rate`).
        mean_accepted_tokens (`float`): tokens per target forward pass in the assisted runs (accepted + 1).
        target_tokens_per_s (`float`): generated tokens / seconds, target alone.
        assisted_tokens_per_s (`float`): the same with the draft.
        speedup (`float`): target-alone time / assisted time over the same prompts and tokens.
        identical (`bool`): every assisted output equals the target's own greedy output.
        num_prompts, new_tokens, proposed_tokens, accepted_tokens, reported_matches, target_forwards, rejections
            (`int`): the counts behind the rates (`AcceptanceCounts`), summed over prompts.
        target_seconds, assisted_seconds (`float`): generation wall time summed over prompts (warm-up excluded).
        mismatched_prompts (`list[int]`): prompts whose assisted output differs from the target's own.
        universal_assisted_generation (`bool`): the draft has another vocabulary (decoded and re-encoded text).
        settings (`dict`): decoding settings, device and torch threads.
        per_prompt (`list[dict]`): the counts and timings of each prompt.
        target_outputs (`list[list[int]]`): the target's own greedy output ids of each prompt.
    """

    acceptance_rate: float
    token_acceptance_rate: float
    mean_accepted_tokens: float
    target_tokens_per_s: float
    assisted_tokens_per_s: float
    speedup: float
    identical: bool
    num_prompts: int
    new_tokens: int
    proposed_tokens: int
    accepted_tokens: int
    reported_matches: int
    target_forwards: int
    rejections: int
    target_seconds: float
    assisted_seconds: float
    mismatched_prompts: list[int] = field(default_factory=list)
    universal_assisted_generation: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    per_prompt: list[dict[str, Any]] = field(default_factory=list)
    target_outputs: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-serialisable dict."""
        return asdict(self)


@torch.no_grad()
def evaluate_draft(
    target: PreTrainedModel,
    draft: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    draft_tokenizer: PreTrainedTokenizerBase | None = None,
    max_new_tokens: int = 64,
    num_assistant_tokens: int = 5,
    assistant_confidence_threshold: float = 0.0,
    use_chat_template: bool | None = None,
    warmup: bool = True,
    target_outputs: list[list[int]] | None = None,
) -> DraftReport:
    """Greedy generation of `target` alone and with `draft` as `assistant_model`, on the same prompts.

    For each prompt, the target generates alone, then with the draft (back to back, so both runs see the same machine
    load); acceptance is counted by `count_acceptance` from transformers' own assisted decoding. Batch size is 1, as
    transformers' assisted generation requires.

    Args:
        target (`PreTrainedModel`): the model whose output is wanted.
        draft (`PreTrainedModel`): the assistant (draft) model.
        tokenizer (`PreTrainedTokenizerBase`): the target's tokenizer; its chat template, when it has one, formats each
            prompt as a user turn.
        prompts (`list[str]`): the prompt texts.
        draft_tokenizer (`PreTrainedTokenizerBase`, *optional*): the draft's tokenizer. When its vocabulary differs
            from the target's, generation goes through universal assisted generation (`tokenizer=` and
            `assistant_tokenizer=` of `generate`); default: the target's.
        max_new_tokens (`int`): tokens generated per prompt (fewer when the target ends with EOS).
        num_assistant_tokens (`int`): draft tokens proposed per round (constant schedule).
        assistant_confidence_threshold (`float`): a round also ends when the draft's top probability falls below
            this (transformers' default is 0.4); 0.0 drafts exactly `num_assistant_tokens` tokens each round, so the
            acceptance rate is the per-token rate.
        use_chat_template (`bool`, *optional*): default: when the tokenizer has a chat template.
        warmup (`bool`): one untimed run of both modes on the first prompt first.
        target_outputs (`list[list[int]]`, *optional*): the target's own greedy outputs of these prompts (a previous
            report's `target_outputs`, same settings): the target-alone runs are skipped and `identical` compares with
            these; the speed fields are then 0 (acceptance curves over checkpoints need no timing).

    Returns:
        `DraftReport`: acceptance, tokens per forward, speeds, speed-up and `identical`.
    """
    if not prompts:
        raise ValueError("evaluate_draft needs at least one prompt.")
    if num_assistant_tokens < 1:
        raise ValueError(f"`num_assistant_tokens` must be >= 1, got {num_assistant_tokens}.")
    draft_tokenizer = draft_tokenizer if draft_tokenizer is not None else tokenizer
    tokenizer_vocab_size(target, tokenizer, "target", "--target_tokenizer")  # a tokenizer longer than the embedding
    tokenizer_vocab_size(draft, draft_tokenizer, "draft", "--draft_tokenizer")  # is another model's
    universal = not same_vocabulary(tokenizer, draft_tokenizer)
    target_was_training, draft_was_training = target.training, draft.training
    target.eval()
    draft.eval()
    device = next(target.parameters()).device
    kwargs = _greedy_kwargs(target, tokenizer, max_new_tokens)
    assisted_kwargs = {"assistant_model": draft}
    if universal:
        assisted_kwargs.update(tokenizer=tokenizer, assistant_tokenizer=draft_tokenizer)
    encoded = [torch.tensor([encode_prompt(tokenizer, p, use_chat_template)], device=device) for p in prompts]

    def timed(ids: torch.Tensor, **extra: Any) -> tuple[list[int], float]:
        start = time.perf_counter()
        out = target.generate(ids, attention_mask=torch.ones_like(ids), **kwargs, **extra)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out[0, ids.shape[1] :].tolist(), time.perf_counter() - start

    total = AcceptanceCounts()
    if target_outputs is not None and len(target_outputs) != len(prompts):
        raise ValueError(f"`target_outputs` has {len(target_outputs)} entries for {len(prompts)} prompts.")
    per_prompt, mismatched, outputs = [], [], []
    target_seconds = assisted_seconds = 0.0
    new_tokens = 0
    try:
        with _assistant_settings(draft, num_assistant_tokens, assistant_confidence_threshold):
            if warmup:
                if target_outputs is None:
                    timed(encoded[0])
                with count_acceptance(target):
                    timed(encoded[0], **assisted_kwargs)
            for i, ids in enumerate(encoded):
                alone, t_alone = timed(ids) if target_outputs is None else (list(target_outputs[i]), 0.0)
                with count_acceptance(target) as counts:
                    assisted, t_assisted = timed(ids, **assisted_kwargs)
                total.add(counts)
                same = assisted == alone
                if not same:
                    mismatched.append(i)
                target_seconds += t_alone
                assisted_seconds += t_assisted
                new_tokens += len(alone)
                per_prompt.append(
                    {
                        "new_tokens": len(alone),
                        "proposed": counts.proposed,
                        "accepted": counts.accepted,
                        "rejections": counts.rejections,
                        "target_forwards": counts.target_forwards,
                        "identical": same,
                        "target_seconds": t_alone,
                        "assisted_seconds": t_assisted,
                    }
                )
                outputs.append(alone)
    finally:
        target.train(target_was_training)
        draft.train(draft_was_training)
    return DraftReport(
        acceptance_rate=total.acceptance_rate,
        token_acceptance_rate=total.token_acceptance_rate,
        mean_accepted_tokens=total.mean_accepted_tokens,
        target_tokens_per_s=new_tokens / target_seconds if target_seconds else 0.0,
        assisted_tokens_per_s=new_tokens / assisted_seconds if assisted_seconds else 0.0,
        speedup=target_seconds / assisted_seconds if target_seconds and assisted_seconds else 0.0,
        identical=not mismatched,
        num_prompts=len(prompts),
        new_tokens=new_tokens,
        proposed_tokens=total.proposed,
        accepted_tokens=total.accepted,
        reported_matches=total.reported_matches,
        target_forwards=total.target_forwards,
        rejections=total.rejections,
        target_seconds=target_seconds,
        assisted_seconds=assisted_seconds,
        mismatched_prompts=mismatched,
        universal_assisted_generation=universal,
        settings={
            "max_new_tokens": max_new_tokens,
            "num_assistant_tokens": num_assistant_tokens,
            "assistant_confidence_threshold": assistant_confidence_threshold,
            "decoding": "greedy",
            "batch_size": 1,
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
        },
        per_prompt=per_prompt,
        target_outputs=outputs,
    )


def prompts_from_dataset(
    dataset: Any, prompt_column: str | None = None, *, prompt_template: str | None = None, limit: int | None = None
) -> list[str]:
    """Prompt texts from a dataset's rows: one column, or a `str.format` template over the row's columns.

    Args:
        dataset (`datasets.Dataset` or `list[dict]`): the rows.
        prompt_column (`str`, *optional*): the column holding the prompt text.
        prompt_template (`str`, *optional*): e.g. `"Premise: {premise}\\nHypothesis: {hypothesis}"` (instead of a
            column).
        limit (`int`, *optional*): the first `limit` rows only.
    """
    if (prompt_column is None) == (prompt_template is None):
        raise ValueError("Give exactly one of `prompt_column` and `prompt_template`.")
    columns = list(getattr(dataset, "column_names", None) or (dataset[0].keys() if len(dataset) else []))
    if prompt_column is not None and prompt_column not in columns:
        raise ValueError(
            f"The dataset has no column {prompt_column!r} (columns: {columns}): name the prompt column "
            "(`prompt_column`, --prompt_column) or give a `prompt_template` (--prompt_template)."
        )
    rows = dataset if limit is None else [dataset[i] for i in range(min(limit, len(dataset)))]
    prompts = []
    for row in rows:
        if prompt_template is None:
            prompts.append(str(row[prompt_column]))
            continue
        try:
            prompts.append(prompt_template.format(**row))
        except KeyError as err:
            raise ValueError(f"`prompt_template` names {err}, which the dataset lacks (columns: {columns}).") from None
    if not prompts:
        raise ValueError("No prompts: the dataset (or `limit`) gives no rows.")
    return prompts
