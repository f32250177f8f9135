"""On-policy student samples from a vLLM server that follows the student as it learns (`use_vllm: true`).

The server is started beside the run (docs/onpolicy.md) on the student's *base* weights. `VLLMStudentSampler` keeps
it in step with the student and asks it for completions:

- **Sync** (`sync`): before the first samples and then every `vllm_sync_steps` optimizer steps, the main process
  writes the student with `save_pretrained` into `vllm_sync_dir/step-{s}` (a folder the server can read) and
  - a LoRA student (a PEFT model): loads the adapter folder under a new name (`POST /v1/load_lora_adapter`,
    `<run>-step{s}`), then unloads the previous one; requests name the newest adapter. The server runs with
    `--enable-lora --max-lora-rank R` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`.
  - a full-parameter student: reloads the served model's weights in place from the folder (`POST /collective_rpc`
    `reload_weights`, a development route: `VLLM_SERVER_DEV_MODE=1`), then resets the prefix cache, so no KV block
    computed with the old weights is reused.
  The older folder is then deleted. Under FSDP / ZeRO-3 every process takes part in gathering the state dict; only
  the main process writes and talks to the server, and every process waits at a barrier until the new weights are
  served, so no process samples from weights older than the sync interval.
- **Sampling** (`sample` / `submit`): one `/v1/completions` request of token-id prompts per call, with the `generate`
  path's semantics: `generation_temperature` (0 = greedy), full-distribution sampling (top_k / top_p off, no
  repetition penalty whatever the served `generation_config.json` says), at most `max_new_tokens`, ending at the first
  of the tokenizer's EOS ids (kept; `ignore_eos` + `stop_token_ids`, so the served model's own EOS list does not
  apply). A reply that is cut short (fewer tokens and no EOS: an aborted request, or the server's `max_model_len`)
  is an error, never trained on; the client validates the rest (`generation/vllm.py`).

Faults: requests (server down, 5xx, timeouts) are retried by the client; a refused adapter load is retried here too
(the folder may not be visible to the server yet on a network file system); then the run stops with an error naming
the server.
"""

import logging
import os
import shutil
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from accelerate.utils import DistributedType, broadcast_object_list
from torch import nn

from .onpolicy import cut_at_eos
from .vllm import VLLMClient, VLLMClientError, VLLMReplyError, VLLMRequestError


logger = logging.getLogger(__name__)

