"""API teachers against a real OpenAI-compatible server: `transformers serve` on 127.0.0.1 (a free port), serving a
tiny seeded Llama saved to a temporary folder by the fixture; the server is always stopped afterwards."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch


pytest.importorskip("openai", reason="API teachers need the `openai` client (extra `api`)")
pytest.importorskip("fastapi", reason="the loopback server is `transformers serve` (transformers[serving])")
pytest.importorskip("uvicorn", reason="the loopback server is `transformers serve` (transformers[serving])")
from conftest import CHAT_TEMPLATE, REPO, WORDS, make_llama
from datasets import Dataset
from openai_stub import ScriptedServer
from openai_stub import reply as _reply
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from vllm_server import free_port

from hf_distill.data.rationale_templates import ESNLI_TEMPLATE, SVAMP_TEMPLATE
from hf_distill.data.rationales import generate_rationales
from hf_distill.generation.api import APITeacher, APITeacherError


SECRET = "sk-test-0123456789-never-print-me"
PROMPTS = ["the cat sat on the mat", "a dog ran fast", "one plus two equals", "is the big red cat slow"]
SERVE = [sys.executable, "-c", "from transformers.cli.transformers import main; main()", "serve"]


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
        self.port = free_port()
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
                raise RuntimeError(f"transformers serve did not start; log: {Path(self.log_path).read_text()[-2000:]}")
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


def _byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE (400 tokens) trained offline on the shipped few-shot prompts: it can spell the
    templates' newline stop strings, which the server's stop-string matcher needs (the word-level test tokenizer
    cannot)."""
    corpus = [
        SVAMP_TEMPLATE.prompt({"question": "the cat", "answer": 1}),
        ESNLI_TEMPLATE.prompt({"premise": "a cat", "hypothesis": "a dog", "label": 0}),
        " ".join(WORDS),
    ]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    special = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=special,
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny_teacher"))
    tok = _byte_level_tokenizer()
    model = make_llama(2, 32, seed=1, vocab_size=len(tok))
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


def _svamp_rows(count: int) -> Dataset:
    words = ["one", "two", "three", "four", "five", "six"]
    return Dataset.from_list(
        [
            {"id": f"r{i}", "question": f"the cat ran {words[i % 6]} plus {words[(i // 6) % 6]} is", "answer": i % 5}
            for i in range(count)
        ]
    )


