"""Acceptance of a draft's tokens under assisted decoding: counted from transformers' loop, or computed for greedy
decoding without generating.

Acceptance is read from transformers' own loop, not re-implemented: `count_acceptance` wraps the candidate generator
that `GenerationMixin._assisted_decoding` builds (`_get_candidate_generator`), recording each round's candidates
(`get_candidates`) and the tokens the target then kept (`update_candidate_strategy(input_ids, scores, num_matches)`,
called once per target forward pass with `input_ids` already extended by the kept tokens).

`greedy_acceptance` gives the same counts for greedy decoding without assisted generation, from the target's greedy
outputs and one teacher-forced forward of the draft per prompt, for any number of `k` at once (acceptance curves over
training checkpoints, k sweeps); the tests check it against `count_acceptance`.

`hf_distill.draft` (`evaluate_draft`, `hf-distill draft evaluate`) uses both and re-exports them.
"""

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import PreTrainedModel


@dataclass
class AcceptanceCounts:
    """What the target did with a draft's tokens, summed over assisted `generate` calls.

    Attributes:
        proposed (`int`): draft tokens the target checked (in the target's tokens; under universal assisted generation
            the draft's text re-encoded with the target's tokenizer).
        accepted (`int`): of those, the tokens the target kept (the common prefix of the candidates and the tokens it
            appended in that round).
        reported_matches (`int`): transformers' own `num_matches` summed; equals `accepted` except in a round that ends
            at EOS, where transformers counts the accepted EOS as the target's own token.
        target_forwards (`int`): target forward passes (rounds).
        new_tokens (`int`): tokens the target appended over all rounds.
        rejections (`int`): rounds in which the target rejected a proposed token (accepted < proposed).
    """

    proposed: int = 0
    accepted: int = 0
    reported_matches: int = 0
    target_forwards: int = 0
    new_tokens: int = 0
    rejections: int = 0

    def add(self, other: "AcceptanceCounts") -> None:
        """Add `other`'s counts to these."""
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (0.0 when nothing was proposed)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def token_acceptance_rate(self) -> float:
        """Accepted / (accepted + rejected) draft tokens: the probability that the target accepts a draft token it
        gets to check (tokens after a rejection in the same round are never checked). It does not depend on the
        number of draft tokens per round, unlike `acceptance_rate`; with one token per round the two are equal."""
        checked = self.accepted + self.rejections
        return self.accepted / checked if checked else 0.0

    @property
    def mean_accepted_tokens(self) -> float:
        """Tokens the target emits per forward pass: accepted draft tokens plus its own (vLLM's "mean acceptance
        length"); 1.0 means no draft token was ever accepted."""
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0