NEUTRAL_SAMPLING = {"repetition_penalty": 1.0, "min_p": 0.0}  # override a served generation_config.json's defaults
LORA_HINT = (
    "start the server with `--enable-lora --max-lora-rank R` (R >= the adapter's r) and the environment variable "
    "`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`"
)
FULL_HINT = (
    "a full-parameter student's weights are pushed with `POST /collective_rpc` (`reload_weights`) and `POST "
    "/reset_prefix_cache`, which vLLM serves only with `VLLM_SERVER_DEV_MODE=1`: restart the server with it, or train "
    "a LoRA student (`peft_config`)"
)


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` (unwrapped) is a PEFT model whose adapter can be served as a vLLM LoRA adapter."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


class VLLMStudentSampler:
    """Keeps a vLLM server in step with the student and samples completions from it.

    Args:
        client (`VLLMClient`): the server's client (one per process; requests from threads share it).
        sync_dir (`str`): folder the server can read, where each sync writes `step-{s}`.
        sync_steps (`int`, defaults to `1`): optimizer steps between syncs.
        max_new_tokens (`int`, defaults to `128`): completion length limit.
        temperature (`float`, defaults to `1.0`): sampling temperature; 0 = greedy.
        eos_token_ids (`list[int]`, *optional*): a completion ends after the first of these (kept).
        load_retries (`int`, defaults to `5`): retries of a refused adapter load / weight reload.
        retry_delay (`float`, defaults to `1.0`): seconds before the first retry of a refused load (doubling).

    Example:

    ```python
    >>> sampler = VLLMStudentSampler(VLLMClient("http://127.0.0.1:8000"), "runs/x/vllm-sync", max_new_tokens=64)
    >>> sampler.sync(peft_student, accelerator, step=0)  # loads the adapter as `<run>-step0`
    >>> sampler.sample([[1, 17, 42], [1, 9]])  # two completions, each ending with EOS or 64 tokens long
    ```
    """

    def __init__(
        self,
        client: VLLMClient,
        sync_dir: str,
        sync_steps: int = 1,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        eos_token_ids: list[int] | None = None,
        load_retries: int = 5,
        retry_delay: float = 1.0,
    ):
        if sync_steps < 1 or max_new_tokens < 1 or temperature < 0:
            raise ValueError("`sync_steps` and `max_new_tokens` must be >= 1 and `temperature` >= 0.")
        self.client, self.sync_dir, self.sync_steps = client, Path(sync_dir), sync_steps
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.eos_token_ids = list(eos_token_ids or [])
        self.load_retries, self.retry_delay = load_retries, retry_delay
        self.synced_step: int | None = None  # optimizer step of the weights the server serves now
        self.model_name: str | None = None  # what requests name: the newest adapter, or the base model
        self.kind: str | None = None  # "lora" or "full", fixed at the first sync
        self.sync_seconds: list[float] = []  # main process: write + load + barrier, per sync
        self.sample_seconds: list[float] = []
        self._run_id: str | None = None
        self._main = False  # whether this process talks to the server about weights (the main process)
        self._folder: Path | None = None
        self._pool: ThreadPoolExecutor | None = None  # the background request of `submit` (read-ahead)

    @classmethod
    def from_args(cls, args: Any, tokenizer: Any, config: Any) -> "VLLMStudentSampler":
        """The sampler a config asks for (`vllm_server_base_url`, `vllm_server_timeout`, `vllm_max_retries`,
        `vllm_sync_steps`, `vllm_sync_dir` or `output_dir/vllm-sync`, `max_new_tokens`, `generation_temperature`),
        ending completions at the `tokenizer`'s EOS (else the student `config`'s), as the `generate` path does."""
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
        eos_token_id = eos_token_id if eos_token_id is not None else config.eos_token_id
        client = VLLMClient(
            args.vllm_server_base_url,
            vocab_size=getattr(config, "vocab_size", None),
            timeout=args.vllm_server_timeout,
            max_retries=args.vllm_max_retries,
        )
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        return cls(
            client,
            args.vllm_sync_dir or os.path.join(args.output_dir, "vllm-sync"),
            sync_steps=args.vllm_sync_steps,
            max_new_tokens=args.max_new_tokens,
            temperature=args.generation_temperature,
            eos_token_ids=eos,
            load_retries=args.vllm_max_retries,
        )

    @property
    def url(self) -> str:
        """The server's URL."""
        return self.client.base_url

    # ------------------------------------------------------------------------------------------------ sync
    def due(self, step: int) -> bool:
        """Whether the weights of optimizer step `step` must be pushed before sampling (nothing served yet, or the
        served weights are `sync_steps` or more steps old)."""
        return self.synced_step is None or step - self.synced_step >= self.sync_steps

    def sync(self, model: nn.Module, accelerator: Any, step: int) -> None:
        """Push the student's current weights (those after `step` optimizer steps) to the server. Called on every
        process at the same steps (collective under FSDP / ZeRO-3); returns once every process can sample from them.

        Args:
            model (`nn.Module`): the student as the trainer holds it (wrapped or not).
            accelerator (`accelerate.Accelerator`): the run's accelerator (unwrap, state dict, barrier).
            step (`int`): the optimizer step the weights belong to (0 before training).
        """
        t0 = time.perf_counter()
        unwrapped = accelerator.unwrap_model(model)
        kind = "lora" if is_peft_model(unwrapped) else "full"
        if self.kind is None:
            self.kind = kind
            logger.info(
                "On-policy samples from the vLLM server at %s: %s student, weights pushed every %d optimizer step(s) "
                "(%s).",
                self.url,
                "LoRA" if kind == "lora" else "full-parameter",
                self.sync_steps,
                "runtime LoRA adapters" if kind == "lora" else "in-place reload from disk",
            )
        if self._run_id is None:  # one adapter prefix for all processes, new for each run (a server outlives runs)
            self._run_id = broadcast_object_list([f"hf-distill-{uuid.uuid4().hex[:8]}"])[0]
        sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        state_dict = accelerator.get_state_dict(model) if sharded else None  # a collective: every process
        name = f"{self._run_id}-step{step}" if kind == "lora" else None
        self._main = accelerator.is_main_process
        if self._main:
            folder = self.sync_dir / f"step-{step}"
            if folder.exists():
                shutil.rmtree(folder)
            unwrapped.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
            if kind == "lora":
                self._retry_load(lambda: self.client.load_lora_adapter(name, str(folder.resolve())), folder, LORA_HINT)
                if self.model_name is not None:  # the previous adapter; nothing samples from it any more
                    self._unload(self.model_name)
            else:
                self._retry_load(lambda: self.client.reload_weights(str(folder.resolve())), folder, FULL_HINT)
            if self._folder is not None and self._folder != folder:
                shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = folder
        accelerator.wait_for_everyone()  # every process sees the new weights before it samples
        self.model_name = name if kind == "lora" else self.client.model_name()
        self.synced_step = step
        self.sync_seconds.append(time.perf_counter() - t0)

    def _retry_load(self, load: Any, folder: Path, hint: str) -> None:
        """Run `load` (an adapter load or a weight reload); a refusal (4xx, e.g. the folder not visible yet) is
        retried `load_retries` times (5xx, timeouts and a server that is down are retried by the client), a route
        the server lacks (404) is an error at once; errors name the server, the folder and `hint`."""
        delay = self.retry_delay
        for attempt in range(self.load_retries + 1):
            try:
                return load()
            except VLLMRequestError as err:
                if err.status == 404:
                    raise VLLMClientError(
                        f"The vLLM server at {self.url} has no route for this ({err}): {hint}."
                    ) from err
                if attempt == self.load_retries:
                    raise VLLMClientError(
                        f"The vLLM server at {self.url} refused to load the student's weights from {folder} "
                        f"{attempt + 1} times; its last answer: HTTP {err.status}: {err.body[:500]}. Check that the "
                        f"server can read that folder (`vllm_sync_dir`) and serves the student's base model; {hint}."
                    ) from err
                logger.warning("vLLM at %s refused to load %s (HTTP %d: %s); retry %d/%d in %.1f s", self.url,
                               folder, err.status, err.body[:200], attempt + 1, self.load_retries, delay)  # fmt: skip
                time.sleep(delay)
                delay *= 2
            except VLLMClientError as err:  # down, 5xx, timeouts: already retried by the client
                raise VLLMClientError(
                    f"The vLLM server at {self.url} could not load the student's weights from {folder}: {err}. If "
                    f"the server is up, check that it serves the student's base model; {hint}."
                ) from err

    def _unload(self, name: str) -> None:
        try:
            self.client.unload_lora_adapter(name)
        except VLLMRequestError as err:  # already gone (a restarted server): nothing to free
            logger.warning("vLLM at %s could not unload adapter %s: HTTP %d", self.url, name, err.status)

    # ------------------------------------------------------------------------------------------------ sampling
    def sample(self, prompts: list[list[int]]) -> list[list[int]]:
        """One completion per prompt from the weights last synced.

        Args:
            prompts (`list[list[int]]`): B prompts (token ids, no padding).

        Returns:
            `list[list[int]]`: B completions, each ending with its first EOS (kept) or `max_new_tokens` long.
        """
        if self.model_name is None:
            raise RuntimeError("VLLMStudentSampler.sample before the first sync: nothing is served yet.")
        t0 = time.perf_counter()
        replies = self.client.complete(
            prompts,
            max_tokens=self.max_new_tokens,
            temperature=self.temperature,
            model=self.model_name,
            stop_token_ids=self.eos_token_ids,
            top_p=1.0,
            top_k=-1,
            ignore_eos=True,  # end at our EOS ids only, as `generate` with the tokenizer's eos_token_id
            sampling=NEUTRAL_SAMPLING,
        )
        eos, out = set(self.eos_token_ids), []
        for i, ids in enumerate(replies):
            ids = cut_at_eos(ids, eos)
            if len(ids) < self.max_new_tokens and ids[-1] not in eos:
                raise VLLMReplyError(
                    f"POST {self.url}/v1/completions: completion {i} stopped after {len(ids)} of "
                    f"{self.max_new_tokens} tokens without EOS (an aborted request, or prompt + max_new_tokens "
                    "longer than the server's `--max-model-len`); a partial completion is never trained on."
                )
            out.append(ids)
        self.sample_seconds.append(time.perf_counter() - t0)
        return out

    def submit(self, prompts: list[list[int]]) -> "Future[list[list[int]]]":
        """`sample(prompts)` in the sampler's background thread (one request at a time); the future's result is
        the completions, or raises the request's error."""
        if self._pool is None:  # started on first use (and again after `close`)
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-distill-vllm-sample")
        return self._pool.submit(self.sample, prompts)

    def close(self) -> None:
        """Wait for the background request, unload the last adapter from the server (the main process's job; errors
        are logged, the server may be gone) and forget what is served: a later `sync` pushes the weights again."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._main and self.kind == "lora" and self.model_name is not None:
            try:
                self.client.unload_lora_adapter(self.model_name)
            except VLLMClientError as err:
                logger.warning("Could not unload %s from %s: %s", self.model_name, self.url, err)
        self.model_name, self.synced_step = None, None
