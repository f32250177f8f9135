"""The served teacher (`teachers/served.py`, `generation/served.py`) against a real vLLM server of a tiny Llama
(`tests/vllm_server.py`): equal to the in-process teacher, as a live source and as a cache; its faults."""

import json
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import SPECIAL, distill_config, make_llama, make_tokenizer, one_sgd_step, run_processes
from datasets import load_from_disk
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, TrainerCallback
from vllm_server import ANSWERS, PROMPTS, prompt_answer_rows

from hf_distill import DistillationTrainer
from hf_distill.cli.main import main as cli_main
from hf_distill.generation.served import ServedLogprobs, tail_logmass
from hf_distill.losses import logit_divergence, sparse_logit_divergence
from hf_distill.teachers import LiveTeacher
from hf_distill.terms import SupervisedView


pytestmark = pytest.mark.vllm


def served_fields(served, k: int = 20, **extra) -> dict:
    return {"teacher_api_base": [served.url], "teacher_api_model": [served.model], "teacher_api_top_k": k, **extra}


def trainer_for(tmp_path, served, data, student=None, **fields) -> DistillationTrainer:
    return DistillationTrainer(
        model=student if student is not None else make_llama(vocab_size=len(served.tokenizer), seed=0),
        args=distill_config(tmp_path, **fields),
        train_dataset=data,
        data_collator=DataCollatorForSeq2Seq(served.tokenizer, padding=True),
        processing_class=served.tokenizer,
    )


def batch_terms(source, student, batch):
    """The source's per-position divergences `(N,)` on one batch (kd_loss of the config), and the view."""
    model_inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    out = student(**model_inputs)
    view = SupervisedView.from_batch(batch, source.context.head)
    return out, source.outputs(model_inputs, batch), view


def test_full_vocabulary_replies_equal_the_dense_forward_kl(tmp_path, vllm_server):
    """k = V (the whole vocabulary of the tiny model): the sparse divergence from the server's replies equals the
    dense forward KL of the same teacher run in process, position by position."""
    served, data = vllm_server, prompt_answer_rows(vllm_server.tokenizer)
    trainer = trainer_for(tmp_path, served, data, **served_fields(served, k=len(served.tokenizer)))
    source = trainer.teacher_source
    assert source.name == "served"
    batch = trainer.data_collator([dict(data[i]) for i in range(len(data))])
    student = trainer.model.eval()
    with torch.no_grad():
        out, teacher_out, view = batch_terms(source, student, batch)
        s = view.rows(out.logits)
        mask = view.mask
        entries = [x[:, 1:][mask] for x in (teacher_out.topk_ids, teacher_out.topk_logprobs, teacher_out.tail_logmass)]
        served_kd = sparse_logit_divergence(s, *entries)
        teacher = AutoModelForCausalLM.from_pretrained(served.folder, dtype=torch.float32).eval()
        dense_kd = logit_divergence(s, view.rows(teacher(input_ids=batch["input_ids"],
                                                         attention_mask=batch["attention_mask"]).logits))  # fmt: skip
    assert torch.isinf(teacher_out.tail_logmass[:, 1:][mask]).all()  # k = V: nothing outside the top k
    assert (dense_kd > 0.01).all()  # the random teacher and student differ at every position
    torch.testing.assert_close(served_kd, dense_kd, rtol=0, atol=1e-4)


