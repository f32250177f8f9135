"""`hf_distill.generation.vllm.VLLMClient`: against a real vLLM server of a tiny Llama (fixtures `vllm_server`,
`vllm_lora_server`, marked `vllm`: log-probs equal HF fp32, greedy and LoRA completions equal HF / PEFT `generate`),
and against a scripted stdlib HTTP server on 127.0.0.1 for the faults a real server does not give on demand (429, 5xx,
404, malformed replies, refused connections, timeouts)."""

import http.server
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from vllm_server import HOST, free_port

from hf_distill.generation.vllm import VLLMClient, VLLMClientError, VLLMReplyError, VLLMRequestError


V = 64  # the tiny Llama's vocabulary (= the tokenizer's 64 tokens)


def hf_logprobs(folder, prompts: list[list[int]]) -> list[torch.Tensor]:
    """HF fp32 log-probs of the saved model at positions 1..n-1 of each prompt, shape `(n - 1, V)` each."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0, :-1].log_softmax(-1) for p in prompts]


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """HF greedy `generate` from equal-length prompts: the new ids of each row up to and including its first EOS (as
    vLLM returns them)."""
    ids = torch.tensor(prompts)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=0)[:, ids.shape[1] :].tolist()  # fmt: skip
    eos = model.config.eos_token_id
    return [row[: row.index(eos) + 1] if eos in row else row for row in out]


def random_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


# ---------------------------------------------------------------------------------------------- real vLLM server


@pytest.mark.vllm
def test_full_vocab_prompt_logprobs_equal_hf_fp32(vllm_server):
    prompts = random_prompts([128, 40, 7, 2])
    client = VLLMClient(vllm_server.url, vocab_size=V)
    out = client.prompt_logprobs(prompts, k=V)
    for got, ref, prompt in zip(out, hf_logprobs(vllm_server.folder, prompts), prompts):
        n = len(prompt)
        assert got.top_ids.shape == got.top_logprobs.shape == (n - 1, V) and got.token_logprobs.shape == (n - 1,)
        assert torch.equal(got.top_ids.sort(-1).values, torch.arange(V).expand(n - 1, V))  # the whole vocabulary
        assert (got.top_logprobs - ref.gather(-1, got.top_ids)).abs().max() < 1e-4
        assert (got.top_logprobs.diff(dim=-1) <= 0).all()
        actual = torch.tensor(prompt[1:])
        assert (got.token_logprobs - ref.gather(-1, actual[:, None])[:, 0]).abs().max() < 1e-4
        assert torch.equal(got.top_ids.eq(actual[:, None]).float().argmax(-1) + 1, got.token_ranks)


@pytest.mark.vllm
def test_top_k_prompt_logprobs_and_the_actual_token_outside_it(vllm_server):
    prompts = random_prompts([30, 1, 12], seed=1)
    client = VLLMClient(vllm_server.url + "/v1", vocab_size=V)  # a trailing /v1 is accepted
    out = client.prompt_logprobs(prompts, k=5)
    assert out[1].top_ids.shape == (0, 5) and out[1].token_logprobs.shape == (0,)  # one token: no position
    for got, ref, prompt in zip(out[::2], hf_logprobs(vllm_server.folder, prompts[::2]), prompts[::2]):
        top = ref.topk(5, dim=-1)
        assert torch.equal(got.top_ids, top.indices)
        assert (got.top_logprobs - top.values).abs().max() < 1e-4
        actual = torch.tensor(prompt[1:], dtype=torch.long)
        assert (got.token_logprobs - ref.gather(-1, actual[:, None])[:, 0]).abs().max() < 1e-4
        assert torch.equal(got.token_ranks, (ref >= ref.gather(-1, actual[:, None])).sum(-1))
    assert any((o.token_ranks > 5).any() for o in out)  # the reply carried k + 1 entries somewhere
    assert client.prompt_logprobs(prompts[:1], k=0)[0].top_ids.shape == (29, 0)  # only the actual token's


@pytest.mark.vllm
def test_tokenize_models_and_server_errors(vllm_server):
    client = VLLMClient(vllm_server.url)
    assert client.models() == {vllm_server.model: 512}
    text = "the cat sat on the mat because it is big"
    assert client.tokenize(text) == vllm_server.tokenizer(text)["input_ids"]
    with pytest.raises(VLLMRequestError, match="greater than max allowed: 64") as err:
        client.prompt_logprobs([[1, 2, 3]], k=65)  # above --max-logprobs: a 400, not retried
    assert err.value.status == 400 and vllm_server.url in str(err.value)
    with pytest.raises(VLLMRequestError, match="does not exist"):
        client.complete([[1, 2]], max_tokens=2, model="no-such-model")


@pytest.mark.vllm
def test_greedy_completions_equal_hf_generate(vllm_server):
    prompts = random_prompts([6, 6, 6], seed=2)
    got = VLLMClient(vllm_server.url, vocab_size=V).complete(prompts, max_tokens=12, temperature=0.0)
    model = AutoModelForCausalLM.from_pretrained(vllm_server.folder, dtype=torch.float32).eval()
    assert got == hf_greedy(model, prompts, 12)


def peft_adapter(folder, seed: int, out):
    """A PEFT LoRA (r=8, every projection, random non-zero A and B) on the saved model, saved to `out`."""
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(seed)
    peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    peft.save_pretrained(out)
    return peft


@pytest.mark.vllm
def test_runtime_lora_completions_equal_peft_generate(vllm_lora_server, tmp_path):
    peft = peft_adapter(vllm_lora_server.folder, 0, tmp_path / "adapter")
    prompts = random_prompts([5, 5], seed=3)
    client = VLLMClient(vllm_lora_server.url, model=vllm_lora_server.model, vocab_size=V)
    client.load_lora_adapter("student", str(tmp_path / "adapter"))
    assert set(client.models()) == {vllm_lora_server.model, "student"}
    got = client.complete(prompts, max_tokens=16, model="student")
    ref = hf_greedy(peft, prompts, 16)
    with peft.disable_adapter():
        plain = hf_greedy(peft, prompts, 16)
    assert got == ref != plain  # the adapter is applied, and as PEFT applies it
    assert client.complete(prompts, max_tokens=16) == plain  # the base model is intact
    with pytest.raises(VLLMRequestError, match="already been loaded"):
        client.load_lora_adapter("student", str(tmp_path / "adapter"))
    peft_b = peft_adapter(vllm_lora_server.folder, 1, tmp_path / "adapter_b")  # the next training step's weights
    client.load_lora_adapter("student", str(tmp_path / "adapter_b"), load_inplace=True)
    assert client.complete(prompts, max_tokens=16, model="student") == hf_greedy(peft_b, prompts, 16) != ref
    client.unload_lora_adapter("student")
    assert set(client.models()) == {vllm_lora_server.model}
    with pytest.raises(VLLMRequestError) as err:
        client.unload_lora_adapter("student")
    assert err.value.status == 404


# ---------------------------------------------------------------------------------------------- scripted server


def fake_reply(prompts: list[list[int]], k: int, seed: int = 0) -> tuple[dict, list[dict]]:
    """A `/v1/completions` reply shaped as vLLM 0.32's for `prompt_logprobs: k` (the actual token inserted first,
    then the top k, so it has k or k + 1 entries), and the expected parse of each prompt."""
    g = torch.Generator().manual_seed(seed)
    choices, expected = [], []
    for i, prompt in enumerate(prompts):
        lps = torch.randn(len(prompt), V, generator=g, dtype=torch.float64).log_softmax(-1)[:-1]
        positions, exp = [None], {"top_ids": [], "top_logprobs": [], "token_logprobs": []}
        for t in range(1, len(prompt)):
            row, actual = lps[t - 1], prompt[t]
            entry = {str(actual): {"logprob": row[actual].item(), "rank": int((row >= row[actual]).sum()),
                                   "decoded_token": "x"}}  # fmt: skip
            values, ids = row.topk(k)
            for r, (tid, lp) in enumerate(zip(ids.tolist(), values.tolist()), 1):
                entry[str(tid)] = {"logprob": lp, "rank": r, "decoded_token": "x"}
            positions.append(entry)
            exp["top_ids"].append(ids.tolist())
            exp["top_logprobs"].append(values.tolist())
            exp["token_logprobs"].append(row[actual].item())
        choices.append({"index": i, "text": "x", "prompt_logprobs": positions, "prompt_token_ids": prompt})
        expected.append(exp)
    return {"id": "cmpl-1", "object": "text_completion", "model": "m", "choices": choices}, expected


class ScriptedServer:
    """A stdlib HTTP server on 127.0.0.1 that answers each request with the next scripted step, then with the last:
    a step is `(status, body, headers, delay)` where `body` is bytes, a dict (sent as JSON) or a callable of the
    request's JSON returning a dict."""

    def __init__(self, steps: list[tuple]):
        self.steps, self.calls, self.lock = list(steps), 0, threading.Lock()
        script = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("content-length", 0))
                request = json.loads(self.rfile.read(length)) if length else None
                with script.lock:
                    script.calls += 1
                    status, body, headers, delay = script.steps[0] if len(script.steps) == 1 else script.steps.pop(0)
                time.sleep(delay)
                body = body(request) if callable(body) else body
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                for key, value in {"content-type": "application/json", **headers}.items():
                    self.send_header(key, value)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout)
                    pass

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{HOST}:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self):  # -> ScriptedServer
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def valid(k: int):
    return lambda request: fake_reply(request["prompt"], k)[0]


