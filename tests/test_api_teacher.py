"""API teachers against a real OpenAI-compatible server: `transformers serve` on 127.0.0.1 (a free port), serving a
tiny seeded Llama saved to a temporary folder by the fixture; the server is always stopped afterwards."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from conftest import REPO, make_llama, make_tokenizer
from datasets import Dataset

from hf_distill.rationales import RationaleTemplate, generate_rationales
from hf_distill.teachers.api import APITeacher, APITeacherError, generate_completions_dataset


SECRET = "sk-test-0123456789-never-print-me"
PROMPTS = ["the cat sat on the mat", "a dog ran fast", "one plus two equals", "is the big red cat slow"]
SERVE = [sys.executable, "-c", "from transformers.cli.transformers import main; main()", "serve"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(base.removesuffix("/v1") + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


class Server:
    """`transformers serve <folder>` on 127.0.0.1:<free port>, in its own process group."""

    def __init__(self, folder: str, log_path: str):
        self.folder, self.log_path, self.proc = folder, log_path, None

    def start(self, timeout: float = 180.0) -> "Server":
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}/v1"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env.pop("HF_DISTILL_API_KEY", None)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*SERVE, "--host", "127.0.0.1", "--port", str(self.port), "--format", "quiet", self.folder],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.time() + timeout
        while not _healthy(self.base):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"transformers serve did not start; log: {open(self.log_path).read()[-2000:]}")
            time.sleep(0.5)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny_teacher"))
    model, tok = make_llama(2, 32, seed=1), make_tokenizer()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 3, 0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(tiny_folder, tmp_path_factory):
    srv = Server(tiny_folder, str(tmp_path_factory.mktemp("serve") / "serve.log")).start()
    yield srv
    srv.stop()


def _local_greedy(folder: str, prompts: list, chat: bool, max_new_tokens: int) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    texts = []
    for prompt in prompts:
        if chat:
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        else:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        texts.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return texts


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_greedy_api_generations_equal_local_greedy(server, tiny_folder, tmp_path, endpoint):
    teacher = APITeacher(server.base, tiny_folder, endpoint=endpoint, max_concurrency=2)
    results, stats = teacher.generate(PROMPTS, str(tmp_path / "r.jsonl"), max_new_tokens=12, show_progress=False)
    local = _local_greedy(tiny_folder, PROMPTS, endpoint == "chat", 12)
    assert [r[0]["text"].strip() for r in results] == [t.strip() for t in local]
    assert any(t.strip() for t in local)  # not a vacuous match of empty strings
    assert stats["requests"] == len(PROMPTS) and stats["reused"] == 0
    assert stats["completion_tokens"] > 0 and stats["prompt_tokens"] > 0