def _lines(path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut short by the kill
    return records


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_rationales_from_api_equal_local_greedy(server, tiny_folder, tmp_path, endpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = _svamp_rows(5)
    api = APITeacher(server.base, tiny_folder, endpoint=endpoint, max_concurrency=3)
    got = generate_rationales(
        api,
        None,
        rows,
        template="svamp",
        output_dir=str(tmp_path / "api"),
        max_new_tokens=10,
        filter_mismatch=False,
        show_progress=False,
    )
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_folder), AutoTokenizer.from_pretrained(tiny_folder)
    local = generate_rationales(
        model,
        tok,
        rows,
        template="svamp",
        output_dir=str(tmp_path / "local"),
        max_new_tokens=10,
        batch_size=1,
        filter_mismatch=False,
        use_chat_template=endpoint == "chat",
        show_progress=False,
    )
    assert len(local) > 0
    assert got["id"] == local["id"] and got["rationale"] == local["rationale"]
    runs = json.loads((tmp_path / "api" / "api_responses.runs.json").read_text())
    assert runs[-1]["requests"] == 5 and runs[-1]["completion_tokens"] > 0 and runs[-1]["wall_seconds"] > 0


def test_transfer_set_from_api_equals_local_greedy(server, tiny_folder, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_distill.data.transfer_set import build_transfer_set

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_folder), AutoTokenizer.from_pretrained(tiny_folder)
    prompts = PROMPTS + ["the dog sat", "a big blue mat"]
    kwargs = dict(num_samples=6, max_new_tokens=8, temperature=0.0, prompts=prompts, held_out_fraction=0.2)
    api = build_transfer_set(APITeacher(server.base, tiny_folder), tok, cache_dir=str(tmp_path / "a"), **kwargs)
    local = build_transfer_set(model, tok, batch_size=1, cache_dir=str(tmp_path / "l"), **kwargs)
    for split in ("train", "test"):
        assert api[split]["prompt"] == local[split]["prompt"]
        assert api[split]["completion"] == local[split]["completion"]
    assert len(api["train"]) > 0


def test_unknown_model_gives_clear_error(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DISTILL_API_KEY", SECRET)
    teacher = APITeacher(server.base, "no-such/model", endpoint="chat")
    with pytest.raises(APITeacherError, match="HTTP 400") as info:
        teacher.generate(PROMPTS[:2], str(tmp_path / "r.jsonl"), max_new_tokens=4, show_progress=False)
    message = str(info.value)
    assert f"{server.base}/chat/completions" in message and "'no-such/model'" in message
    assert "--teacher_api_model" in message and SECRET not in message
    assert _lines(tmp_path / "r.jsonl") == []


def test_key_is_sent_but_never_logged_or_written(server, tiny_folder, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_DISTILL_API_KEY", SECRET)
    assert APITeacher(server.base, tiny_folder)._client().api_key == SECRET  # the key is really used
    data = tmp_path / "rows.jsonl"
    _svamp_rows(4).to_json(str(data))
    out = tmp_path / "out"
    env = {**os.environ, "HF_DISTILL_API_KEY": SECRET, "OPENAI_LOG": "debug", "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "hf_distill.cli.main", "rationales", "generate", "--dataset", str(data)]
    base += ["--template", "svamp", "--max_new_tokens", "6", "--no_filter", "--teacher_api_base", server.base]
    ok = subprocess.run(
        [*base, "--teacher_api_model", tiny_folder, "--output_dir", str(out)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    bad = subprocess.run(
        [*base, "--teacher_api_model", "nope", "--output_dir", str(tmp_path / "bad")],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert bad.returncode != 0 and "HTTP 400" in bad.stderr
    with caplog.at_level(logging.DEBUG):
        APITeacher(server.base, tiny_folder).generate(PROMPTS, str(tmp_path / "log.jsonl"), max_new_tokens=4)
    assert "Request options" in ok.stderr + ok.stdout or "HTTP Request" in ok.stderr + ok.stdout  # debug logs on
    written = [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) >= 5
    for text in (ok.stdout, ok.stderr, bad.stdout, bad.stderr, caplog.text):
        assert SECRET not in text
    assert all(SECRET.encode() not in blob for blob in written)


def test_kill_and_resume_no_lost_or_duplicated_rows(server, tiny_folder, tmp_path):
    count = 60
    data = tmp_path / "rows.jsonl"
    _svamp_rows(count).to_json(str(data))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "hf_distill.cli.main", "rationales", "generate", "--dataset", str(data)]
    cmd += ["--template", "svamp", "--max_new_tokens", "8", "--no_filter", "--output_dir", str(out)]
    cmd += ["--teacher_api_base", server.base, "--teacher_api_model", tiny_folder, "--max_concurrency", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = out / "api_responses.jsonl"
    deadline = time.time() + 120
    while not (store.exists() and len(_lines(store)) >= 10) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    before = _lines(store)
    assert 10 <= len(before) < count, "the run must be killed part-way"
    assert not (out / "dataset").exists()
    done = subprocess.run(cmd, check=False, env=env, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    after = _lines(store)
    units = [(r["index"], r["sample"]) for r in after]
    assert sorted(units) == [(i, 0) for i in range(count)]  # every row exactly once
    assert after[: len(before)] == before  # the first run's responses are kept as they were
    runs = json.loads((out / "api_responses.runs.json").read_text())  # the killed run never finished: one entry
    assert runs[-1]["reused"] == len(before) and runs[-1]["requests"] == count - len(before)
    from datasets import load_from_disk

    resumed = load_from_disk(str(out / "dataset"))
    by_index = {r["index"]: r for r in after}
    kept = [f"r{i}" for i in range(count) if SVAMP_TEMPLATE.parse(by_index[i]["text"])[0]]
    assert resumed["id"] == kept and len(kept) > 0  # each row once, in order (empty rationales dropped)


def test_server_stopped_mid_run_retries_then_errors_and_keeps_rows(tiny_folder, tmp_path, caplog):
    import threading

    srv = Server(tiny_folder, str(tmp_path / "serve.log")).start()
    store = tmp_path / "r.jsonl"
    prompts = [f"{w} the cat sat" for w in WORDS] * 2
    teacher = APITeacher(srv.base, tiny_folder, max_concurrency=2, max_retries=2, timeout=10)

    def stop_when_started():
        while not (store.exists() and len(_lines(store)) >= 8):
            time.sleep(0.01)
        srv.stop()

    watcher = threading.Thread(target=stop_when_started, daemon=True)
    watcher.start()
    try:
        with caplog.at_level(logging.INFO, logger="openai"), pytest.raises(APITeacherError) as info:
            teacher.generate(prompts, str(store), max_new_tokens=16, show_progress=False)
    finally:
        srv.stop()
    message = str(info.value)
    assert srv.base in message and "after 2 retries" in message and "run the same command again" in message
    assert len([r for r in caplog.records if "Retrying request" in r.getMessage()]) >= 2
    kept = _lines(store)
    assert 8 <= len(kept) < len(prompts)
    assert len({(r["index"], r["sample"]) for r in kept}) == len(kept)
    # a restarted server (another port) finishes the job: only the missing responses are requested
    srv = Server(tiny_folder, str(tmp_path / "serve.log")).start()
    try:
        teacher = APITeacher(srv.base, tiny_folder, max_concurrency=2)
        _, stats = teacher.generate(prompts, str(store), max_new_tokens=16, show_progress=False)
    finally:
        srv.stop()
    assert stats["reused"] == len(kept) and stats["requests"] == len(prompts) - len(kept)
    assert sorted((r["index"], r["sample"]) for r in _lines(store)) == [(i, 0) for i in range(len(prompts))]


def test_n_samples_and_settings_check(server, tiny_folder, tmp_path):
    teacher = APITeacher(server.base, tiny_folder, max_concurrency=3)
    store = str(tmp_path / "r.jsonl")
    results, stats = teacher.generate(
        PROMPTS[:2], store, n=3, temperature=1.0, max_new_tokens=6, seed=5, show_progress=False
    )
    assert [len(r) for r in results] == [3, 3] and stats["requests"] == 6
    again, stats = teacher.generate(
        PROMPTS[:2], store, n=3, temperature=1.0, max_new_tokens=6, seed=5, show_progress=False
    )
    assert stats["requests"] == 0 and again == results
    with pytest.raises(ValueError, match="API-teacher responses made with other settings"):
        teacher.generate(PROMPTS[:2], store, n=2, temperature=1.0, max_new_tokens=6, seed=5, show_progress=False)
    with pytest.raises(ValueError, match="answers another prompt"):
        teacher.generate(PROMPTS[1:3], store, n=3, temperature=1.0, max_new_tokens=6, seed=5, show_progress=False)


def test_cache_teacher_generate_with_api_teacher(server, tiny_folder, tmp_path):
    data = tmp_path / "prompts.jsonl"
    Dataset.from_dict({"prompt": PROMPTS, "completion": ["x"] * len(PROMPTS)}).to_json(str(data))
    out = tmp_path / "seqkd"
    cmd = [sys.executable, "-m", "hf_distill.cli.main", "cache-teacher", "--teacher", tiny_folder]
    cmd += ["--dataset", str(data), "--output_dir", str(out), "--teacher_api_base", server.base]
    cmd += ["--max_new_tokens", "8"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    refused = subprocess.run(cmd, check=False, env=env, cwd=REPO, capture_output=True, text=True)
    assert refused.returncode != 0 and "Add --generate" in refused.stderr
    done = subprocess.run([*cmd, "--generate"], check=False, env=env, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    from datasets import load_from_disk

    rows = load_from_disk(str(out / "train_dataset"))
    expected = _local_greedy(tiny_folder, PROMPTS, chat=True, max_new_tokens=8)
    assert rows["prompt"] == PROMPTS
    assert [c.strip() for c in rows["completion"]] == [e.strip() for e in expected]


def test_bad_settings_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="http"):
        APITeacher("127.0.0.1:8000/v1", "m")
    with pytest.raises(ValueError, match="teacher_api_endpoint"):
        APITeacher("http://127.0.0.1:1/v1", "m", endpoint="responses")
    with pytest.raises(ValueError, match="max_concurrency"):
        APITeacher("http://127.0.0.1:1/v1", "m", max_concurrency=0)
    monkeypatch.delenv("MY_KEY", raising=False)
    with pytest.raises(ValueError, match="MY_KEY"):
        APITeacher("http://127.0.0.1:1/v1", "m", api_key_env="MY_KEY")
    with pytest.raises(ValueError, match="teacher_api_model"):
        APITeacher("http://127.0.0.1:1/v1", "")


class _Stub:
    """A scripted OpenAI-compatible stub (tests/openai_stub.py): answers the scripted statuses in turn, then 200; a
    401 body echoes the bearer key, as some providers do. A scripted `(200, body)` answers 200 with that body (bytes
    as they are, anything else as JSON): the bad replies of a broken server or proxy."""

    def __init__(self, statuses: list, delay: float = 0.0):
        self.statuses, self.calls, self.delay = list(statuses), 0, delay
        self.server = ScriptedServer(self._answer)
        self.base = f"{self.server.root}/v1"

    def _answer(self, path: str, body: bytes, headers: dict):
        self.calls += 1
        time.sleep(self.delay)
        status = self.statuses.pop(0) if self.statuses else 200
        status, data = status if isinstance(status, tuple) else (status, None)
        if data is None and status == 200:
            data = _reply("ok", completions=path.endswith("/v1/completions"))
        elif data is None:
            data = {"error": {"message": f"Incorrect API key provided: {headers.get('authorization')}"}}
        return status, data, {}

    def close(self):
        self.server.close()


@pytest.mark.parametrize("statuses", [[429, 503], [500, 502, 504]])
def test_retries_on_429_and_5xx_then_succeeds(tmp_path, statuses):
    stub = _Stub(statuses)
    try:
        results, stats = APITeacher(stub.base, "m", max_retries=3).generate(
            ["hi"], str(tmp_path / "r.jsonl"), show_progress=False
        )
    finally:
        stub.close()
    assert stub.calls == len(statuses) + 1 and results[0][0]["text"] == "ok" and stats["completion_tokens"] == 1


def test_4xx_is_not_retried_and_never_shows_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DISTILL_API_KEY", SECRET)
    stub = _Stub([401])
    try:
        with pytest.raises(APITeacherError, match="HTTP 401") as info:
            APITeacher(stub.base, "m", max_retries=3).generate(["hi"], str(tmp_path / "r.jsonl"), show_progress=False)
    finally:
        stub.close()
    assert stub.calls == 1 and stub.base in str(info.value) and "API key" in str(info.value)
    assert SECRET not in str(info.value) and "***" in str(info.value)  # the echoed key is scrubbed


def test_timeout_per_request_is_retried_then_reported(tmp_path):
    stub = _Stub([], delay=1.5)
    try:
        with pytest.raises(APITeacherError, match="timed out") as info:
            APITeacher(stub.base, "m", max_retries=1, timeout=0.3).generate(
                ["hi"], str(tmp_path / "r.jsonl"), show_progress=False
            )
    finally:
        stub.close()
    assert stub.calls == 2 and "after 1 retries" in str(info.value)


def _bad_replies(completions: bool = False) -> dict:
    """200 replies a broken server or proxy sends: name -> (body, what the error says)."""
    cut = json.dumps(_reply("ok", completions)).encode()
    return {
        "html": (b"<html><body><h1>502 Bad Gateway</h1></body></html>", "not JSON"),
        "cut-json": (cut[: len(cut) // 2], "not JSON"),
        "no-choices": ({**_reply("ok", completions), "choices": []}, "no choices"),
        "null": (_reply(None, completions), "null"),
        "empty": (_reply("", completions, finish_reason="length"), "empty"),
    }


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("bad", list(_bad_replies()))
def test_unusable_200_replies_are_retried_like_a_5xx(tmp_path, bad, endpoint):
    body, _ = _bad_replies(endpoint == "completions")[bad]
    stub = _Stub([(200, body), (200, body)])
    store = tmp_path / "r.jsonl"
    try:
        results, stats = APITeacher(stub.base, "m", endpoint=endpoint, max_retries=2).generate(
            ["hi"], str(store), show_progress=False
        )
    finally:
        stub.close()
    assert stub.calls == 3 and results[0][0]["text"] == "ok" and stats["requests"] == 1
    assert [r["text"] for r in _lines(store)] == ["ok"]  # only the usable reply is stored


@pytest.mark.parametrize("bad", list(_bad_replies()))
def test_unusable_200_replies_fail_naming_the_endpoint_and_the_problem(tmp_path, bad, caplog):
    body, problem = _bad_replies()[bad]
    stub = _Stub([(200, body)] * 2)
    store = tmp_path / "r.jsonl"
    try:
        with caplog.at_level(logging.INFO, logger="openai"), pytest.raises(APITeacherError) as info:
            APITeacher(stub.base, "m", max_retries=1).generate(["hi"], str(store), show_progress=False)
    finally:
        stub.close()
    message = str(info.value)
    assert stub.calls == 2 and f"{stub.base}/chat/completions" in message and problem in message
    assert "unusable reply" in message and "after 1 retries" in message
    assert len([r for r in caplog.records if "Retrying request" in r.getMessage()]) == 1  # the 5xx backoff
    assert _lines(store) == []  # nothing unusable is stored


def test_an_empty_answer_the_model_stopped_on_is_kept(tmp_path):
    stub = _Stub([(200, _reply("", finish_reason="stop"))])
    store = tmp_path / "r.jsonl"
    try:
        teacher = APITeacher(stub.base, "m", max_retries=0, max_concurrency=1)  # "a" gets the scripted reply
        results, _ = teacher.generate(["a", "b"], str(store), show_progress=False)
        again, stats = teacher.generate(["a", "b"], str(store), show_progress=False)
    finally:
        stub.close()
    assert [r[0]["text"] for r in results] == ["", "ok"] and stub.calls == 2
    assert stats["requests"] == 0 and again == results  # a real (empty) answer: not requested again


def test_empty_replies_stored_by_older_versions_are_requested_again(tmp_path, caplog):
    stub = _Stub([])
    store = tmp_path / "r.jsonl"
    prompts = ["a", "b", "c", "d"]
    try:
        teacher = APITeacher(stub.base, "m")
        teacher.generate(prompts, str(store), show_progress=False)
        records = _lines(store)
        for record in records[1:3]:  # what an older version stored for a `content: null` reply
            record["text"] = ""
        store.write_text("".join(json.dumps(r) + "\n" for r in records))
        with caplog.at_level(logging.INFO, logger="hf_distill.generation.api"):
            results, stats = teacher.generate(prompts, str(store), show_progress=False)
    finally:
        stub.close()
    assert stats["reused"] == 2 and stats["requests"] == 2 and stub.calls == 6
    assert [r[0]["text"] for r in results] == ["ok"] * 4
    assert "2 of the 4 responses in" in caplog.text and "empty" in caplog.text
    assert sorted((r["index"], r["text"]) for r in _lines(store) if r["text"]) == [(i, "ok") for i in range(4)]


@pytest.mark.parametrize(
    "module", ["hf_distill.cli.rationales:generate", "hf_distill.cli.quickstart", "hf_distill.cli.cache_teacher"]
)
def test_cli_flags_in_help(module, capsys):
    import importlib

    name, _, sub = module.partition(":")
    argv = [sub, "--help"] if sub else ["--help"]
    with pytest.raises(SystemExit):
        importlib.import_module(name).run(argv)
    text = capsys.readouterr().out
    for flag in ("--teacher_api_base", "--teacher_api_model", "--teacher_api_endpoint", "--max_concurrency"):
        assert flag in text


def test_store_with_a_cut_line_resumes_cleanly(tmp_path):
    stub = _Stub([])
    store = tmp_path / "r.jsonl"
    try:
        teacher = APITeacher(stub.base, "m")
        teacher.generate(["a", "b", "c"], str(store), show_progress=False)
        lines = store.read_text().splitlines()
        store.write_text(lines[0] + "\n" + lines[1][:25])  # killed while writing the second response
        results, stats = teacher.generate(["a", "b", "c"], str(store), show_progress=False)
    finally:
        stub.close()
    assert stats["reused"] == 1 and stats["requests"] == 2 and stub.calls == 5
    assert sorted(r["index"] for r in _lines(store)) == [0, 1, 2] and len(results) == 3


def test_quickstart_samples_the_transfer_set_from_the_api_teacher(server, tiny_folder, tmp_path):
    from hf_distill.cli.main import main

    out = tmp_path / "qs"
    main(
        ["quickstart", "--teacher", tiny_folder, "--output_dir", str(out), "--num_layers", "1", "--num_samples", "8"]
        + ["--max_new_tokens", "6", "--steps", "1", "--batch_size", "4", "--teacher_api_base", server.base]
    )
    stores = list((out / "transfer_set").rglob("api_responses.jsonl"))
    assert len(stores) == 1 and len(_lines(stores[0])) == 8  # every sample came from the server
    assert json.loads((out / "results.json").read_text())["results"]["kd_student"]["tokens"] > 0


@pytest.mark.parametrize("debug", [False, True], ids=["default", "debug"])
def test_cache_teacher_logs_requests_at_debug_and_its_summary_at_info(tmp_path, debug):
    """`cache-teacher` with a served teacher: the HTTP client's per-request lines only with `--debug` (as DEBUG),
    the usage summary at INFO, no torchao noise."""
    stub = _Stub([])
    data = tmp_path / "prompts.jsonl"
    Dataset.from_dict({"prompt": ["a", "b", "c"]}).to_json(str(data))
    cmd = [sys.executable, "-m", "hf_distill.cli.main", "cache-teacher", "--teacher", "m", "--dataset", str(data)]
    cmd += ["--output_dir", str(tmp_path / "out"), "--teacher_api_base", stub.base, "--generate"]
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_LOG"} | {"PYTHONPATH": str(REPO)}
    try:
        done = subprocess.run(
            cmd + ["--debug"] * debug, check=False, env=env, cwd=REPO, capture_output=True, text=True
        )
    finally:
        stub.close()
    assert done.returncode == 0, done.stderr[-3000:]
    requests = [line for line in done.stderr.splitlines() if "HTTP Request: POST" in line]
    assert len(requests) == (3 if debug else 0) and all(" DEBUG " in line for line in requests)
    assert " INFO hf_distill.generation.api: API teacher m: 3 requests" in done.stderr
    assert "Failed to load" not in done.stderr and "register_constant" not in done.stderr


class _FinishedTeacher:
    """A stand-in for `APITeacher.generate`: one completion per prompt with a scripted `finish_reason`."""

    def __init__(self, finish_reasons: list[str]):
        self.finish_reasons = finish_reasons

    def generate(self, prompts, store, **kwargs):
        results = [[{"text": f" answer {i}", "finish_reason": r}] for i, r in enumerate(self.finish_reasons)]
        return results, {"requests": len(prompts)}


def test_truncated_completions_are_warned_about_or_dropped(tmp_path, caplog):
    """Completions cut at max_new_tokens would get an EOS from SFT: counted in a warning, or dropped on request."""
    from hf_distill.generation.seq_kd import generate_completions_dataset

    data = Dataset.from_dict({"prompt": ["p0", "p1", "p2"], "id": [0, 1, 2]})
    teacher = _FinishedTeacher(["stop", "length", "stop"])
    with caplog.at_level(logging.WARNING, logger="hf_distill.generation.seq_kd"):
        kept = generate_completions_dataset(teacher, data, str(tmp_path / "a"), max_new_tokens=4, show_progress=False)
    assert kept["id"] == [0, 1, 2] and kept["completion"][1] == " answer 1"
    assert "1 of 3 teacher completions stopped at max_new_tokens=4" in caplog.text and "drop_truncated" in caplog.text
    dropped = generate_completions_dataset(
        teacher, data, str(tmp_path / "b"), max_new_tokens=4, show_progress=False, drop_truncated=True
    )
    assert dropped["id"] == [0, 2] and dropped["completion"] == [" answer 0", " answer 2"]
    from datasets import load_from_disk

    assert load_from_disk(str(tmp_path / "b" / "train_dataset"))["id"] == [0, 2]  # what training reads
    with pytest.raises(ValueError, match="leaves no row: raise max_new_tokens"):
        generate_completions_dataset(
            _FinishedTeacher(["length"] * 3), data, str(tmp_path / "c"), show_progress=False, drop_truncated=True
        )


def test_drop_truncated_needs_a_served_teacher_generating(tmp_path):
    from hf_distill.cli.cache_teacher import run

    Dataset.from_dict({"prompt": PROMPTS, "completion": ["x"] * len(PROMPTS)}).to_json(str(tmp_path / "x.jsonl"))
    with pytest.raises(ValueError, match="--drop_truncated applies to a served teacher"):
        run(["--teacher", "smollm2", "--dataset", str(tmp_path / "x.jsonl"), "--output_dir", str(tmp_path / "o"),
             "--generate", "--drop_truncated", "true"])  # fmt: skip
