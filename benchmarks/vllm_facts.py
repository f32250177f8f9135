"""Measured facts about vLLM 0.32 (.venv-vllm, `make setup-vllm`) serving a tiny Llama on this machine; the numbers
behind docs/vllm_facts.md.

1. Server start time (no LoRA, runtime LoRA).
2. Prompt log-probs: equality with HF fp32 (k = V = 64), and latency / reply bytes per prompt token for a batch of
   8 x 128 tokens at k = 20 and k = 64 over each wire format the server offers: `/v1/completions` as plain JSON, with
   `return_tokens_as_token_ids`, gzip (`--middleware starlette.middleware.gzip.GZipMiddleware`), and the token-in /
   token-out `/inference/v1/generate` (`--enable-scale-out`, one prompt per request, no decoded strings).
3. Runtime LoRA: load / unload time, greedy completions of a PEFT adapter vs HF `generate` on the PEFT model, and
   whether batched prompt log-probs still work with `--enable-lora`.
4. New full weights into a running server (`VLLM_SERVER_DEV_MODE=1`: `/collective_rpc` `reload_weights`), the RL
   weight-transfer routes and sleep mode on CPU.

    .venv/bin/python benchmarks/vllm_facts.py --out runs/bench    # ~5 min on 2 cores; prints a table, writes JSON
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import SPECIAL, WORDS, make_tokenizer
from vllm_server import VLLMServer, save_tiny_llama

from hf_distill.generation.vllm import VLLMClient, VLLMClientError, _parse_positions, httpx


V, BATCH, LENGTH = 64, 8, 128
GZIP = "starlette.middleware.gzip.GZipMiddleware"


def prompts_for(seed: int, batch: int = BATCH, length: int = LENGTH) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (batch, length), generator=g).tolist()


def hf_logprobs(model, prompts: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(prompts)).logits[:, :-1].float().log_softmax(-1)  # (B, T - 1, V)


def hf_greedy(model, prompts: list[list[int]], new: int) -> list[list[int]]:
    ids = torch.tensor(prompts)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             pad_token_id=0)[:, ids.shape[1] :].tolist()  # fmt: skip
    eos = model.config.eos_token_id
    return [row[: row.index(eos) + 1] if eos in row else row for row in out]


def agreeing(got: list[list[int]], ref: list[list[int]]) -> tuple[int, int]:
    """Tokens in the common prefix of each pair, summed; and the reference's token count."""
    same = 0
    for a, b in zip(got, ref):
        for x, y in zip(a, b):
            if x != y:
                break
            same += 1
    return same, sum(len(r) for r in ref)


def max_diff(parsed, ref: torch.Tensor, prompts: list[list[int]]) -> float:
    """Largest |server - HF| over the returned top-k and the actual tokens' log-probs."""
    worst = 0.0
    for b, p in enumerate(parsed):
        worst = max(worst, (p.top_logprobs - ref[b].gather(-1, p.top_ids)).abs().max().item())
        actual = torch.tensor(prompts[b][1:])[:, None]
        worst = max(worst, (p.token_logprobs - ref[b].gather(-1, actual)[:, 0]).abs().max().item())
    return worst