def client_of(server: ScriptedServer, **kwargs) -> VLLMClient:
    return VLLMClient(server.url, model="m", vocab_size=V, **{"backoff": 0.01, "max_retries": 2, **kwargs})


PROMPTS = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]


def test_parses_a_vllm_shaped_reply_by_token_id():
    reply, expected = fake_reply(PROMPTS, k=4)
    with ScriptedServer([(200, reply, {}, 0)]) as server:
        out = client_of(server).prompt_logprobs(PROMPTS, k=4)
    for got, exp in zip(out, expected):
        assert got.top_ids.tolist() == exp["top_ids"] and got.top_ids.dtype == torch.long
        assert torch.allclose(got.top_logprobs, torch.tensor(exp["top_logprobs"], dtype=torch.float32))
        assert torch.allclose(got.token_logprobs, torch.tensor(exp["token_logprobs"], dtype=torch.float32))
        assert got.top_logprobs.dtype == got.token_logprobs.dtype == torch.float32


def test_429_with_retry_after_then_200():
    steps = [(429, {"error": "slow down"}, {"retry-after": "0.3"}, 0), (200, valid(3), {}, 0)]
    with ScriptedServer(steps) as server:
        start = time.monotonic()
        out = client_of(server, backoff=0.0).prompt_logprobs(PROMPTS, k=3)
        assert server.calls == 2 and time.monotonic() - start >= 0.3  # Retry-After honoured
    assert out[0].top_ids.shape == (5, 3)


