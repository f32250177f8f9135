"""A small, thread-safe HTTP client for a vLLM OpenAI-compatible server (`vllm serve`, or
`python -m vllm.entrypoints.openai.api_server`).

It serves two uses: a *served teacher* (the teacher's top-k log-probs of every prompt position, `prompt_logprobs`)
and *on-policy sampling* of a student (`complete`; a LoRA student's adapters loaded at run time, `load_lora_adapter`,
a full-parameter student's weights reloaded in place, `reload_weights`: `generation/vllm_sampler.py`).
Prompts are always token ids, so the server never re-tokenizes; `tokenize` checks its tokenizer against ours.

What vLLM 0.32 returns for `prompt_logprobs: k` (read in its source and checked against the server):

- `choices[i].prompt_logprobs` has one entry per prompt token; the first is `null` (nothing predicts it).
- Entry `t` maps the token id *as a decimal string* to `{"logprob", "rank", "decoded_token"}`. It holds the top `k`
  (ranks 1..k in `torch.topk` order) plus the actual token `prompt[t]` (inserted first, rank = 1 + the number of
  tokens with a strictly larger log-prob, ties counted against it). When the actual token is in the top k its entry
  is that top-k entry, so an entry has `k` items, or `k + 1` when the actual token is outside the top k.
- `-inf` log-probs are sent as `-9999.0`; `return_tokens_as_token_ids` changes only sampled-token `logprobs`, not
  `prompt_logprobs` (keys are ids already). `prompt_logprobs` above the server's `--max-logprobs` is a 400.

Every reply is validated (number of choices and positions, ids in range, the actual token present, finite,
non-positive, rank-ordered log-probs); a malformed reply raises `VLLMReplyError`, never a partial result. A 200 whose
body is not JSON (a proxy's error page, a reply cut short) or, on `/v1/completions`, has no choices is retried like a
5xx first; the other faults of a reply are the server's answer to that request and raise at once.

Faults: each request has a timeout; 429 (its `Retry-After` honoured, up to `max_backoff`), 5xx, connection errors
and timeouts are retried with exponential backoff and jitter; any other 4xx raises `VLLMRequestError` at once; when
retries are exhausted `VLLMClientError` names the server URL, the route and the last failure. One `httpx` client
(connection pool) is shared by every thread using a `VLLMClient`; how many requests run at once is the caller's
choice.
"""

import itertools
import json
import logging
import math
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import torch


try:  # huggingface_hub >= 2 depends on httpx2 (Python >= 3.11); older hubs on httpx: the same API
    import httpx2 as httpx
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    import httpx


logger = logging.getLogger(__name__)

LOGPROB_SLACK = 1e-4  # a log-prob may exceed 0 by float rounding, never by more


class VLLMClientError(RuntimeError):
    """A request to the vLLM server failed for good (retries exhausted, or a reply that cannot be used); the message
    names the server URL and the route."""


class VLLMRequestError(VLLMClientError):
    """The server refused the request with a 4xx other than 429 (not retried).

    Attributes:
        status (`int`): the HTTP status.
        body (`str`): the start of the server's reply (its error message).
    """

    def __init__(self, message: str, status: int, body: str):
        super().__init__(message)
        self.status, self.body = status, body


class VLLMReplyError(VLLMClientError):
    """The server answered 200 with a reply that is not what was asked for (invalid JSON, wrong number of choices or
    positions, ids out of range, non-finite values, ...)."""


@dataclass(frozen=True)
class PromptLogprobs:
    """The server's top-k log-probs at every position of one prompt of `n` tokens (positions 1..n-1; position 0 has
    no distribution).

    Attributes:
        top_ids (`torch.LongTensor` of shape `(n - 1, k)`): the `k` most likely token ids at each position, most
            likely first.
        top_logprobs (`torch.FloatTensor` of shape `(n - 1, k)`): their log-probs (float32), non-increasing along
            `k`.
        token_logprobs (`torch.FloatTensor` of shape `(n - 1,)`): the log-prob of the actual next token
            `prompt[t]` at position `t` (float32), whether or not it is in the top k.
        token_ranks (`torch.LongTensor` of shape `(n - 1,)`): its rank (1 = most likely; ties count against it).
    """

    top_ids: torch.Tensor
    top_logprobs: torch.Tensor
    token_logprobs: torch.Tensor
    token_ranks: torch.Tensor