def wire_case(http, url: str, model: str, fmt: str, k: int, prompts: list[list[int]]) -> dict:
    """One batch in format `fmt`: seconds to the whole reply, bytes on the wire, seconds to decode and parse."""
    identity = {"accept-encoding": "identity"}
    gzip = {"accept-encoding": "gzip"}
    t0 = time.perf_counter()
    if fmt.startswith("completions"):
        body = {"model": model, "prompt": prompts, "max_tokens": 1, "temperature": 0, "prompt_logprobs": k}
        if fmt == "completions+token_ids":
            body["return_tokens_as_token_ids"] = True
        r = http.post(f"{url}/v1/completions", json=body, headers=gzip if fmt.endswith("gzip") else identity)
        replies, wire = [r], r.num_bytes_downloaded
    else:
        params = {"max_tokens": 1, "temperature": 0, "prompt_logprobs": k, "detokenize": False}
        headers = gzip if fmt.endswith("gzip") else identity

        def one(p):
            body = {"model": model, "token_ids": p, "sampling_params": params}
            return http.post(f"{url}/inference/v1/generate", json=body, headers=headers)

        with ThreadPoolExecutor(len(prompts)) as pool:
            replies = list(pool.map(one, prompts))
        wire = sum(r.num_bytes_downloaded for r in replies)
    seconds = time.perf_counter() - t0
    for r in replies:
        r.raise_for_status()
    t1 = time.perf_counter()
    if fmt.startswith("completions"):
        choices = sorted(json.loads(replies[0].content)["choices"], key=lambda c: c["index"])
    else:
        choices = [{"prompt_logprobs": json.loads(r.content)["prompt_logprobs"]} for r in replies]
    parsed = [_parse_positions(c, p, k, V, fmt) for c, p in zip(choices, prompts)]
    parse = time.perf_counter() - t1
    return {"seconds": seconds, "wire_bytes": wire, "json_bytes": sum(len(r.content) for r in replies),
            "parse_seconds": parse, "parsed": parsed}  # fmt: skip


def measure_wire(server: VLLMServer, model, repeats: int) -> list[dict]:
    """Each format in turn within every repeat (round robin), so a change of load on the shared cores hits them all."""
    rows = []
    formats = ["completions", "completions+token_ids", "completions+gzip", "generate", "generate+gzip", "client"]
    with (
        httpx.Client(timeout=300) as http,
        VLLMClient(server.url, vocab_size=V, headers={"accept-encoding": "identity"}) as client,
    ):
        for k in (20, 64):
            runs = {fmt: [] for fmt in formats}
            for rep in range(repeats + 1):  # the first round is a warm-up
                for i, fmt in enumerate(formats):
                    prompts = prompts_for(100_000 * k + 100 * rep + i)  # new prompts: no prefix-cache hit
                    if fmt == "client":  # the shipped client end to end: plain JSON, decoded and validated
                        t0 = time.perf_counter()
                        parsed = client.prompt_logprobs(prompts, k)
                        case = {"seconds": time.perf_counter() - t0, "parsed": parsed}
                    else:
                        case = wire_case(http, server.url, server.model, fmt, k, prompts)
                    case["max_abs_diff"] = max_diff(case.pop("parsed"), hf_logprobs(model, prompts), prompts)
                    if rep:
                        runs[fmt].append(case)
            tokens = BATCH * LENGTH
            for fmt, cases in runs.items():
                row = {"k": k, "format": fmt, "max_abs_diff_vs_hf": max(c["max_abs_diff"] for c in cases)}
                row["latency_ms"] = 1e3 * statistics.median(c["seconds"] for c in cases)
                row["latency_ms_min"] = 1e3 * min(c["seconds"] for c in cases)
                if fmt != "client":
                    row["parse_ms"] = 1e3 * statistics.median(c["parse_seconds"] for c in cases)
                    row["wire_bytes_per_token"] = statistics.median(c["wire_bytes"] for c in cases) / tokens
                    row["json_bytes_per_token"] = statistics.median(c["json_bytes"] for c in cases) / tokens
                rows.append(row)
    return rows


