"""Black-box teachers behind OpenAI-compatible endpoints (vLLM, TGI, llama.cpp, Ollama, `transformers serve`, hosted).

A served teacher only returns text, so it serves every place where the teacher writes text: rationales
(`hf_distill.data.rationales.generate_rationales`), the data-free transfer set (`hf_distill.data.transfer_set`) and
sequence-level KD targets (`generate_completions_dataset`, used by `hf-distill cache-teacher --generate`).

- Client: the `openai` package (`pip install "hf-distill[api]"`): it speaks both `/v1/chat/completions` and
  `/v1/completions`, raises typed errors (status code, connection, timeout) and retries 408/409/429/5xx, connection
  errors and timeouts with exponential backoff (0.5 s doubling, at most 8 s) and jitter.
- Replies are checked before they are used: a 200 whose body is not JSON (a proxy's HTML page, a reply cut short),
  has no choices, or holds a null or empty `content` / `text` is retried like a 5xx (same backoff, same retry budget),
  then fails with `APITeacherError` naming the endpoint and the problem. An empty answer is kept only when the server
  says the model stopped there (`finish_reason: "stop"`): a greedy request would answer it again.
- Concurrency: at most `max_concurrency` requests in flight (threads sharing one client).
- Resumable: every response is appended to a JSON-lines store and flushed (fsync) before the next request is sent; a
  re-run requests only the (prompt, sample) pairs missing from the store, so no row is lost or duplicated. Empty
  responses that older versions stored (from null or empty replies) are requested again.
- The API key is read from an environment variable (`HF_DISTILL_API_KEY`, else `OPENAI_API_KEY`, or the one named by
  `api_key_env`); it is never logged, written or put in an error message.
"""

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from ..jobs import AppendLog, check_or_record_settings, read_appended_records, write_json_atomic
from .seq_kd import generate_completions_dataset  # lives there; importable from here as before


logger = logging.getLogger(__name__)

API_KEY_ENV_VARS = ("HF_DISTILL_API_KEY", "OPENAI_API_KEY")  # first one set wins
NO_KEY = "EMPTY"  # sent when no key is set: local servers (vLLM, TGI, transformers serve) ignore it
ENDPOINTS = ("chat", "completions")
UNUSABLE_HEADER = (
    "x-hf-distill-unusable-reply"  # marks the 502 that stands for an unusable 200 (see `_checked_client`)
)
EMPTY_ANSWER = "empty_answer"  # a stored record's flag: its empty text is the model's answer (it stopped at once)

Prompt = str | list[dict[str, str]]  # plain text, or chat messages [{"role": ..., "content": ...}]


class APITeacherError(RuntimeError):
    """A request to an API teacher failed for good (a 4xx answer, or retries exhausted); names the endpoint, never
    the key."""


@dataclass
class TeacherAPIArguments:
    """Where a served teacher answers (OpenAI-compatible endpoints: vLLM, SGLang, TGI, hosted APIs): the fields shared
    by the text API teacher (`APITeacherArguments`: rationales, transfer sets, seq-KD targets) and the served logit
    teacher of `train` / `cache-teacher` (`DistillationArguments`)."""

    _argument_group_name = "API teacher (OpenAI-compatible endpoint)"  # the `--help` group of these flags

    teacher_api_base: list[str] | None = field(
        default=None,
        metadata={
            "help": "OpenAI-compatible base URL of a served teacher (e.g. http://127.0.0.1:8000/v1); its key is read "
            "from $HF_DISTILL_API_KEY or $OPENAI_API_KEY (never logged). Several URLs (served logit teacher only): "
            "replicas of one model, or one teacher each when the data has a `teacher_id` column."
        },
    )
    teacher_api_model: list[str] | None = field(
        default=None,
        metadata={"help": "Model name the server serves (one for every URL, or one per URL; see /v1/models)."},
    )
    teacher_api_key_env: str | None = field(
        default=None, metadata={"help": "Name of the environment variable holding the API key (default: see above)."}
    )
    max_concurrency: int = field(default=4, metadata={"help": "API teacher: requests in flight at most."})
    teacher_api_timeout: float = field(default=300.0, metadata={"help": "API teacher: seconds per request."})
    teacher_api_max_retries: int = field(
        default=5, metadata={"help": "API teacher: retries on 429 / 5xx / connection errors / timeouts."}
    )


