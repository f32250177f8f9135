"""Top-k log-probs from served teachers (vLLM's `prompt_logprobs`), for the served teacher source
(`teachers.served`) and for teacher caches written from a server (`cache.cache_teacher(ServedLogprobs(...), ...)`).

`ServedLogprobs` holds one `vllm.VLLMClient` per server URL. The servers are replicas of one model (each micro-batch's
rows are split across them and requested in parallel), or one teacher each (rows routed by a `teacher_id`: TRL's
multi-teacher routing). It checks once that every server's tokenizer is the student's (`/tokenize` of a probe text,
and the model names the server serves), sends requests from a bounded thread pool (`submit` returns at once, so a
batch's request is in flight while the previous one trains), and turns the replies into the cache's row format
(`topk_rows`): per position the top-k ids, their log-probs (temperature 1) and the log of the mass outside them.

The tail mass comes from the reply: `log(1 - sum_k p)`, in float64, exactly -inf when `k` covers the vocabulary.
The reply's log-probs carry about 7 significant digits (JSON of fp32), so a tail below `TAIL_FLOOR` of the mass is
floored there (a bucket of ~1e-7 instead of noise).
"""

import logging
import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from .vllm import PromptLogprobs, VLLMClient, VLLMRequestError


logger = logging.getLogger(__name__)

API_KEY_ENV_VARS = ("HF_DISTILL_API_KEY", "OPENAI_API_KEY")
TAIL_FLOOR = 1e-7  # the smallest tail mass a reply's ~7-digit log-probs can tell from 0
# Text whose tokenization tells tokenizers apart: words, digits, spacing, punctuation, accents, CJK and an emoji.
PROBE_TEXT = (
    "The quick brown fox, 1234567890 times:\n\tjumps over the lazy dog! Naïve café, Grüße, 東京 🙂 "
    "def f(x): return x**2 == 4.5e-3 # done"
)