def measure_lora(folder: Path, tmp: Path, log: Path) -> dict:
    out = {}
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(0)
    peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    peft.save_pretrained(tmp / "adapter")
    prompts = prompts_for(7, batch=4, length=8)
    with VLLMServer(folder, served_model_name="tiny-llama", lora=True, log_path=log) as server:
        out["start_seconds_lora"] = server.start_seconds
        client = VLLMClient(server.url, model=server.model, vocab_size=V)
        t0 = time.perf_counter()
        client.load_lora_adapter("student", str(tmp / "adapter"))
        out["load_seconds"] = time.perf_counter() - t0
        got = client.complete(prompts, max_tokens=32, model="student")
        same, total = agreeing(got, hf_greedy(peft, prompts, 32))
        with peft.disable_adapter():
            plain = hf_greedy(peft, prompts, 32)
        out["greedy_tokens_agree"] = f"{same}/{total}"
        out["adapter_changes_output"] = got != plain
        out["base_tokens_agree"] = "{}/{}".format(*agreeing(client.complete(prompts, max_tokens=32), plain))
        t0 = time.perf_counter()
        client.unload_lora_adapter("student")
        out["unload_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        client.load_lora_adapter("student", str(tmp / "adapter"))
        out["reload_seconds"] = time.perf_counter() - t0
        out.update(lora_inplace(client, folder, tmp, peft))
        try:  # batched prompt log-probs on a --enable-lora server
            lp_client = VLLMClient(server.url, model=server.model, vocab_size=V, max_retries=0)
            lp_client.prompt_logprobs(prompts_for(8, batch=4), k=5)
            out["batched_prompt_logprobs_with_enable_lora"] = "ok"
        except VLLMClientError as err:
            text = log.read_text(errors="replace")
            cause = [line for line in text.splitlines() if "RuntimeError: einsum()" in line][:1]
            out["batched_prompt_logprobs_with_enable_lora"] = f"{err}; server log: {cause}"
            out["server_alive_after"] = server.running()
    return out


def lora_inplace(client: VLLMClient, folder: Path, tmp: Path, peft_a) -> dict:
    """Replace the loaded adapter "student" (A) by B with `load_inplace`: do long prompts already served with A (their
    KV blocks are in the prefix cache) then follow B?"""
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(1)
    peft_b = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    peft_b.save_pretrained(tmp / "adapter_b")
    long, fresh = prompts_for(9, batch=2, length=300), prompts_for(10, batch=2, length=300)
    ref_a, ref_b = hf_greedy(peft_a, long, 16), hf_greedy(peft_b, long, 16)
    out = {"inplace_before_agree_A": "{}/{}".format(*agreeing(client.complete(long, 16, model="student"), ref_a))}
    t0 = time.perf_counter()
    client.load_lora_adapter("student", str(tmp / "adapter_b"), load_inplace=True)
    out["inplace_load_seconds"] = time.perf_counter() - t0
    got = client.complete(long, 16, model="student")
    out["inplace_same_prompts_agree_B"] = "{}/{}".format(*agreeing(got, ref_b))
    out["inplace_same_prompts_agree_A"] = "{}/{}".format(*agreeing(got, ref_a))
    got = client.complete(fresh, 16, model="student")
    out["inplace_fresh_prompts_agree_B"] = "{}/{}".format(*agreeing(got, hf_greedy(peft_b, fresh, 16)))
    client.load_lora_adapter("student-b", str(tmp / "adapter_b"))
    got = client.complete(long, 16, model="student-b")
    out["new_name_same_prompts_agree_B"] = "{}/{}".format(*agreeing(got, ref_b))
    client.unload_lora_adapter("student-b")
    return out


def measure_full_weights(server: VLLMServer, new_folder: Path) -> dict:
    """Push the weights saved in `new_folder` into the running (dev-mode) server and check what it then computes."""
    out = {}
    old = AutoModelForCausalLM.from_pretrained(server.folder, dtype=torch.float32).eval()
    new = AutoModelForCausalLM.from_pretrained(new_folder, dtype=torch.float32).eval()
    client = VLLMClient(server.url, model=server.model, vocab_size=V)
    http = client._http
    prompts = prompts_for(11, batch=4, length=300)  # several full KV blocks, which the prefix cache keeps
    before = agreeing(client.complete(prompts, 16), hf_greedy(old, prompts, 16))
    out["before_greedy_agree_old"] = "{}/{}".format(*before)
    t0 = time.perf_counter()
    r = http.post(f"{server.url}/collective_rpc",
                  json={"method": "reload_weights", "kwargs": {"weights_path": str(new_folder)}})  # fmt: skip
    out["collective_rpc_reload_weights"] = {"status": r.status_code, "body": r.text[:300],
                                            "seconds": time.perf_counter() - t0}  # fmt: skip
    ref_new = hf_greedy(new, prompts, 16)
    out["after_same_prompts_greedy_agree_new"] = "{}/{}".format(*agreeing(client.complete(prompts, 16), ref_new))
    fresh = prompts_for(12, batch=4, length=300)
    out["after_fresh_prompts_greedy_agree_new"] = "{}/{}".format(
        *agreeing(client.complete(fresh, 16), hf_greedy(new, fresh, 16))
    )
    lp_prompts = prompts_for(13)
    out["after_prompt_logprobs_max_abs_diff_new"] = max_diff(
        client.prompt_logprobs(lp_prompts, V), hf_logprobs(new, lp_prompts), lp_prompts
    )
    r = http.post(f"{server.url}/reset_prefix_cache")
    out["reset_prefix_cache"] = r.status_code
    out["after_reset_same_prompts_greedy_agree_new"] = "{}/{}".format(*agreeing(client.complete(prompts, 16), ref_new))
    out["models_after"] = http.get(f"{server.url}/v1/models").json()["data"][0]["root"]
    for route, body in [("/pause", None), ("/resume", None), ("/sleep?level=1", None), ("/wake_up", None),
                        ("/init_weight_transfer_engine", {"init_info": {}}), ("/update_weights", {"update_info": {}}),
                        ("/weight_checker", {"action": "checksum"})]:  # fmt: skip
        r = http.post(f"{server.url}{route}", json=body)
        out[f"POST {route}"] = f"{r.status_code} {r.text[:200]}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--parts", nargs="+", default=["starts", "lora", "wire", "weights"])
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vllm-facts-"))
    tokenizer = make_tokenizer(WORDS + [f"w{i}" for i in range(V - len(SPECIAL) - len(WORDS))])
    folder = save_tiny_llama(tmp / "tiny-llama", tokenizer, seed=0)
    new_folder = save_tiny_llama(tmp / "tiny-llama-new", tokenizer, seed=1)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    results = {"load_average_at_start": os.getloadavg(), "starts_no_lora": []}
    for _ in range(2 if "starts" in args.parts else 0):
        with VLLMServer(folder, served_model_name="tiny-llama", lora=False, log_path=tmp / "plain.log") as server:
            results["starts_no_lora"].append(server.start_seconds)
    if "lora" in args.parts:
        results["lora"] = measure_lora(folder, tmp, tmp / "lora.log")
    extra = ["--enable-scale-out", "--middleware", GZIP]
    with VLLMServer(folder, served_model_name="tiny-llama", lora=False, extra_args=extra,
                    env={"VLLM_SERVER_DEV_MODE": "1"}, log_path=tmp / "wire.log") as server:  # fmt: skip
        results["start_seconds_scale_out_gzip_dev"] = server.start_seconds
        if "wire" in args.parts:
            results["wire"] = measure_wire(server, model, args.repeats)
        if "weights" in args.parts:
            results["full_weights"] = measure_full_weights(server, new_folder)
    results["load_average_at_end"] = os.getloadavg()
    head = ["k", "format", "latency ms", "(min)", "parse ms", "wire B/tok", "JSON B/tok", "max|d|"]
    print("{:>3} {:22} {:>10} {:>7} {:>9} {:>10} {:>10} {:>8}".format(*head))
    for row in results.get("wire", []):
        print(f"{row['k']:>3} {row['format']:22} {row['latency_ms']:>10.1f} {row['latency_ms_min']:>7.1f} "
              f"{row.get('parse_ms', 0):>9.1f} "
              f"{row.get('wire_bytes_per_token', 0):>10.0f} {row.get('json_bytes_per_token', 0):>10.0f} "
              f"{row.get('max_abs_diff_vs_hf', 0):>8.1e}")  # fmt: skip
    for key in ("starts_no_lora", "start_seconds_scale_out_gzip_dev", "lora", "full_weights"):
        print(key, json.dumps(results.get(key), indent=1, default=str))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "vllm_facts.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