def test_tail_mass_from_the_top_k():
    logprobs = torch.log_softmax(torch.randn(3, 10, dtype=torch.float64), -1)
    top = logprobs.topk(4, -1).values
    expected = logprobs.scatter(-1, logprobs.topk(4, -1).indices, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(tail_logmass(top.float(), 10), expected.float(), rtol=1e-5, atol=1e-6)
    assert torch.isinf(tail_logmass(logprobs.float(), 10)).all()


def test_one_step_equals_from_the_in_process_cache_the_served_cache_and_the_live_server(tmp_path, vllm_server):
    """k = 20: the same student after one SGD step from (a) a cache of the in-process teacher, (b) a cache written
    from the server (`cache-teacher --teacher_api_base`), (c) the live served teacher, all on the tokenised
    `train_dataset` that `cache-teacher` writes."""
    served = vllm_server
    text = tmp_path / "rows.jsonl"
    text.write_text("".join(json.dumps({"prompt": p, "completion": " " + a}) + "\n" for p, a in zip(PROMPTS, ANSWERS)))
    common = ["--dataset", str(text), "--tokenizer", str(served.folder), "--k", "20", "--dtype", "float32"]
    cli_main(["cache-teacher", "--teacher", str(served.folder), "--output_dir", str(tmp_path / "local"), *common])
    cli_main(["cache-teacher", "--teacher_api_base", served.url, "--teacher_api_model", served.model,
              "--output_dir", str(tmp_path / "served"), *common])  # fmt: skip
    data = load_from_disk(str(tmp_path / "local" / "train_dataset"))
    assert data["input_ids"] == load_from_disk(str(tmp_path / "served" / "train_dataset"))["input_ids"]
    step = {**one_sgd_step(len(data), 1), "learning_rate": 0.1, "kd_weight": 1.0, "ce_weight": 0.5, "temperature": 2.0}
    weights = {}
    runs = {
        "local_cache": {"teacher_cache": str(tmp_path / "local")},
        "served_cache": {"teacher_cache": str(tmp_path / "served")},
        "live": served_fields(served, k=20),
    }
    for name, fields in runs.items():
        trainer = trainer_for(tmp_path / name, served, data, **step, **fields)
        trainer.train()
        weights[name] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    start = make_llama(vocab_size=len(served.tokenizer), seed=0).state_dict()
    assert max((weights["live"][k] - start[k]).abs().max() for k in start) > 1e-3  # the step moved the weights
    for name in ("served_cache", "live"):
        for key, value in weights["local_cache"].items():
            torch.testing.assert_close(weights[name][key], value, rtol=0, atol=1e-4, msg=f"{name}: {key}")


def test_a_server_with_another_tokenizer_is_refused_naming_it(tmp_path, vllm_server):
    words = list(reversed(vllm_server.tokenizer.convert_ids_to_tokens(list(range(len(SPECIAL), 64)))))
    other = make_tokenizer(words)  # the same strings under other ids
    data = prompt_answer_rows(vllm_server.tokenizer)
    with pytest.raises(ValueError, match=rf"served teacher at {vllm_server.url}.*tokenizes text differently"):
        DistillationTrainer(model=make_llama(vocab_size=len(other)), args=distill_config(tmp_path,
                            **served_fields(vllm_server)), train_dataset=data, processing_class=other)  # fmt: skip


def test_top_k_above_the_vocabulary_or_the_servers_cap_names_teacher_api_top_k(vllm_server):
    with pytest.raises(ValueError, match=r"`teacher_api_top_k` \(65\) is larger than the vocabulary \(64\)"):
        ServedLogprobs([vllm_server.url], [vllm_server.model], k=65, vocab_size=64)
    k = vllm_server.server.max_logprobs + 1  # above the server's --max-logprobs (vocabulary unknown to the client)
    pool = ServedLogprobs([vllm_server.url], [vllm_server.model], k=k, max_retries=0)
    try:
        with pytest.raises(ValueError, match=rf"{vllm_server.url}.*`teacher_api_top_k` \({k}\).*--max-logprobs"):
            pool.score([[1, 2, 3]])
    finally:
        pool.close()


def test_requests_are_sent_when_the_batch_is_collated(tmp_path, vllm_server):
    data = prompt_answer_rows(vllm_server.tokenizer)
    trainer = trainer_for(tmp_path, vllm_server, data, **served_fields(vllm_server), max_steps=3)
    trainer.train()
    source = trainer.teacher_source
    assert source.pool.stats["requests"] >= 3 and source.refetched == 0  # every step used its prefetched reply
    off = trainer_for(tmp_path / "off", vllm_server, data, **served_fields(vllm_server, teacher_api_prefetch=False),
                      max_steps=3)  # fmt: skip
    off.train()
    assert off.teacher_source.pool.stats["requests"] >= 3
    loss = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert loss == [e["loss"] for e in off.state.log_history if "loss" in e]


def test_replicas_split_each_batch_and_give_the_same_loss(tmp_path, vllm_server):
    """Two URLs of one server (replicas): each batch's rows are split across them; the loss is unchanged."""
    data = prompt_answer_rows(vllm_server.tokenizer)
    one = trainer_for(tmp_path / "one", vllm_server, data, **served_fields(vllm_server), max_steps=2)
    two_fields = served_fields(vllm_server)
    two_fields["teacher_api_base"] = [vllm_server.url, vllm_server.url + "/v1"]
    two = trainer_for(tmp_path / "two", vllm_server, data, **two_fields, max_steps=2)
    one.train()
    two.train()
    assert two.teacher_source.pool.requests_per_server == [2, 1]  # batches of 4 rows (2 + 2) and 1 row
    assert one.teacher_source.pool.requests_per_server == [2]
    assert [e["loss"] for e in one.state.log_history if "loss" in e] == pytest.approx(
        [e["loss"] for e in two.state.log_history if "loss" in e], abs=1e-6
    )


def test_on_policy_samples_are_scored_by_the_server(tmp_path, vllm_server):
    data = prompt_answer_rows(vllm_server.tokenizer)
    trainer = trainer_for(tmp_path, vllm_server, data, **served_fields(vllm_server), max_steps=2, lmbda=1.0,
                          max_new_tokens=4)  # fmt: skip
    trainer.train()
    assert trainer.teacher_source.refetched >= 1  # rows rewritten after their request: asked again
    assert all(e["kd_loss"] > 0 for e in trainer.state.log_history if "kd_loss" in e)


class _KillAt(TrainerCallback):
    """Stops the server after optimizer step `step` and launches it again without waiting: the next steps wait and
    retry while it starts. Launched from the training (main) thread, which outlives the server."""

    def __init__(self, server, step):
        self.server, self.step = server, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.server.relaunch()


def test_a_killed_and_restarted_server_is_waited_for_with_no_lost_or_repeated_step(tmp_path, vllm_server):
    data = prompt_answer_rows(vllm_server.tokenizer)
    fields = {
        **served_fields(vllm_server),
        "max_steps": 4,
        "teacher_api_max_retries": 12,
        "per_device_train_batch_size": 2,
    }
    straight = trainer_for(tmp_path / "a", vllm_server, data, **fields)
    straight.train()
    killed = trainer_for(tmp_path / "b", vllm_server, data, **fields)
    killer = _KillAt(vllm_server.server, 2)
    killed.add_callback(killer)
    killed.train()
    vllm_server.server.wait_ready()  # raises with the server's log if the relaunched server died
    assert vllm_server.server.running()
    assert killed.state.global_step == 4
    assert [e["step"] for e in killed.state.log_history if "loss" in e] == [1, 2, 3, 4]
    for (name, a), b in zip(straight.model.state_dict().items(), killed.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)


def test_a_checkpointed_run_resumes_with_the_server(tmp_path, vllm_server):
    data = prompt_answer_rows(vllm_server.tokenizer)
    fields = {**served_fields(vllm_server), "max_steps": 4, "per_device_train_batch_size": 2, "save_strategy": "steps",
              "save_steps": 2}  # fmt: skip
    straight = trainer_for(tmp_path / "a", vllm_server, data, **fields)
    straight.train()
    resumed = trainer_for(tmp_path / "a", vllm_server, data, **fields)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)