def test_5xx_exhausting_retries_names_the_server():
    with ScriptedServer([(500, {"error": "boom"}, {}, 0)]) as server:
        with pytest.raises(VLLMClientError, match="failed 3 times; last failure: HTTP 500") as err:
            client_of(server).prompt_logprobs(PROMPTS, k=3)
        assert server.calls == 3 and f"{server.url}/v1/completions" in str(err.value)
        assert not isinstance(err.value, (VLLMRequestError, VLLMReplyError))


def test_404_is_an_error_at_once():
    with ScriptedServer([(404, {"error": {"message": "The model `m` does not exist."}}, {}, 0)]) as server:
        with pytest.raises(VLLMRequestError, match="HTTP 404.*does not exist") as err:
            client_of(server).prompt_logprobs(PROMPTS, k=3)
        assert server.calls == 1 and err.value.status == 404


def _mutate(path: str, value):
    """A reply step: the valid reply for k=3 with `reply[path...] = value` (`del` when value is `...`)."""

    def body(request):
        reply = fake_reply(request["prompt"], 3)[0]
        *parents, last = [int(p) if p.lstrip("-").isdigit() else p for p in path.split("/")]
        node = reply
        for p in parents:
            node = node[p]
        if value is ...:
            del node[last]
        else:
            node[last] = value(node[last]) if callable(value) else value
        return reply

    return body


def _each(key: str, value):
    """An edit of one position's entry: `key` set to `value` in every item."""
    return lambda entry: {tid: {**item, key: value} for tid, item in entry.items()}