def _observe(generator: Any, counts: AcceptanceCounts) -> Any:
    """Record into `counts` what one candidate generator of transformers' assisted decoding proposes each round and
    what the target keeps. Its two methods are wrapped on the instance, so it stays what it is (`isinstance` checks
    in transformers' loop still hold) and behaves as before."""
    get_candidates, update_candidate_strategy = generator.get_candidates, generator.update_candidate_strategy
    pending: list = []

    def observed_get_candidates(input_ids: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        candidate_ids, candidate_logits = get_candidates(input_ids, **kwargs)
        pending[:] = [input_ids.shape[1], candidate_ids[0, input_ids.shape[1] :].detach().cpu()]
        return candidate_ids, candidate_logits

    def observed_update_candidate_strategy(input_ids: torch.Tensor, scores: torch.Tensor, num_matches: Any) -> Any:
        start, candidates = pending if pending else (input_ids.shape[1], torch.empty(0, dtype=torch.long))
        kept = input_ids[0, start:].detach().cpu()  # the tokens the target appended this round
        n = min(len(candidates), len(kept))
        accepted = int((candidates[:n] == kept[:n]).long().cumprod(0).sum()) if n else 0
        counts.add(
            AcceptanceCounts(
                proposed=len(candidates),
                accepted=accepted,
                reported_matches=int(num_matches),
                target_forwards=1,
                new_tokens=len(kept),
                rejections=int(accepted < len(candidates)),
            )
        )
        pending.clear()
        return update_candidate_strategy(input_ids, scores, num_matches)

    generator.get_candidates = observed_get_candidates
    generator.update_candidate_strategy = observed_update_candidate_strategy
    return generator


@contextlib.contextmanager
def count_acceptance(target: PreTrainedModel) -> Iterator[AcceptanceCounts]:
    """Count accepted and proposed draft tokens in every assisted `target.generate(assistant_model=...)` call made
    inside the block.

    The target's `_get_candidate_generator` (where transformers' `_assisted_decoding` builds its
    `AssistedCandidateGenerator`, or `AssistedCandidateGeneratorDifferentTokenizers` for universal assisted generation)
    is wrapped on this instance only, and the generator it returns has its `get_candidates` and
    `update_candidate_strategy` observed: what it proposed each round and what the target kept. Decoding itself is
    transformers' unchanged.

    Args:
        target (`PreTrainedModel`): the model whose `generate` is called with `assistant_model=`.

    Yields:
        `AcceptanceCounts`: filled in as the block's assisted calls run.

    Example:
        >>> with count_acceptance(target) as counts:
        ...     target.generate(input_ids, assistant_model=draft, do_sample=False, max_new_tokens=32)
        >>> counts.acceptance_rate, counts.mean_accepted_tokens
    """
    counts = AcceptanceCounts()
    original = target._get_candidate_generator  # bound method of the class (or an outer wrapper)

    def counting_candidate_generator(*args: Any, **kwargs: Any) -> Any:
        return _observe(original(*args, **kwargs), counts)

    target._get_candidate_generator = counting_candidate_generator
    try:
        yield counts
    finally:
        if target.__dict__.get("_get_candidate_generator") is counting_candidate_generator:
            del target._get_candidate_generator
        else:  # someone wrapped it again inside the block: put ours back out of their chain
            target._get_candidate_generator = original


def _token_set(token_ids: int | list[int] | None) -> set[int]:
    if token_ids is None:
        return set()
    return {int(token_ids)} if isinstance(token_ids, int) else {int(t) for t in token_ids}


def _rounds(
    argmax: list[int], output: list[int], k: int, max_new_tokens: int, eos: set[int]
) -> list[tuple[int, int, int, bool]]:
    """The rounds of greedy assisted decoding of one prompt, as `(start, budget, matched, rejected)`.

    `start` tokens of the target's output `output` precede the round; the draft may propose `budget` tokens
    (`AssistedCandidateGenerator._calculate_new_tokens`: k, at most one short of the length limit); the first `matched`
    of them equal the output (`argmax[j]`, the draft's greedy token after the prompt and `output[:j]`, is its proposal
    there while it agrees); `rejected` when the next one does not. The draft stops proposing at an EOS, so an accepted
    EOS ends the round without a rejection."""
    rounds, start = [], 0
    while start < len(output):
        budget, matched, rejected = min(k, max_new_tokens - start - 1), 0, False
        while matched < budget:
            if argmax[start + matched] != output[start + matched]:
                rejected = True
                break
            matched += 1
            if output[start + matched - 1] in eos:
                break
        rounds.append((start, budget, matched, rejected))
        start = min(start + matched + 1, len(output))  # the matched tokens + the target's own (none after EOS)
    return rounds


def _plain_cache(cache: Any) -> bool:
    """Whether every layer of `cache` keeps all positions (a `DynamicCache` of `DynamicLayer`s: no sliding window)."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


def _off_track_eos(
    draft: PreTrainedModel,
    ids: torch.Tensor,
    cache: Any,
    starts: list[int],
    firsts: list[int],
    steps: list[int],
    eos: set[int],
) -> list[int | None]:
    """Where the draft's own greedy continuation after a rejected token first reaches an EOS.

    Branch `b` is `ids[:starts[b]]` followed by the draft's rejected token `firsts[b]`; the draft then continues
    greedily for `steps[b]` tokens. With `cache` (the draft's cache over all of `ids`, full-attention layers), each
    branch reads its prefix of that cache through the attention mask at its own position ids: one batched one-token
    forward per step. Without it (`None`), each step is a forward over every branch's whole sequence, right-padded.

    Args:
        draft (`PreTrainedModel`): the draft, in eval mode.
        ids (`torch.LongTensor` of shape `(seq_len,)`): the prompt followed by the target's output.
        cache (`transformers.Cache` or `None`): the draft's cache after its forward over `ids` (used up: repeated over
            the branches and extended).
        starts (`list[int]`): per branch, the position in `ids` of the rejected token.
        firsts (`list[int]`): per branch, the rejected token.
        steps (`list[int]`): per branch, the tokens the draft may still propose after it.
        eos (`set[int]`): the EOS ids.

    Returns:
        `list[int | None]`: per branch, the 1-based index among its next `steps[b]` tokens of the first EOS, or `None`.
    """
    n, device = len(starts), ids.device
    tokens = torch.tensor(firsts, device=device)  # (n,): each branch's latest token
    positions = torch.tensor(starts, device=device)  # (n,): its position
    if cache is not None:
        cache.batch_repeat_interleave(n)
        mask = (torch.arange(len(ids), device=device)[None, :] < positions[:, None]).long()  # (n, seq_len)
    else:
        branches = [ids[:s].tolist() for s in starts]
    found: list[int | None] = [None] * n
    for step in range(1, max(steps) + 1):
        if cache is not None:
            mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype, device=device)], dim=1)
            logits = draft(
                input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
                past_key_values=cache, use_cache=True,
            ).logits[:, -1]  # fmt: skip
        else:
            for branch, token in zip(branches, tokens.tolist(), strict=True):
                branch.append(token)
            width = max(map(len, branches))
            padded = torch.tensor([b + [0] * (width - len(b)) for b in branches], device=device)
            mask = torch.tensor([[1] * len(b) + [0] * (width - len(b)) for b in branches], device=device)
            logits = draft(input_ids=padded, attention_mask=mask).logits
            last = torch.tensor([len(b) - 1 for b in branches], device=device)
            logits = logits[torch.arange(n, device=device), last]
        tokens, positions = logits.argmax(-1), positions + 1
        for b, token in enumerate(tokens.tolist()):
            if found[b] is None and step <= steps[b] and token in eos:
                found[b] = step
    return found


@torch.no_grad()
def greedy_acceptance(
    draft: PreTrainedModel,
    prompts_ids: list[list[int]],
    target_outputs: list[list[int]],
    num_assistant_tokens: int | list[int],
    *,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
) -> AcceptanceCounts | dict[int, AcceptanceCounts]:
    """The acceptance counts of greedy assisted decoding (`evaluate_draft` with the same settings), without running it.

    Under greedy decoding the assisted output is the target's own greedy output `y`, and while a round's proposals are
    accepted the draft proposes after prefixes of `y`: its token at output position `j` is its greedy token after
    `prompt + y[:j]`. One teacher-forced forward of the draft over `prompt + y` gives them all, and the rounds are
    walked as transformers' `_assisted_decoding` runs them:

    - from output position `t` the draft proposes `min(k, max_new_tokens - t - 1)` tokens (so none at the last
      position before the limit, and the round still counts as a target forward), and stops after an EOS;
    - the target keeps the matching prefix plus one token of its own, and nothing after an EOS (an accepted EOS ends
      the output: `reported_matches` is then one short of `accepted`, as in `count_acceptance`);
    - after a rejected token the draft's proposals leave `y`: they count as proposed, and, since an EOS among them
      would end the proposal early, they are computed when that can change the count (an EOS id is given and tokens
      remain in the round): up to `k - 1` batched one-token steps over the same forward's KV cache, one branch per
      rejected position (without a full-attention `DynamicCache`, e.g. sliding-window layers, full forwards instead).

    The counts equal `count_acceptance`'s over `evaluate_draft` as long as (1) the assisted output equals
    `target_outputs` (`DraftReport.identical`) and (2) the draft's argmax in one forward is its argmax token by token
    with a KV cache (they can differ only on near-ties of its two top logits, by floating-point rounding). It assumes
    what `evaluate_draft` sets: a constant `num_assistant_tokens` schedule, `assistant_confidence_threshold` 0, no
    logits processors (no repetition penalty, no `min_new_tokens`), and a draft with the target's tokenizer (no
    universal assisted generation: the caller checks it, e.g. with `same_vocabulary`).

    Args:
        draft (`PreTrainedModel`): the draft (assistant) model; in eval mode for the call.
        prompts_ids (`list[list[int]]`): each prompt's token ids, as the target was given them (`encode_prompt`).
        target_outputs (`list[list[int]]`): the target's own greedy output of each prompt, prompt excluded
            (`DraftReport.target_outputs`); shorter than `max_new_tokens` only when it ends with an EOS.
        num_assistant_tokens (`int` or `list[int]`): draft tokens per round, `k`; a list gives every `k` from the
            same forward passes.
        max_new_tokens (`int`): the length limit the target's outputs were generated with.
        eos_token_id (`int` or `list[int]`, *optional*): the target's EOS id(s),
            `target.generation_config.eos_token_id` (the draft stops at the target's EOS); `None`: none.

    Returns:
        `AcceptanceCounts` summed over the prompts, or `dict[int, AcceptanceCounts]` keyed by `k` when
        `num_assistant_tokens` is a list.

    Per prompt of `n` prompt and `m` output tokens the draft runs one forward over `(1, n + m)` tokens (logits kept
    for the last `m + 1` positions when the model supports `logits_to_keep`) and, with an EOS id, at most
    `max(k) - 1` forwards of `(branches, 1)` tokens over a cache of `(branches, heads, n + m + step, head_dim)`.

    Example:
        >>> report = evaluate_draft(target, draft, tok, prompts, max_new_tokens=48, num_assistant_tokens=3)
        >>> ids = [encode_prompt(tok, p) for p in prompts]
        >>> eos, outputs = target.generation_config.eos_token_id, report.target_outputs
        >>> counts = greedy_acceptance(draft, ids, outputs, [1, 3, 5], max_new_tokens=48, eos_token_id=eos)
        >>> counts[3].accepted == report.accepted_tokens and counts[3].proposed == report.proposed_tokens
        True
    """
    ks = [num_assistant_tokens] if isinstance(num_assistant_tokens, int) else list(num_assistant_tokens)
    if not ks or min(ks) < 1:
        raise ValueError(f"`num_assistant_tokens` must be >= 1, got {num_assistant_tokens}.")
    if len(prompts_ids) != len(target_outputs):
        raise ValueError(f"{len(target_outputs)} target outputs for {len(prompts_ids)} prompts.")
    eos = _token_set(eos_token_id)
    totals = {k: AcceptanceCounts() for k in ks}
    was_training = draft.training
    draft.eval()
    device = next(draft.parameters()).device
    try:
        for i, (prompt, output) in enumerate(zip(prompts_ids, target_outputs, strict=True)):
            output = list(output)
            early = [j for j, token in enumerate(output[:-1]) if token in eos]
            if not prompt or len(output) > max_new_tokens or early:
                raise ValueError(
                    f"Prompt {i}: {len(prompt)} prompt tokens, an output of {len(output)} tokens for "
                    f"max_new_tokens={max_new_tokens}, EOS at {early}: not a target's greedy output."
                )
            if len(output) < max_new_tokens and (not output or output[-1] not in eos):
                raise ValueError(
                    f"Prompt {i}: the output stops at {len(output)} < max_new_tokens={max_new_tokens} tokens without "
                    f"an EOS in {sorted(eos)}: wrong `max_new_tokens` or `eos_token_id`?"
                )
            ids = torch.tensor(prompt + output, device=device)
            kwargs = {"logits_to_keep": len(output) + 1} if draft._supports_logits_to_keep() else {}
            out = draft(input_ids=ids[None], use_cache=bool(eos), **kwargs)
            argmax = out.logits[0, -len(output) - 1 : -1].argmax(-1).tolist()  # argmax[j]: after prompt + output[:j]
            rounds = {k: _rounds(argmax, output, k, max_new_tokens, eos) for k in ks}
            # off-track proposals matter only when they may hold an EOS: per rejected position, the most steps needed
            steps: dict[int, int] = {}
            for start, budget, matched, rejected in (r for by_k in rounds.values() for r in by_k):
                j, left = start + matched, budget - matched - 1
                if rejected and left > 0 and argmax[j] not in eos:
                    steps[j] = max(steps.get(j, 0), left)
            first_eos: dict[int, int | None] = {}
            if steps:
                cache = out.past_key_values if _plain_cache(out.past_key_values) else None
                where = sorted(steps)
                found = _off_track_eos(
                    draft, ids, cache, [len(prompt) + j for j in where], [argmax[j] for j in where],
                    [steps[j] for j in where], eos,
                )  # fmt: skip
                first_eos = dict(zip(where, found, strict=True))
            for k, by_k in rounds.items():
                for start, budget, matched, rejected in by_k:
                    proposed = matched
                    if rejected:
                        left = budget - matched - 1
                        stop = first_eos.get(start + matched)
                        proposed += 1 + (0 if argmax[start + matched] in eos else min(left, stop or left))
                    kept = min(matched + 1, len(output) - start)
                    totals[k].add(
                        AcceptanceCounts(
                            proposed=proposed,
                            accepted=matched,
                            reported_matches=kept - 1,
                            target_forwards=1,
                            new_tokens=kept,
                            rejections=int(rejected),
                        )
                    )
    finally:
        draft.train(was_training)
    return totals[ks[0]] if isinstance(num_assistant_tokens, int) else totals