def test_a_dead_server_fails_naming_it_and_nothing_is_applied(tmp_path):
    """A server that is not there: retried, then an error naming the server (no step applied, no weight changed)."""
    tok = make_tokenizer()
    data = prompt_answer_rows(tok)
    pool = ServedLogprobs(["http://127.0.0.1:9"], ["m"], k=5, vocab_size=len(tok), max_retries=1, max_backoff=0.1)
    with pytest.raises(Exception, match=r"127\.0\.0\.1:9"):
        pool.score([data[0]["input_ids"]])
    pool.close()


SCRIPT = Path(__file__).resolve().parent / "distributed" / "served_equivalence.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


@pytest.mark.distributed
def test_two_processes_equal_one_with_a_served_teacher(tmp_path, vllm_server):
    """Each process asks the server for its own rows; 2 processes x batch 2 == 1 process x batch 4."""
    args = [vllm_server.url, vllm_server.model, str(vllm_server.folder)]
    run_processes([sys.executable, str(SCRIPT), str(tmp_path / "one"), *args, "--batch_size", "4"])
    run_processes([*TORCHRUN, str(SCRIPT), str(tmp_path / "two"), *args, "--batch_size", "2"])
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert (one["processes"], two["processes"]) == (1, 2) and len(set(one["loss"])) > 1
    assert one["loss"] == pytest.approx(two["loss"], abs=1e-5)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final").state_dict()
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=0, atol=1e-5, msg=name)