MALFORMED = {
    "a choice missing": _mutate("choices/1", ...),
    "a position missing": _mutate("choices/0/prompt_logprobs/5", ...),
    "position 0 not null": _mutate("choices/0/prompt_logprobs/0", {"1": {"logprob": -1.0, "rank": 1}}),
    "id out of range": _mutate("choices/0/prompt_logprobs/2", lambda e: {**e, "64": {"logprob": -9.0, "rank": 9}}),
    "not an id": _mutate("choices/0/prompt_logprobs/2", lambda e: {**e, "cat": {"logprob": -9.0, "rank": 9}}),
    "NaN": _mutate("choices/1/prompt_logprobs/1", _each("logprob", float("nan"))),
    "positive": _mutate("choices/1/prompt_logprobs/2", _each("logprob", 0.5)),
    "actual token missing": _mutate("choices/0/prompt_logprobs/3", lambda e: dict(list(e.items())[1:])),
    "ranks out of order": _mutate("choices/0/prompt_logprobs/1", _each("rank", 1)),
    "another prompt echoed": _mutate("choices/1/prompt_token_ids", [7, 8, 10]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_replies_are_errors_never_partial(case):
    with ScriptedServer([(200, MALFORMED[case], {}, 0)]) as server:
        with pytest.raises(VLLMReplyError, match=f"{server.url}/v1/completions"):
            client_of(server).prompt_logprobs(PROMPTS, k=3)
        assert server.calls == 1  # a malformed 200 is not retried


UNUSABLE = {
    "HTML page": b"<html><body>502 Bad Gateway</body></html>",
    "cut short": b'{"choices": [{"index": 0, "prompt_logp',
    "no choices": {"object": "error"},
    "empty choices": {"object": "text_completion", "choices": []},
}


@pytest.mark.parametrize("case", list(UNUSABLE))
def test_unusable_200_replies_are_retried_like_a_5xx(case):
    with ScriptedServer([(200, UNUSABLE[case], {}, 0), (200, valid(3), {}, 0)]) as server:
        out = client_of(server).prompt_logprobs(PROMPTS, k=3)
        assert server.calls == 2 and out[0].top_ids.shape == (5, 3)
    with ScriptedServer([(200, UNUSABLE[case], {}, 0)]) as server:
        with pytest.raises(VLLMReplyError, match=f"{server.url}/v1/completions failed 3 times.*unusable reply"):
            client_of(server).complete(PROMPTS, max_tokens=1)
        assert server.calls == 3


def test_a_reply_without_prompt_logprobs_names_the_vllm_extension():
    with ScriptedServer([(200, _mutate("choices/0/prompt_logprobs", ...), {}, 0)]) as server:
        with pytest.raises(VLLMReplyError, match="no `prompt_logprobs`.*vllm serve"):
            client_of(server).prompt_logprobs(PROMPTS, k=3)
        assert server.calls == 1  # the server's answer to this request: not retried


def test_connection_refused_and_timeouts_retry_then_fail():
    port = free_port()  # nothing listens there
    with pytest.raises(VLLMClientError, match=f"http://{HOST}:{port}/v1/completions failed 3 times.*ConnectError"):
        VLLMClient(f"http://{HOST}:{port}", model="m", backoff=0.01, max_retries=2).complete([[1]], max_tokens=1)
    timed_out = pytest.raises(VLLMClientError, match="failed 2 times; last failure: timed out after 0.2 s")
    with ScriptedServer([(200, valid(3), {}, 1.0)]) as server, timed_out:
        client_of(server, timeout=0.2, max_retries=1).prompt_logprobs(PROMPTS, k=3)


def test_one_client_shared_by_threads_and_complete_parsing():
    def completion(request):
        n, prompts = request["n"], request["prompt"]
        return {"choices": [{"index": i, "token_ids": [i % V, 3], "prompt_token_ids": prompts[i // n]}
                            for i in range(len(prompts) * n)]}  # fmt: skip

    with ScriptedServer([(200, completion, {}, 0.05)]) as server:
        client = client_of(server)
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: client.complete(PROMPTS, max_tokens=4, n=i % 3 + 1), range(16)))
        assert server.calls == 16
        assert all(r == [[j, 3] for j in range(len(PROMPTS) * (i % 3 + 1))] for i, r in enumerate(results))
        with pytest.raises(VLLMReplyError, match="bad token_ids"):
            client.complete(PROMPTS, max_tokens=1)  # two tokens came back for max_tokens=1