def tail_logmass(top_logprobs: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """`log(1 - sum(exp(top_logprobs)))` per row, the mass outside the top k (float64 inside).

    Args:
        top_logprobs (`torch.Tensor`): `(N, k)` log-probs at temperature 1.
        vocab_size (`int`, *optional*): V; `k >= V` gives -inf exactly (nothing outside).

    Returns:
        `torch.Tensor`: `(N,)` float32, at least `log(TAIL_FLOOR)` when `k < V`.
    """
    if vocab_size is not None and top_logprobs.shape[-1] >= vocab_size:
        return torch.full(top_logprobs.shape[:-1], float("-inf"))
    covered = top_logprobs.double().logsumexp(-1).clamp(max=0.0)  # (N,)
    tail = torch.log(-torch.expm1(covered))  # log(1 - e^covered), exact for covered < 0
    return tail.clamp(min=math.log(TAIL_FLOOR)).float()


@dataclass
class ServedRows:
    """One batch's replies: `rows[b]` is the `PromptLogprobs` of prompt b (positions 1..n_b - 1)."""

    rows: list[PromptLogprobs]
    stats: dict[str, float] = field(default_factory=dict)


class Pending:
    """Requests in flight for one batch of prompts; `result()` waits for them and returns `ServedRows` in prompt
    order (re-raising a failed request's error).

    Attributes:
        prompts (`list[list[int]]`): the prompts asked for (to tell whether a batch changed since).
    """

    def __init__(self, prompts: list[list[int]], parts: list[tuple[list[int], Future]]):
        self.prompts = prompts
        self._parts = parts

    def result(self) -> ServedRows:
        rows: list[PromptLogprobs | None] = [None] * len(self.prompts)
        for indices, future in self._parts:
            for i, reply in zip(indices, future.result(), strict=True):
                rows[i] = reply
        return ServedRows(rows)


def _headers(api_key_env: str | None) -> dict[str, str] | None:
    names = (api_key_env,) if api_key_env else API_KEY_ENV_VARS
    key = next((os.environ[n] for n in names if os.environ.get(n)), None)
    if api_key_env and key is None:
        raise ValueError(f"The environment variable {api_key_env} (the API key) is not set.")
    return {"Authorization": f"Bearer {key}"} if key else None


class ServedLogprobs:
    """Top-k prompt log-probs from one or several vLLM servers.

    Args:
        urls (`list[str]`): the servers' base URLs (`http://127.0.0.1:8000` or `.../v1`).
        models (`list[str]`, *optional*): the served model name, one for all or one per URL; None asks each server
            (it must serve exactly one model).
        k (`int`): log-probs per position (`prompt_logprobs`; at most the server's `--max-logprobs`).
        vocab_size (`int`, *optional*): the student's vocabulary: reply ids must be below it, and `k >= vocab_size`
            makes the tail exactly empty.
        routed (`bool`): the servers are different teachers, each row goes to its own (`teacher_ids` in `submit`);
            False: replicas, each batch's rows are split across them.
        timeout (`float`): seconds per request attempt.
        max_retries (`int`): retries on 429 / 5xx / connection errors / timeouts (exponential backoff, at most
            `max_backoff` s each): a restarting server is waited for.
        max_concurrency (`int`): requests in flight at most.
        api_key_env (`str`, *optional*): environment variable of the key (default `HF_DISTILL_API_KEY`, then
            `OPENAI_API_KEY`; none: no header).
        max_backoff (`float`): the longest wait between two retries.
        k_field (`str`): how errors name `k` (the caller's field or flag: `teacher_api_top_k`, cache-teacher's `--k`).
    """

    def __init__(
        self,
        urls: Sequence[str],
        models: Sequence[str] | None = None,
        *,
        k: int = 20,
        vocab_size: int | None = None,
        routed: bool = False,
        timeout: float = 300.0,
        max_retries: int = 5,
        max_concurrency: int = 4,
        api_key_env: str | None = None,
        max_backoff: float = 30.0,
        k_field: str = "teacher_api_top_k",
    ):
        urls = [urls] if isinstance(urls, str) else list(urls)
        models = [models] if isinstance(models, str) else list(models or [])
        if not urls or not all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in urls):
            raise ValueError(f"`teacher_api_base` must be http(s) URLs such as http://127.0.0.1:8000/v1, got {urls}.")
        if len(models) not in (0, 1, len(urls)):
            raise ValueError(f"`teacher_api_model` has {len(models)} names for {len(urls)} servers: one, or one each.")
        if k < 1 or max_concurrency < 1:
            raise ValueError(f"`teacher_api_top_k` and the concurrency must be >= 1, got {k} and {max_concurrency}.")
        if vocab_size is not None and k > vocab_size:
            raise ValueError(f"`{k_field}` ({k}) is larger than the vocabulary ({vocab_size}): set it to at most "
                             f"{vocab_size} (the whole vocabulary).")  # fmt: skip
        names = models * len(urls) if len(models) == 1 else models or [None] * len(urls)
        headers = _headers(api_key_env)
        self.clients = [
            VLLMClient(
                url,
                name,
                vocab_size,
                timeout=timeout,
                max_retries=max_retries,
                max_backoff=max_backoff,
                headers=headers,
            )
            for url, name in zip(urls, names, strict=True)
        ]
        self.k, self.vocab_size, self.routed, self.k_field = k, vocab_size, routed, k_field
        self.max_model_len: list[int | None] = [None] * len(urls)
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="served-teacher")
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "prompts": 0, "positions": 0}
        self.requests_per_server = [0] * len(urls)

    @property
    def bytes_received(self) -> int:
        """Reply bytes read from every server so far."""
        return sum(client.bytes_received for client in self.clients)

    @property
    def urls(self) -> list[str]:
        return [client.base_url for client in self.clients]

    def identity(self) -> dict[str, Any]:
        """What names the teacher (its served model names, not the URLs, which change between runs)."""
        return {"served": [client.model_name() for client in self.clients]}

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise a ValueError unless every server tokenizes a probe text (`PROBE_TEXT`, ~512 tokens spread over the
        student's vocabulary, its EOS) exactly as `tokenizer` does, naming the server. Also reads each server's
        `max_model_len`."""
        sample = list(range(0, len(tokenizer), max(1, len(tokenizer) // 512)))  # ~512 ids across the vocabulary
        text = PROBE_TEXT + " " + tokenizer.decode(sample, skip_special_tokens=True) + (tokenizer.eos_token or "")
        ours = tokenizer(text, add_special_tokens=False)["input_ids"]
        for i, client in enumerate(self.clients):
            served = client.models()
            name = client.model_name()
            if name not in served:
                raise ValueError(f"The server {client.base_url} does not serve `{name}` (it serves {list(served)}).")
            self.max_model_len[i] = served[name]
            theirs = client.tokenize(text, add_special_tokens=False)
            if theirs != ours:
                where = next((j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                raise ValueError(
                    f"The served teacher at {client.base_url} (`{name}`) tokenizes text differently from the "
                    f"student's tokenizer ({getattr(tokenizer, 'name_or_path', '?')!r}): first difference at token "
                    f"{where} ({theirs[where : where + 3]} vs {ours[where : where + 3]}). A served teacher's top-k "
                    "ids must be the student's token ids. Serve a teacher with the student's tokenizer; for a teacher "
                    "with another tokenizer use `cross_tokenizer_loss` with the teacher loaded in process or cached "
                    "(`hf-distill cache-teacher --teacher_tokenizer ...`)."
                )

    def check_lengths(self, prompts: Sequence[Sequence[int]], servers: Sequence[int]) -> None:
        """A ValueError when a prompt is longer than its server's `max_model_len`."""
        for prompt, server in zip(prompts, servers):
            limit = self.max_model_len[server]
            if limit is not None and len(prompt) > limit:
                raise ValueError(
                    f"A row of {len(prompt)} tokens is longer than the served teacher's max_model_len ({limit}) at "
                    f"{self.clients[server].base_url}: cut the rows (`max_length`) or serve with a longer "
                    "`--max-model-len`."
                )

    def submit(self, prompts: Sequence[Sequence[int]], teacher_ids: Sequence[int] | None = None) -> Pending:
        """Send the requests for a batch of prompts (token-id lists, unpadded) and return at once.

        Args:
            prompts (`list[list[int]]`): B prompts.
            teacher_ids (`list[int]`, *optional*): B server indices (routed teachers); required when `routed`.

        Returns:
            `Pending`: `.result()` gives one `PromptLogprobs` per prompt, in order.
        """
        prompts = [list(map(int, p)) for p in prompts]
        n = len(self.clients)
        if self.routed:
            if teacher_ids is None or len(teacher_ids) != len(prompts):
                raise ValueError("Several teachers (`teacher_api_base` list + a `teacher_id` column): every row needs "
                                 "its `teacher_id`.")  # fmt: skip
            bad = sorted({int(t) for t in teacher_ids if not 0 <= int(t) < n})
            if bad:
                raise ValueError(f"`teacher_id` values {bad} name no server: there are {n} (0..{n - 1}).")
            servers = [int(t) for t in teacher_ids]
        else:  # replicas: contiguous, near-equal shares of the batch
            servers = [min(i * n // max(len(prompts), 1), n - 1) for i in range(len(prompts))]
        self.check_lengths(prompts, servers)
        parts = []
        for server in sorted(set(servers)):
            indices = [i for i, s in enumerate(servers) if s == server]
            chunk = [prompts[i] for i in indices]
            parts.append((indices, self._pool.submit(self._score, server, chunk)))
        return Pending(prompts, parts)

    def _score(self, server: int, prompts: list[list[int]]) -> list[PromptLogprobs]:
        try:
            rows = self.clients[server].prompt_logprobs(prompts, self.k)
        except VLLMRequestError as err:
            if err.status == 400 and "logprobs" in err.body and "max allowed" in err.body:
                raise ValueError(
                    f"The served teacher at {self.clients[server].base_url} returns fewer log-probs per position than "
                    f"`{self.k_field}` ({self.k}) asks for ({err.body.strip()[:200]}): lower `{self.k_field}`, or "
                    "restart the server with a larger `--max-logprobs`."
                ) from err
            raise
        with self._lock:
            self.stats["requests"] += 1
            self.requests_per_server[server] += 1
            self.stats["prompts"] += len(prompts)
            self.stats["positions"] += sum(len(p) - 1 for p in prompts)
        return rows

    def score(self, prompts: Sequence[Sequence[int]], teacher_ids: Sequence[int] | None = None) -> ServedRows:
        """`submit(...).result()`: the replies of a batch, waiting for them."""
        return self.submit(prompts, teacher_ids).result()

    def topk_rows(
        self, reply: PromptLogprobs, positions: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One prompt's reply as cache entries at label positions `positions` (each j >= 1: the distribution of
        token j given tokens < j; default all, 1..n-1).

        Returns:
            `(ids (m, k) int32, logprobs (m, k) float32, tail (m,) float32)`, m = the number of positions.
        """
        index = torch.as_tensor(list(positions), dtype=torch.long) - 1 if positions is not None else slice(None)
        ids, logprobs = reply.top_ids[index], reply.top_logprobs[index]
        return ids.int(), logprobs.float(), tail_logmass(logprobs, self.vocab_size)

    def close(self) -> None:
        """Stop the pool (requests not started are dropped) and close the connections."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        for client in self.clients:
            client.close()