def test_live_source_and_served_source_agree_on_the_agreement_metric(tmp_path, vllm_server):
    """top1_agreement of the served source (argmax = its top-1 id) equals the in-process teacher's."""
    data = prompt_answer_rows(vllm_server.tokenizer)
    trainer = trainer_for(tmp_path, vllm_server, data, **served_fields(vllm_server, k=5))
    batch = trainer.data_collator([dict(data[i]) for i in range(len(data))])
    with torch.no_grad():
        out, teacher_out, view = batch_terms(trainer.teacher_source, trainer.model.eval(), batch)
        served = trainer.teacher_source.terms(out, teacher_out, view).metrics["top1_agreement"]
        teacher = AutoModelForCausalLM.from_pretrained(vllm_server.folder).eval()
        live = LiveTeacher(trainer.teacher_source.context, teacher)
        dense = live.terms(out, live.outputs({k: batch[k] for k in ("input_ids", "attention_mask")}, batch), view)
    assert [float(x) for x in served] == [float(x) for x in dense.metrics["top1_agreement"]]


class ModelServer:
    """A vLLM-shaped server on 127.0.0.1 answering from an in-process model (`/v1/models`, `/tokenize`,
    `/v1/completions` with `prompt_logprobs`): two of them are two different teachers, cheaply. (vLLM 0.32 on CPU
    cannot serve prompt log-probs with LoRA adapters on: its engine crashes, so one server cannot be both.)"""

    def __init__(self, model, tokenizer, name: str):
        import http.server

        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self._send({"data": [{"id": name, "max_model_len": 128}]})

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/tokenize":
                    ids = tokenizer(request["prompt"], add_special_tokens=request["add_special_tokens"])["input_ids"]
                    return self._send({"tokens": ids})
                outer.asked.append(len(request["prompt"]))
                return self._send({"choices": [outer.choice(i, p, request["prompt_logprobs"])
                                               for i, p in enumerate(request["prompt"])]})  # fmt: skip

            def _send(self, reply):
                body = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.model, self.asked = model.eval(), []
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def choice(self, index: int, prompt: list[int], k: int) -> dict:
        with torch.no_grad():
            logprobs = self.model(input_ids=torch.tensor([prompt])).logits[0].log_softmax(-1)
        positions = [None]
        for t in range(1, len(prompt)):
            values, ids = logprobs[t - 1].topk(k)
            entry = {
                str(i): {"logprob": v, "rank": r + 1} for r, (v, i) in enumerate(zip(values.tolist(), ids.tolist()))
            }
            actual = prompt[t]
            if str(actual) not in entry:
                rank = int((logprobs[t - 1] > logprobs[t - 1, actual]).sum()) + 1
                entry = {str(actual): {"logprob": float(logprobs[t - 1, actual]), "rank": rank}, **entry}
            positions.append(entry)
        return {"index": index, "prompt_logprobs": positions, "prompt_token_ids": prompt}

    def close(self):
        self.httpd.shutdown()


def test_rows_go_to_the_teacher_their_teacher_id_names(tmp_path):
    """Two teachers (two servers of different models): with a `teacher_id` column each row is scored by its own."""
    tok = make_tokenizer()
    teachers = [make_llama(vocab_size=len(tok), seed=1), make_llama(vocab_size=len(tok), seed=2)]
    servers = [ModelServer(t, tok, f"teacher-{i}") for i, t in enumerate(teachers)]
    try:
        data = prompt_answer_rows(tok).add_column("teacher_id", [0, 1, 1, 0, 1])
        fields = {"teacher_api_base": [s.url for s in servers], "teacher_api_top_k": 5}
        trainer = DistillationTrainer(model=make_llama(vocab_size=len(tok)), args=distill_config(tmp_path, **fields),
                                      train_dataset=data, data_collator=DataCollatorForSeq2Seq(tok, padding=True),
                                      processing_class=tok)  # fmt: skip
        assert trainer.teacher_source.pool.routed
        batch = trainer.data_collator([dict(data[i]) for i in range(len(data))])
        assert batch["teacher_id"].tolist() == [0, 1, 1, 0, 1]
        model_inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        out = trainer.teacher_source.outputs(model_inputs, batch)
        assert [s.asked for s in servers] == [[2], [3]]  # one request each, with its own rows
        with torch.no_grad():
            references = [t(**model_inputs).logits.log_softmax(-1) for t in teachers]
        for b, teacher_id in enumerate(batch["teacher_id"].tolist()):
            at = out.mask[b, 1:]
            expected = references[teacher_id][b, :-1][at].topk(5, -1)
            torch.testing.assert_close(out.topk_logprobs[b, 1:][at], expected.values, rtol=0, atol=1e-5)
            assert torch.equal(out.topk_ids[b, 1:][at], expected.indices)
        trainer.train()  # and trains through the routed teachers
    finally:
        for server in servers:
            server.close()