@dataclass
class APITeacherArguments(TeacherAPIArguments):
    """Command-line flags of a text API teacher (shared by `rationales generate`, `quickstart` and `cache-teacher`)."""

    _argument_group_name = TeacherAPIArguments._argument_group_name  # one `--help` group with the fields above

    teacher_api_endpoint: str = field(
        default="chat",
        metadata={"help": "`chat` (/v1/chat/completions) or `completions` (/v1/completions).", "choices": ENDPOINTS},
    )
    num_generations: int = field(
        default=1, metadata={"help": "API teacher: samples per prompt (rationales keep one whose answer matches)."}
    )


def single(value: Any, name: str) -> Any:
    """The one value of a field that may hold a list (`teacher_api_base`, `teacher_api_model`): a list of one gives its
    element; several raise a ValueError naming the field."""
    if isinstance(value, list | tuple):
        if len(value) > 1:
            raise ValueError(
                f"`{name}` has {len(value)} values, but a text API teacher uses one server; give one (several URLs "
                "are for the served logit teacher of `train` / `cache-teacher`)."
            )
        return value[0] if value else None
    return value


def _key_env(name: str | None) -> str | None:
    names = (name,) if name else API_KEY_ENV_VARS
    return next((n for n in names if os.environ.get(n)), None)