class VLLMClient:
    """Client of one vLLM OpenAI-compatible server.

    Args:
        base_url (`str`):
            The server's URL, e.g. `http://127.0.0.1:8000` (a trailing `/v1` is accepted and dropped).
        model (`str`, *optional*):
            Default served model name for requests; `None` asks the server (`models()`) on first use when it serves
            exactly one model.
        vocab_size (`int`, *optional*):
            Token ids in replies must be below it (the student's vocabulary). Without it only `>= 0` is checked.
        timeout (`float`, defaults to `120.0`):
            Seconds per request (connect, and each wait for bytes of the reply).
        max_retries (`int`, defaults to `5`):
            Retries after the first attempt on 429, 5xx, connection errors and timeouts.
        backoff (`float`, defaults to `0.5`):
            First retry delay in seconds; doubles each retry, with jitter (a uniform draw in [d/2, d]).
        max_backoff (`float`, defaults to `30.0`):
            Cap on a retry delay, and on a server's `Retry-After`.
        max_connections (`int`, defaults to `32`):
            Connections the shared pool may open (requests beyond it wait for one).
        headers (`dict[str, str]`, *optional*):
            Extra headers on every request (e.g. `Authorization` for a server started with `--api-key`).

    Example:

    ```python
    >>> client = VLLMClient("http://127.0.0.1:8000", vocab_size=len(tokenizer))
    >>> out = client.prompt_logprobs([[2, 6, 7, 8]], k=20)
    >>> out[0].top_ids.shape, out[0].token_logprobs.shape
    (torch.Size([3, 20]), torch.Size([3]))
    ```
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        vocab_size: int | None = None,
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_connections: int = 32,
        headers: dict[str, str] | None = None,
    ):
        if max_retries < 0 or timeout <= 0 or backoff < 0 or max_backoff < 0:
            raise ValueError("`timeout` must be > 0 and `max_retries`, `backoff`, `max_backoff` >= 0.")
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self._model, self.vocab_size = model, vocab_size
        self.timeout, self.max_retries, self.backoff, self.max_backoff = timeout, max_retries, backoff, max_backoff
        self._http = httpx.Client(
            timeout=timeout,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            headers=headers,
        )
        self._random = random.Random()
        self._lock = threading.Lock()  # guards the lazily resolved default model name
        self._count_lock = threading.Lock()
        self.bytes_received = 0  # reply bodies read so far (what the wire carried to us)

    # ------------------------------------------------------------------ plumbing

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self):  # -> VLLMClient
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_backoff)
        d = min(self.backoff * 2**attempt, self.max_backoff)
        return d / 2 + self._random.uniform(0, d / 2)

    def _request(
        self, method: str, route: str, payload: dict | None = None, text: bool = False, choices: bool = False
    ) -> Any:
        """Send one request with retries; return the decoded JSON reply (`None` for an empty body), or the reply's
        text when `text`. A 200 body that is not JSON, or that has no `choices` list with an entry when `choices`,
        is retried like a 5xx (then `VLLMReplyError`)."""
        url = f"{self.base_url}{route}"
        failure, unusable = "", False
        for attempt in range(self.max_retries + 1):
            retry_after, unusable = None, False
            try:
                reply = self._http.request(method, url, json=payload)
            except httpx.TimeoutException as err:
                failure = f"timed out after {self.timeout} s ({type(err).__name__})"
            except httpx.TransportError as err:  # refused, reset, closed mid-reply, ...
                failure = f"{type(err).__name__}: {err}"
            else:
                status = reply.status_code
                with self._count_lock:
                    self.bytes_received += len(reply.content)
                if status < 400:
                    if text:
                        return reply.text
                    decoded, problem = _decode_json(reply)
                    if problem is None and choices:
                        problem = _choices_problem(decoded)
                    if problem is None:
                        return decoded
                    failure, unusable = f"HTTP {status} with an unusable reply: {problem}", True
                    logger.debug("%s %s: %s", method, url, failure)
                else:
                    body = reply.text[:1000]
                    if status != 429 and status < 500:
                        raise VLLMRequestError(f"{method} {url} was refused with HTTP {status}: {body}", status, body)
                    failure = f"HTTP {status}: {body}"
                    retry_after = _retry_after(reply.headers.get("retry-after"))
            if attempt < self.max_retries:
                delay = self._delay(attempt, retry_after)
                logger.warning("%s %s failed (%s); retry %d/%d in %.1f s", method, url, failure, attempt + 1,
                               self.max_retries, delay)  # fmt: skip
                time.sleep(delay)
        message = f"{method} {url} failed {self.max_retries + 1} times; last failure: {failure}"
        if unusable:
            raise VLLMReplyError(f"{message}. Is the URL the vLLM server itself (not a proxy), and is it healthy?")
        raise VLLMClientError(message)

    def model_name(self) -> str:
        """The served model name requests use by default (asked of the server when it was not given)."""
        return self._model_name(None)

    def _model_name(self, model: str | None) -> str:
        if model is not None:
            return model
        with self._lock:
            if self._model is None:
                names = list(self.models())
                if len(names) != 1:
                    raise ValueError(f"{self.base_url} serves {names}: pass `model` to choose one.")
                self._model = names[0]
            return self._model

    def _check_prompts(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        if isinstance(prompts, (str, bytes)) or not prompts:
            raise ValueError("`prompts` must be a non-empty list of token-id lists.")
        rows = []
        for i, prompt in enumerate(prompts):
            row = [int(t) for t in prompt]
            if not row or any(t < 0 or (self.vocab_size is not None and t >= self.vocab_size) for t in row):
                raise ValueError(f"prompt {i} is empty or has a token id outside [0, {self.vocab_size}).")
            rows.append(row)
        return rows

    # ------------------------------------------------------------------ routes

    def models(self) -> dict[str, int | None]:
        """The served model names (the base model and each loaded LoRA adapter) and their `max_model_len`.

        Returns:
            `dict[str, int | None]`: name -> max_model_len (`None` where the server does not say).
        """
        url = f"{self.base_url}/v1/models"
        reply = self._request("GET", "/v1/models")
        try:
            return {m["id"]: m.get("max_model_len") for m in reply["data"]}
        except (TypeError, KeyError) as err:
            raise VLLMReplyError(f"GET {url}: unexpected reply {str(reply)[:300]}") from err

    def tokenize(self, text: str, add_special_tokens: bool = True, model: str | None = None) -> list[int]:
        """Token ids of `text` by the server's tokenizer (`POST /tokenize`), to check it equals the student's.

        Args:
            text (`str`): the text.
            add_special_tokens (`bool`, defaults to `True`): as the tokenizer's own flag.
            model (`str`, *optional*): served model name; defaults to the client's.

        Returns:
            `list[int]`: the ids, shape `(T,)`.
        """
        payload = {"model": self._model_name(model), "prompt": text, "add_special_tokens": add_special_tokens}
        reply = self._request("POST", "/tokenize", payload)
        tokens = reply.get("tokens") if isinstance(reply, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) and t >= 0 for t in tokens):
            raise VLLMReplyError(f"POST {self.base_url}/tokenize: unexpected reply {str(reply)[:300]}")
        return tokens

    def prompt_logprobs(
        self, prompts: Sequence[Sequence[int]], k: int, model: str | None = None
    ) -> list[PromptLogprobs]:
        """The server model's top-`k` log-probs at every position of each prompt (one `/v1/completions` request:
        `max_tokens: 1`, `temperature: 0`, `prompt_logprobs: k`).

        Args:
            prompts (`list[list[int]]`): B prompts of token ids, prompt `b` of length `n_b >= 1`.
            k (`int`): log-probs per position, `0 <= k <=` the server's `--max-logprobs`; `k = V` gives the whole
                vocabulary.
            model (`str`, *optional*): served model (or LoRA adapter) name; defaults to the client's.

        Returns:
            `list[PromptLogprobs]`: one per prompt, with `top_ids` / `top_logprobs` of shape `(n_b - 1, k)` and
            `token_logprobs` / `token_ranks` of shape `(n_b - 1,)`.
        """
        if k < 0 or (self.vocab_size is not None and k > self.vocab_size):
            raise ValueError(f"`k` must be in [0, vocab_size={self.vocab_size}], got {k}.")
        prompts = self._check_prompts(prompts)
        payload = {
            "model": self._model_name(model),
            "prompt": prompts,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": k,
            "return_token_ids": True,
        }
        reply = self._request("POST", "/v1/completions", payload, choices=True)
        where = f"POST {self.base_url}/v1/completions"
        return [
            _parse_positions(choice, prompt, k, self.vocab_size, f"{where}, prompt {b}")
            for b, (choice, prompt) in enumerate(zip(_choices(reply, len(prompts), where), prompts))
        ]

    def complete(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: int,
        temperature: float = 0.0,
        model: str | None = None,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        n: int = 1,
        top_p: float = 1.0,
        top_k: int = -1,
        ignore_eos: bool = False,
        sampling: dict[str, Any] | None = None,
    ) -> list[list[int]]:
        """Generate from token-id prompts (`/v1/completions`); `temperature = 0` is greedy.

        Args:
            prompts (`list[list[int]]`): B prompts of token ids.
            max_tokens (`int`): most new tokens per sequence (>= 1).
            temperature (`float`, defaults to `0.0`): sampling temperature; 0 = greedy.
            model (`str`, *optional*): served model or loaded LoRA adapter name; defaults to the client's.
            seed (`int`, *optional*): sampling seed (the same seed gives the same samples for the same prompt).
            stop_token_ids (`list[int]`, *optional*): ids that end a sequence besides the model's EOS.
            n (`int`, defaults to `1`): sequences per prompt.
            top_p (`float`, defaults to `1.0`), top_k (`int`, defaults to `-1`, all): sampling filters.
            ignore_eos (`bool`, defaults to `False`): keep generating past EOS.
            sampling (`dict`, *optional*): more sampling fields sent as they are (e.g. `{"repetition_penalty": 1.0}`,
                so the served model's `generation_config.json` defaults do not apply).

        Returns:
            `list[list[int]]`: B * n sequences of new token ids, prompt-major (rows `b * n .. b * n + n - 1` belong
            to prompt `b`); a sequence ended by EOS or a stop id includes that id as its last token.
        """
        if max_tokens < 1 or n < 1 or temperature < 0:
            raise ValueError("`max_tokens` and `n` must be >= 1 and `temperature` >= 0.")
        prompts = self._check_prompts(prompts)
        payload = {
            "model": self._model_name(model),
            "prompt": prompts,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "n": n,
            "ignore_eos": ignore_eos,
            "return_token_ids": True,
        }
        payload.update(sampling or {})
        if seed is not None:
            payload["seed"] = seed
        if stop_token_ids:
            payload["stop_token_ids"] = [int(t) for t in stop_token_ids]
        where = f"POST {self.base_url}/v1/completions"
        reply = self._request("POST", "/v1/completions", payload, choices=True)
        outputs = []
        for i, choice in enumerate(_choices(reply, len(prompts) * n, where)):
            ids = choice.get("token_ids")
            ok = isinstance(ids, list) and 1 <= len(ids) <= max_tokens and all(isinstance(t, int) for t in ids)
            if not ok or not all(0 <= t < (self.vocab_size or math.inf) for t in ids):
                raise VLLMReplyError(f"{where}, sequence {i}: bad token_ids {str(ids)[:200]}")
            if choice.get("prompt_token_ids") not in (None, prompts[i // n]):
                raise VLLMReplyError(f"{where}, sequence {i}: the server echoed another prompt")
            outputs.append(ids)
        return outputs

    def load_lora_adapter(self, name: str, path: str, load_inplace: bool = False) -> None:
        """Load a PEFT LoRA adapter folder (`save_pretrained`) into the running server under `name` (`POST
        /v1/load_lora_adapter`); requests then use it with `model=name`. The server must run with `--enable-lora`
        (and `--max-lora-rank` >= the adapter's r) and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`. A name already loaded
        is a 400 unless `load_inplace`; a path the server cannot read is a 404; other load failures are 500s (retried).

        Args:
            name (`str`): the adapter's served name.
            path (`str`): the adapter folder, as the server sees it.
            load_inplace (`bool`, defaults to `False`): replace the weights of the adapter already loaded as `name`
                (it keeps its internal id; see docs/vllm_facts.md on the prefix cache).
        """
        payload = {"lora_name": name, "lora_path": path, "load_inplace": load_inplace}
        self._request("POST", "/v1/load_lora_adapter", payload, text=True)

    def unload_lora_adapter(self, name: str) -> None:
        """Unload the adapter `name` (`POST /v1/unload_lora_adapter`); an unknown name is a `VLLMRequestError`
        (404)."""
        self._request("POST", "/v1/unload_lora_adapter", {"lora_name": name}, text=True)

    def reload_weights(self, path: str) -> None:
        """Reload the served model's weights in place from a `save_pretrained` folder (safetensors of the same
        architecture): `POST /collective_rpc` with `reload_weights(weights_path=path)` on every worker, then `POST
        /reset_prefix_cache`, so no cached prefix computed with the old weights is reused. Both are development
        routes: the server must run with `VLLM_SERVER_DEV_MODE=1` (else they are a 404 `VLLMRequestError`).

        Args:
            path (`str`): the weights folder, as the server sees it.
        """
        self._request("POST", "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": path}})
        self._request("POST", "/reset_prefix_cache", text=True)


# ---------------------------------------------------------------------- reply parsing


def _decode_json(reply: "httpx.Response") -> tuple[Any, str | None]:
    """`(decoded JSON or None for an empty body, None)`, or `(None, what is wrong)` for a body that is not JSON."""
    if not reply.content:
        return None, None
    try:
        return json.loads(reply.content), None
    except ValueError as err:
        return None, f"the body is not JSON ({err}): {reply.text[:200]!r}"


def _choices_problem(reply: Any) -> str | None:
    """What makes a `/v1/completions` reply one without any choice to read (None: it has some)."""
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not isinstance(choices, list) or not choices:
        return f"no choices: {str(reply)[:300]}"
    return None


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a `Retry-After` header (seconds, or an HTTP date), `None` when absent or unreadable."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return parsedate_to_datetime(value).timestamp() - time.time()
    except (TypeError, ValueError, OverflowError):
        return None


def _choices(reply: Any, expected: int, where: str) -> list[dict]:
    """`reply["choices"]` ordered by `index`, checked to be exactly indexes 0..expected-1."""
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise VLLMReplyError(f"{where}: the reply has no list of choices: {str(reply)[:300]}")
    indexes = sorted(c.get("index", -1) if isinstance(c.get("index"), int) else -1 for c in choices)
    if indexes != list(range(expected)):
        raise VLLMReplyError(f"{where}: expected choices 0..{expected - 1}, got indexes {indexes[:20]}")
    return sorted(choices, key=lambda c: c["index"])


def _parse_positions(choice: dict, prompt: list[int], k: int, vocab_size: int | None, where: str) -> PromptLogprobs:
    """One choice's `prompt_logprobs` as tensors, validated (see the module docstring for the reply's shape)."""
    positions = choice.get("prompt_logprobs")
    n = len(prompt)
    if positions is None:
        raise VLLMReplyError(
            f"{where}: the reply has no `prompt_logprobs` (a vLLM extension of /v1/completions): serve the teacher "
            "with vLLM (`vllm serve`), whose replies carry them."
        )
    if not isinstance(positions, list) or len(positions) != n:
        got = len(positions) if isinstance(positions, list) else type(positions).__name__
        raise VLLMReplyError(f"{where}: expected {n} prompt positions, got {got}")
    if positions[0] is not None:
        raise VLLMReplyError(f"{where}: position 0 should be null, got {str(positions[0])[:100]}")
    echoed = choice.get("prompt_token_ids")
    if echoed is not None and echoed != prompt:
        raise VLLMReplyError(f"{where}: the server scored another prompt ({str(echoed)[:100]})")
    high = vocab_size if vocab_size is not None else math.inf
    top_ids, top_lps, tok_lps, tok_ranks = [], [], [], []
    for t in range(1, n):
        entry = positions[t]
        if not isinstance(entry, dict):
            raise VLLMReplyError(f"{where}, position {t}: expected an object, got {str(entry)[:100]}")
        items = []  # (rank, logprob, id)
        try:
            for key, value in entry.items():
                tid, lp = int(key), float(value["logprob"])
                rank = value.get("rank")
                if not (0 <= tid < high) or not math.isfinite(lp) or lp > LOGPROB_SLACK:
                    raise ValueError(f"token {key}: log-prob {lp}")
                if not (isinstance(rank, int) and rank >= 1):
                    raise ValueError(f"token {key}: rank {rank!r}")
                items.append((rank, lp, tid))
        except (TypeError, KeyError, ValueError) as err:
            raise VLLMReplyError(f"{where}, position {t}: bad entry ({err}): {str(entry)[:200]}") from err
        actual = prompt[t]
        found = [item for item in items if item[2] == actual]
        if len(items) not in (k, k + 1) or not found:
            raise VLLMReplyError(
                f"{where}, position {t}: expected {k} or {k + 1} entries including the actual token {actual}, got "
                f"{len(items)} ids {sorted(i[2] for i in items)[:70]}"
            )
        top = sorted(item for item in items if len(items) == k or item[2] != actual)
        if [item[0] for item in top] != list(range(1, k + 1)) or any(
            a[1] < b[1] for a, b in itertools.pairwise(top)
        ):  # ranks 1..k with non-increasing log-probs
            raise VLLMReplyError(f"{where}, position {t}: top-{k} ranks/log-probs out of order: {top[:8]}")
        rank, lp, _ = found[0]
        if len(items) == k + 1 and (rank <= k or (k and lp > top[-1][1])):
            raise VLLMReplyError(f"{where}, position {t}: the extra actual token {actual} ranks {rank} with {lp}")
        top_ids.append([item[2] for item in top])
        top_lps.append([item[1] for item in top])
        tok_lps.append(lp)
        tok_ranks.append(rank)
    return PromptLogprobs(
        top_ids=torch.tensor(top_ids, dtype=torch.long).reshape(n - 1, k),
        top_logprobs=torch.tensor(top_lps, dtype=torch.float32).reshape(n - 1, k),
        token_logprobs=torch.tensor(tok_lps, dtype=torch.float32),
        token_ranks=torch.tensor(tok_ranks, dtype=torch.long),
    )