@dataclass
class APITeacher:
    """A teacher served behind an OpenAI-compatible API.

    Args:
        base_url (`str`): the API root, e.g. `http://127.0.0.1:8000/v1` (vLLM, TGI, transformers serve),
            `http://127.0.0.1:11434/v1` (Ollama), `https://api.openai.com/v1`.
        model (`str`): the model name the server serves.
        endpoint (`str`): `"chat"` (prompts are user turns; the server applies the chat template) or
            `"completions"` (raw text prompts, as a local teacher without chat template).
        api_key_env (`str`, *optional*): environment variable holding the key; default the first set of
            `HF_DISTILL_API_KEY`, `OPENAI_API_KEY` (no key: `"EMPTY"` is sent, which local servers accept).
        max_concurrency (`int`): requests in flight at most.
        max_retries (`int`): retries per request on 408/409/429/5xx, connection errors and timeouts (exponential
            backoff with jitter, by the `openai` client).
        timeout (`float`): seconds per request attempt.
    """

    base_url: str
    model: str
    endpoint: str = "chat"
    api_key_env: str | None = None
    max_concurrency: int = 4
    max_retries: int = 5
    timeout: float = 300.0

    def __post_init__(self) -> None:
        if not isinstance(self.base_url, str) or not self.base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"`teacher_api_base` must be an http(s) URL such as http://127.0.0.1:8000/v1, got {self.base_url!r}."
            )
        if not self.model:
            raise ValueError("Name the served model with `teacher_api_model` (see the server's /v1/models).")
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"`teacher_api_endpoint` must be one of {ENDPOINTS}, got {self.endpoint!r}.")
        if self.max_concurrency < 1 or self.max_retries < 0 or self.timeout <= 0:
            raise ValueError(
                f"Need max_concurrency >= 1, max_retries >= 0 and timeout > 0; got {self.max_concurrency}, "
                f"{self.max_retries} and {self.timeout}."
            )
        if self.api_key_env and not os.environ.get(self.api_key_env):
            raise ValueError(f"The environment variable {self.api_key_env} (the API key) is not set.")
        self.base_url = self.base_url.rstrip("/")

    @classmethod
    def from_args(cls, args: Any, model: str | None = None) -> "APITeacher | None":
        """The teacher of parsed `APITeacherArguments` flags (None when `--teacher_api_base` is not given);
        `model` is the fallback model name (e.g. `--teacher`)."""
        if not getattr(args, "teacher_api_base", None):
            return None
        return cls(
            base_url=single(args.teacher_api_base, "teacher_api_base"),
            model=single(args.teacher_api_model, "teacher_api_model") or model,
            endpoint=args.teacher_api_endpoint,
            api_key_env=args.teacher_api_key_env,
            max_concurrency=args.max_concurrency,
            max_retries=args.teacher_api_max_retries,
            timeout=args.teacher_api_timeout,
        )

    @property
    def identity(self) -> dict[str, str]:
        """What identifies the teacher in settings and metadata (never the key)."""
        return {"base_url": self.base_url, "model": self.model, "endpoint": self.endpoint}

    @property
    def url(self) -> str:
        """The endpoint's URL (named in errors)."""
        return f"{self.base_url}/{'chat/completions' if self.endpoint == 'chat' else 'completions'}"

    def _client(self) -> Any:
        try:
            from openai import OpenAI
        except ImportError as err:  # pragma: no cover - the extra is installed in the tested set
            raise ImportError('API teachers need the `openai` client: pip install "hf-distill[api]".') from err
        env = _key_env(self.api_key_env)
        return OpenAI(
            base_url=self.base_url,
            api_key=os.environ[env] if env else NO_KEY,
            max_retries=self.max_retries,
            timeout=self.timeout,
            http_client=_checked_client(self.endpoint),
        )

    def _scrub(self, text: str) -> str:
        env = _key_env(self.api_key_env)
        key = os.environ.get(env) if env else None
        return text.replace(key, "***") if key else text

    def request(self, client: Any, prompt: Prompt, sampling: dict[str, Any]) -> dict[str, Any]:
        """One completion: `{"text", "finish_reason", "prompt_tokens", "completion_tokens"}` (and `"empty_answer":
        True` when the text is empty because the model stopped at once).

        A 200 reply that cannot be used (not JSON, no choices, null or empty text: `reply_problem`) is retried like a
        5xx by the client that `_client` builds.

        Raises:
            `APITeacherError`: on a 4xx answer (unknown model, auth, bad parameter) or when the retries are spent.
        """
        import openai

        try:
            if self.endpoint == "chat":
                messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
                response = client.chat.completions.create(model=self.model, messages=messages, n=1, **sampling)
                text = response.choices[0].message.content
            else:
                if not isinstance(prompt, str):
                    raise ValueError("The completions endpoint takes text prompts; use teacher_api_endpoint=chat.")
                response = client.completions.create(model=self.model, prompt=prompt, n=1, **sampling)
                text = response.choices[0].text
        except openai.APIStatusError as err:
            detail = self._scrub(str(getattr(err, "body", None) or err.message))[:500]
            status = err.status_code
            if err.response.headers.get(UNUSABLE_HEADER):
                raise APITeacherError(
                    f"The API teacher at {self.url} answered HTTP 200 with an unusable reply for model "
                    f"{self.model!r}, also after {self.max_retries} retries: {err.response.headers[UNUSABLE_HEADER]}. "
                    "Is --teacher_api_base the server itself (not a proxy or login page), and is the server healthy "
                    "(see its log)?"
                ) from None
            if status in (401, 403):
                hint = "check the API key (read from $HF_DISTILL_API_KEY / $OPENAI_API_KEY or --teacher_api_key_env)"
            elif status in (400, 404):
                hint = (
                    f"check --teacher_api_model {self.model!r} (the server's {self.base_url}/models lists what it "
                    "serves) and --teacher_api_base (the API root, usually ending in /v1)"
                )
            elif status == 422:
                hint = "the server rejected a request parameter"
            else:
                hint = f"gave up after {self.max_retries} retries"
            raise APITeacherError(
                f"The API teacher at {self.url} answered HTTP {status} for model {self.model!r}: {detail} ({hint})."
            ) from None
        except openai.APIConnectionError as err:
            kind = "timed out" if isinstance(err, openai.APITimeoutError) else "could not be reached"
            raise APITeacherError(
                f"The API teacher at {self.url} {kind} ({self._scrub(str(err))}) after {self.max_retries} retries "
                f"with backoff (per-request timeout {self.timeout:g} s); is the server up?"
            ) from None
        usage = getattr(response, "usage", None)
        result = {
            "text": text,
            "finish_reason": response.choices[0].finish_reason,
            "prompt_tokens": getattr(usage, "prompt_tokens", None) or 0,
            "completion_tokens": getattr(usage, "completion_tokens", None) or 0,
        }
        if not text:  # checked by `reply_problem`: the model stopped at once
            result[EMPTY_ANSWER] = True
        return result

    def generate(
        self,
        prompts: Sequence[Prompt],
        store: str,
        *,
        n: int = 1,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: Sequence[str] | None = None,
        desc: str = "API teacher",
        show_progress: bool = True,
    ) -> tuple[list[list[dict[str, Any]]], dict[str, Any]]:
        """`n` completions of every prompt, resumable through the JSON-lines file `store`.

        Every finished response is appended to `store` and flushed before another request is sent; a re-run with the
        same prompts and settings requests only the (prompt, sample) pairs missing there. Settings are kept in
        `<store without .jsonl>.settings.json` (a re-run must match them) and every run's usage and wall time is
        appended to `<store without .jsonl>.runs.json`.

        Args:
            prompts (`list[str | list[dict]]`): `P` text prompts or chat message lists.
            store (`str`): the JSON-lines file of finished responses.
            n (`int`): samples per prompt; sample `j` of prompt `i` is a request seeded with `seed + i * n + j`
                (one request per sample, as servers differ in `n` support: `transformers serve` ignores it).
            max_new_tokens, temperature, top_p, stop: sampling; `temperature=0` is greedy (then `top_p` and the seed
                are not sent).

        Returns:
            (`results`, `stats`): `results[i][j]` is `{"text", "finish_reason", "prompt_tokens",
            "completion_tokens"}` of sample `j` of prompt `i` (`P` lists of `n`); `stats` holds this run's request
            count, reused responses, token usage (this run and in total), wall seconds and responses per second.

        Raises:
            `APITeacherError`: a request failed for good. Responses finished before (also those in flight then) are
            kept in `store`; re-run to request only the missing ones.
        """
        if n < 1 or max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(
                f"Need n >= 1, max_new_tokens >= 1, temperature >= 0 and 0 < top_p <= 1; got {n}, {max_new_tokens}, "
                f"{temperature} and {top_p}."
            )
        sampling: dict[str, Any] = {"max_tokens": max_new_tokens, "temperature": temperature}
        if temperature > 0:
            sampling["top_p"] = top_p
        if stop:
            sampling["stop"] = list(stop)
        # what decides the responses (the URL may change between runs: a restarted server, another host)
        settings = {"model": self.model, "endpoint": self.endpoint, **sampling, "n": n}
        settings["seed"] = seed if temperature > 0 else None
        root = store.removesuffix(".jsonl")
        os.makedirs(os.path.dirname(os.path.abspath(store)), exist_ok=True)
        check_or_record_settings(f"{root}.settings.json", settings, "API-teacher responses")
        keys = [_prompt_key(p) for p in prompts]
        done, unusable = _read_store(store, keys, n)
        todo = [(i, j) for i in range(len(prompts)) for j in range(n) if (i, j) not in done]
        reused = len(done)
        if unusable:
            logger.warning(
                "%d of the %d responses in %s are empty (null or empty replies that an older version stored); "
                "requesting them again.",
                len(unusable),
                len(prompts) * n,
                store,
            )
        if done:
            logger.info("Resuming: %d of %d responses already in %s.", reused, len(prompts) * n, store)
        client = self._client() if todo else None
        started = time.time()
        made = prompt_tokens = completion_tokens = 0
        first_error: BaseException | None = None
        pending: dict[Future, tuple[int, int]] = {}
        queue = iter(todo)

        def top_up(pool: ThreadPoolExecutor) -> None:
            while first_error is None and len(pending) < self.max_concurrency:
                unit = next(queue, None)
                if unit is None:
                    return
                i, j = unit
                extra = {"seed": seed + i * n + j} if temperature > 0 else {}
                pending[pool.submit(self.request, client, prompts[i], {**sampling, **extra})] = unit

        with (
            client if client is not None else nullcontext(),  # closed last, after the pool's threads are done
            AppendLog(store) as log,  # ends a line a kill cut short, so it cannot swallow the next record
            ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="api-teacher") as pool,
            tqdm(total=len(prompts) * n, initial=reused, desc=desc, disable=not show_progress) as bar,
        ):
            try:
                top_up(pool)
                while pending:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        i, j = pending.pop(future)
                        try:
                            result = future.result()
                        except APITeacherError as err:
                            first_error = first_error or err
                            continue
                        record = {"index": i, "sample": j, "key": keys[i], **result, "time": round(time.time(), 3)}
                        log.append([record])  # flushed and fsync'd before any further request is sent
                        done[(i, j)] = record
                        made += 1
                        prompt_tokens += result["prompt_tokens"]
                        completion_tokens += result["completion_tokens"]
                        bar.update(1)
                    top_up(pool)
            except BaseException:  # Ctrl-C: drop the queued requests, keep what finished
                for future in pending:
                    future.cancel()
                raise
        wall = time.time() - started
        stats = {
            **self.identity,
            "max_concurrency": self.max_concurrency,
            "requests": made,
            "reused": reused,
            "missing": len(prompts) * n - len(done),
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_prompt_tokens": sum(r["prompt_tokens"] for r in done.values()),
            "total_completion_tokens": sum(r["completion_tokens"] for r in done.values()),
            "wall_seconds": round(wall, 3),
            "responses_per_second": round(made / wall, 4) if made and wall > 0 else None,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _append_run(f"{root}.runs.json", stats)
        if first_error is not None:
            raise APITeacherError(
                f"{first_error} {len(done)} of {len(prompts) * n} responses are saved in {store}; run the same "
                "command again to request only the missing ones."
            )
        logger.info(
            "API teacher %s: %d requests in %.1f s (%s responses/s, %d in flight at most), %d prompt + %d completion "
            "tokens; %d responses reused from %s.",
            self.model,
            made,
            wall,
            stats["responses_per_second"],
            self.max_concurrency,
            prompt_tokens,
            completion_tokens,
            reused,
            store,
        )
        return [[done[(i, j)] for j in range(n)] for i in range(len(prompts))], stats


def _prompt_key(prompt: Prompt) -> str:
    return hashlib.sha1(json.dumps(prompt, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _read_store(
    path: str, keys: list[str], n: int
) -> tuple[dict[tuple[int, int], dict[str, Any]], set[tuple[int, int]]]:
    """Finished responses of earlier runs, and the (prompt, sample) pairs whose only stored responses are unusable.

    A line cut short by a kill is skipped (that response is requested again); a repeated (prompt, sample) keeps its
    first usable response. An empty text without the `empty_answer` flag was stored by an older version from a null
    or empty reply: it is not kept (requested again)."""
    done: dict[tuple[int, int], dict[str, Any]] = {}
    unusable: set[tuple[int, int]] = set()

    def parse(record: dict) -> tuple[tuple[int, int], dict[str, Any]]:
        if not isinstance(record.get("text"), str) or "key" not in record:
            raise KeyError("text")
        return (int(record["index"]), int(record["sample"])), record

    for number, (unit, record) in read_appended_records(path, parse):
        if unit[0] >= len(keys) or unit[1] >= n or record["key"] != keys[unit[0]]:
            raise ValueError(
                f"Line {number} of {path} answers another prompt (prompt {unit[0]}, sample {unit[1]}); the "
                "prompts changed since the earlier run. Use a new output folder."
            )
        if record["text"] or record.get(EMPTY_ANSWER):
            done.setdefault(unit, record)
        else:
            unusable.add(unit)
    return done, unusable - done.keys()


def reply_problem(body: bytes, endpoint: str) -> str | None:
    """What makes a 200 reply of the `chat` or `completions` endpoint unusable, or None when it is a usable one.

    Unusable: a body that is not JSON (an HTML page from a proxy, a reply cut short), no `choices` or an empty list,
    or a first choice whose `message.content` (chat) / `text` (completions) is missing, null, not a string, or empty
    while the model did not stop there (`finish_reason` other than `"stop"`).

    Args:
        body (`bytes`): the reply's body.
        endpoint (`str`): `"chat"` or `"completions"`.
    """
    try:
        reply = json.loads(body)
    except ValueError:
        start = body[:80].decode("utf-8", "replace")
        return f"the body is not JSON ({len(body)} bytes starting {start!r})"
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not isinstance(choices, list) or not choices:
        return f"no choices (`choices`: {json.dumps(choices)[:80]})"
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") if endpoint == "chat" else choice
    name = "message.content" if endpoint == "chat" else "text"
    text = message.get("content" if endpoint == "chat" else "text") if isinstance(message, dict) else None
    if text is None:
        return f"`{name}` is null or missing in the first choice"
    if not isinstance(text, str):
        return f"`{name}` is a {type(text).__name__}, not text"
    if not text and choice.get("finish_reason") != "stop":
        return f"`{name}` is empty and the model did not stop there (finish_reason {choice.get('finish_reason')!r})"
    return None


def _checked_client(endpoint: str) -> Any:
    """The `openai` client's HTTP client, which turns a 200 reply that `reply_problem` finds unusable into a 502
    marked with `UNUSABLE_HEADER` (the problem): the `openai` client then retries it as any 5xx (same backoff, same
    budget) and, when the retries are spent, raises the `APIStatusError` that `APITeacher.request` reports."""
    import openai

    try:  # the module `openai` builds its requests with: httpx2 where installed (huggingface_hub >= 2), else httpx
        import httpx2 as httpx
    except ImportError:  # pragma: no cover - depends on the installed openai
        import httpx

    class CheckedClient(openai.DefaultHttpxClient):
        """`openai`'s default HTTP client, checking each 200 reply of a POST before `openai` parses it."""

        def send(self, request: Any, **kwargs: Any) -> Any:
            """Send `request`; a 200 reply that `reply_problem` finds unusable comes back as a marked 502."""
            response = super().send(request, **kwargs)
            if response.status_code != 200 or request.method != "POST" or kwargs.get("stream"):
                return response
            problem = reply_problem(response.content, endpoint)
            if problem is None:
                return response
            response.close()
            logger.debug("Unusable 200 reply from %s: %s", request.url, problem)
            return httpx.Response(
                502,
                headers={UNUSABLE_HEADER: problem.encode("ascii", "replace").decode()},
                json={"error": {"message": f"unusable reply: {problem}"}},
                request=request,
            )

    return CheckedClient()


def _append_run(path: str, stats: dict[str, Any]) -> None:
    runs = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            runs = json.load(f)
    runs.append(stats)
    write_json_atomic(path, runs)


__all__ = [
    "API_KEY_ENV_VARS",
    "APITeacher",
    "APITeacherArguments",
    "APITeacherError",
    "generate_completions_dataset",
]
