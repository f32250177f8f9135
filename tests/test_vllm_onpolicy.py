"""On-policy samples through vLLM (`use_vllm`, `generation/vllm_sampler.py`) against a real vLLM server of a tiny
Llama (`tests/vllm_server.py`): the adapter (or full weights) of step s is what samples step s + 1, the samples equal
the `generate` path's on the same weights, `log_completions`, the sync interval, the overlap's lag, and faults."""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import distill_config, make_llama, run_processes
from peft import LoraConfig, PeftModel, get_peft_model
from test_vllm_client import ScriptedServer
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq
from vllm_server import PROMPTS, VLLMServer, free_port, prompt_answer_rows, save_tiny_llama

from hf_distill import DistillationTrainer
from hf_distill.generation.completion_log import read_completions
from hf_distill.generation.onpolicy import generate_completions
from hf_distill.generation.vllm import VLLMClient, VLLMClientError, VLLMReplyError
from hf_distill.generation.vllm_sampler import VLLMStudentSampler


pytestmark = pytest.mark.vllm

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NEW = 6  # max_new_tokens


def base_model(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def lora_student(folder: Path, r: int = 8, init: bool = True, seed: int = 0) -> PeftModel:
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=init)
    return get_peft_model(base_model(folder), config)


def onpolicy_trainer(tmp_path, served, student, tokenizer=None, **fields) -> DistillationTrainer:
    """lmbda = 1, greedy, `NEW` new tokens, through the vLLM server `served` (unless `use_vllm=False`)."""
    tok = tokenizer or served.tokenizer
    fields = {"lmbda": 1.0, "generation_temperature": 0.0, "max_new_tokens": NEW, "use_vllm": True,
              "vllm_server_base_url": served.url, "vllm_max_retries": 1, **fields}  # fmt: skip
    teacher = make_llama(4, 64, vocab_size=len(tok), seed=1)
    teacher.config.eos_token_id = tok.eos_token_id  # one token-to-id map (a test may move EOS)
    return DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=distill_config(tmp_path, **fields),
        train_dataset=prompt_answer_rows(tok),
        data_collator=DataCollatorForSeq2Seq(tok, padding=True),
        processing_class=tok,
    )


def greedy(model: torch.nn.Module, prompt: list[int], eos: int | None) -> list[int]:
    return generate_completions(model.eval(), [prompt], pad_token_id=0, eos_token_id=eos, max_new_tokens=NEW,
                                do_sample=False)[0]  # fmt: skip


def weights_at(out: Path, initial: Path, policy_step: int, folder: Path, lora: bool) -> torch.nn.Module:
    """The student as it was after `policy_step` optimizer steps (`initial` before the first)."""
    where = initial if policy_step == 0 else out / f"checkpoint-{policy_step}"
    return PeftModel.from_pretrained(base_model(folder), where) if lora else base_model(where)


def check_against_checkpoints(out: Path, initial: Path, folder: Path, eos: int, lora: bool = True) -> list[dict]:
    """Every logged completion equals HF greedy `generate` of the weights saved at its `policy_step`."""
    logged = read_completions(str(out))
    models = {}
    for row in logged:
        step = row["policy_step"]
        if step not in models:
            models[step] = weights_at(out, initial, step, folder, lora)
        assert row["completion_ids"] == greedy(models[step], row["prompt_ids"], eos), row
    return logged


def lagging_rows_differ(logged: list[dict], out: Path, initial: Path, folder: Path, eos: int, lora: bool) -> bool:
    """Whether the weights one sync older would have generated something else for some row (the check above is
    not vacuous: the weights really change between steps)."""
    rows_ = [r for r in logged if r["policy_step"] >= 1]
    older = {s: weights_at(out, initial, s - 1, folder, lora) for s in {r["policy_step"] for r in rows_}}
    return any(r["completion_ids"] != greedy(older[r["policy_step"]], r["prompt_ids"], eos) for r in rows_)


# ---------------------------------------------------------------------------------------------- LoRA students


def test_adapter_of_step_s_samples_step_s_plus_1_and_log_completions(vllm_lora_server, tmp_path):
    served = vllm_lora_server
    student = lora_student(served.folder)
    student.save_pretrained(tmp_path / "initial")
    t = onpolicy_trainer(tmp_path, served, student, max_steps=4, save_strategy="steps", save_steps=1,
                         learning_rate=0.05, log_completions=True)  # fmt: skip
    t.train()
    out = Path(t.args.output_dir)
    eos = served.tokenizer.eos_token_id
    logged = check_against_checkpoints(out, tmp_path / "initial", served.folder, eos)
    assert [r["step"] for r in logged] == sorted(r["step"] for r in logged)
    assert {r["step"] for r in logged} == {1, 2, 3, 4}
    assert all(r["policy_step"] == r["step"] - 1 for r in logged)  # synced every optimizer step
    assert lagging_rows_differ(logged, out, tmp_path / "initial", served.folder, eos, lora=True)
    assert len(logged) == 4 + 1 + 4 + 1  # 5 rows in batches of 4: every row of every step is on-policy
    row = logged[0]
    assert set(row) == {"step", "policy_step", "prompt_ids", "completion_ids", "prompt", "completion"}
    assert row["prompt"] == served.tokenizer.decode(row["prompt_ids"], skip_special_tokens=False)
    assert row["completion"] == served.tokenizer.decode(row["completion_ids"], skip_special_tokens=False)
    assert all(len(r["completion_ids"]) == NEW or r["completion_ids"][-1] == eos for r in logged)
    sampler = t._policy.sampler
    assert sampler.kind == "lora" and len(sampler.sync_seconds) == 4
    # training ended: the last adapter is unloaded, only the newest sync folder was kept
    assert set(VLLMClient(served.url).models()) == {served.model}
    assert [p.name for p in (out / "vllm-sync").iterdir()] == ["step-3"]


def test_vllm_samples_equal_the_generate_path(vllm_lora_server, tmp_path):
    """Same weights, greedy, lmbda 0.5 over four micro-batches: the same micro-batches are rewritten, with identical
    rows, labels, attention masks and padding; completions end at the first EOS (kept)."""
    served = vllm_lora_server
    student = lora_student(served.folder, init=False, seed=3)  # a non-trivial adapter
    tok = copy.deepcopy(served.tokenizer)
    prompts = [[tok.bos_token_id, *tok(p, add_special_tokens=False)["input_ids"]] for p in PROMPTS]
    free = [greedy(student, p, eos=None) for p in prompts]  # no EOS: pick one that cuts a completion short
    cut = next(c[2] for c in free if c[2] not in c[:2])
    tok.eos_token = tok.convert_ids_to_tokens(cut)
    via_vllm = onpolicy_trainer(tmp_path / "v", served, copy.deepcopy(student), tok, lmbda=0.5)
    via_generate = onpolicy_trainer(tmp_path / "g", served, copy.deepcopy(student), tok, lmbda=0.5, use_vllm=False)
    loader = via_generate.get_train_dataloader()
    batches = [*loader, *loader]  # 4 micro-batches: 4, 1, 4 and 1 rows
    got_v, n_v = via_vllm.get_batch_samples(iter(batches), 4, via_vllm.args.device)
    got_g, n_g = via_generate.get_batch_samples(iter(batches), 4, via_generate.args.device)
    assert via_vllm._policy.num_student_batches == via_generate._policy.num_student_batches
    assert 0 < via_vllm._policy.num_student_batches < 4  # some rewritten, some kept
    assert int(n_v) == int(n_g)
    ended = 0
    for a, b, original in zip(got_v, got_g, batches):
        assert set(a) == set(b)
        for key in a:
            assert torch.equal(a[key], b[key]), key
        if a is not original:
            for ids, mask, labels in zip(a["input_ids"], a["attention_mask"], a["labels"]):
                completion = labels[labels != -100].tolist()
                assert ids[mask.bool()].tolist()[-len(completion) :] == completion
                assert len(completion) == NEW or completion[-1] == cut
                ended += completion[-1] == cut and len(completion) < NEW
    assert ended > 0  # the EOS cut happened and was kept
    via_vllm._policy.close()  # what the end of training does: the adapter is unloaded
    assert set(VLLMClient(served.url).models()) == {served.model}


def test_sync_interval_and_overlap_lag(vllm_lora_server, tmp_path):
    served = vllm_lora_server
    eos = served.tokenizer.eos_token_id
    for name, fields, expected in [
        ("every2", {"vllm_sync_steps": 2}, lambda s: 2 * ((s - 1) // 2)),
        ("overlap", {"vllm_overlap_generation": True}, lambda s: max(0, s - 2)),
    ]:
        student = lora_student(served.folder)
        student.save_pretrained(tmp_path / name / "initial")
        # batches of 1 row: the 4 steps lie in one epoch (no read-ahead crosses an epoch: each starts in step)
        t = onpolicy_trainer(tmp_path / name, served, student, max_steps=4, save_strategy="steps", save_steps=1,
                             learning_rate=0.05, log_completions=True, per_device_train_batch_size=1,
                             **fields)  # fmt: skip
        t.train()
        out = Path(t.args.output_dir)
        logged = check_against_checkpoints(out, tmp_path / name / "initial", served.folder, eos)
        assert {r["step"] for r in logged} == {1, 2, 3, 4}, name
        assert all(r["policy_step"] == expected(r["step"]) for r in logged), (name, logged)
        assert len(t._policy.sampler.sync_seconds) == (2 if name == "every2" else 4)


SCRIPT = Path(__file__).resolve().parent / "distributed" / "vllm_onpolicy.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


@pytest.mark.distributed
def test_two_processes_sample_from_the_adapter_the_main_process_pushed(vllm_lora_server, tmp_path):
    """Only the main process writes and loads each adapter; both processes sample their own rows from it (the
    barrier): every row of either process equals PEFT greedy of the previous checkpoint, and 2 processes x batch 2
    give the losses of 1 process x batch 4."""
    served = vllm_lora_server
    args = [served.url, str(served.folder)]
    run_processes([sys.executable, str(SCRIPT), str(tmp_path / "one"), *args, "--batch_size", "4"])
    run_processes([*TORCHRUN, str(SCRIPT), str(tmp_path / "two"), *args, "--batch_size", "2"])
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["loss"] == pytest.approx(two["loss"], abs=1e-5)
    assert one["served"] == two["served"] == [served.model]  # the last adapter was unloaded
    eos = served.tokenizer.eos_token_id
    logged = check_against_checkpoints(tmp_path / "two" / "run", tmp_path / "two" / "initial", served.folder, eos)
    key = lambda r: (r["step"], r["prompt_ids"], r["completion_ids"])  # noqa: E731
    assert sorted(map(key, logged)) == sorted(map(key, read_completions(str(tmp_path / "one" / "run"))))
    assert len(logged) == 8 and {r["step"] for r in logged} == {1, 2}


# ---------------------------------------------------------------------------------------------- full parameters


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory, _vllm_lora_session):
    """The tiny Llama served without LoRA and with `VLLM_SERVER_DEV_MODE=1` (in-place weight reloads)."""
    folder = tmp_path_factory.mktemp("vllm-dev") / "tiny-llama"
    save_tiny_llama(folder, _vllm_lora_session.tokenizer)
    server = VLLMServer(folder, served_model_name="tiny-llama", lora=False, env={"VLLM_SERVER_DEV_MODE": "1"},
                        log_path=folder.parent / "server.log")  # fmt: skip
    try:
        server.start()
        yield _vllm_lora_session._replace(url=server.url, folder=folder, server=server)
    finally:
        server.stop()


def test_full_parameter_student_syncs_by_reloading_weights(dev_server, tmp_path):
    served = dev_server
    student = base_model(served.folder)
    student.save_pretrained(tmp_path / "initial")
    t = onpolicy_trainer(tmp_path, served, student, max_steps=3, save_strategy="steps", save_steps=1,
                         learning_rate=0.01, log_completions=True)  # fmt: skip
    t.train()
    out, eos = Path(t.args.output_dir), served.tokenizer.eos_token_id
    logged = check_against_checkpoints(out, tmp_path / "initial", served.folder, eos, lora=False)
    assert all(r["policy_step"] == r["step"] - 1 for r in logged)
    assert lagging_rows_differ(logged, out, tmp_path / "initial", served.folder, eos, lora=False)
    assert t._policy.sampler.kind == "full"


def test_full_parameter_student_needs_a_dev_mode_server(vllm_lora_server, tmp_path):
    t = onpolicy_trainer(tmp_path, vllm_lora_server, base_model(vllm_lora_server.folder), max_steps=1)
    with pytest.raises(VLLMClientError, match=r"VLLM_SERVER_DEV_MODE=1") as err:
        t.train()
    assert vllm_lora_server.url in str(err.value)


# ---------------------------------------------------------------------------------------------- faults


def test_server_down_and_refused_adapter_stop_with_the_servers_name(vllm_lora_server, tmp_path):
    down = vllm_lora_server._replace(url=f"http://127.0.0.1:{free_port()}")
    t = onpolicy_trainer(tmp_path / "down", down, lora_student(vllm_lora_server.folder), max_steps=1)
    with pytest.raises(VLLMClientError, match=r"could not load .*failed 2 times; last failure: Connect") as err:
        t.train()
    assert down.url in str(err.value)
    # rank 16 > the server's --max-lora-rank 8: every load fails (HTTP 500 from vLLM 0.32), is retried once, then
    # the run stops
    t = onpolicy_trainer(tmp_path / "rank", vllm_lora_server, lora_student(vllm_lora_server.folder, r=16), max_steps=1)
    failed = r"could not load the student's weights from .*failed 2 times.*LoRA rank 16 is greater than max_lora_rank"
    with pytest.raises(VLLMClientError, match=failed) as err:
        t.train()
    assert vllm_lora_server.url in str(err.value) and "max-lora-rank" in str(err.value)
    assert set(VLLMClient(vllm_lora_server.url).models()) == {vllm_lora_server.model}  # the server is fine


def test_partial_completions_and_timeouts_are_errors(tmp_path):
    def reply(request):
        return {"choices": [{"index": i, "token_ids": [7, 8], "prompt_token_ids": p}
                            for i, p in enumerate(request["prompt"])]}  # fmt: skip

    def sampler_for(server, **kw):
        client = VLLMClient(server.url, model="m", vocab_size=64, backoff=0.01, max_retries=1, **kw)
        sampler = VLLMStudentSampler(client, str(tmp_path), max_new_tokens=NEW, eos_token_ids=[3])
        sampler.model_name = "m"  # as after a sync
        return sampler

    partial = pytest.raises(VLLMReplyError, match="stopped after 2 of 6 tokens without EOS.*never trained on")
    with ScriptedServer([(200, reply, {}, 0)]) as server, partial:
        sampler_for(server).sample([[2, 9, 10]])
    ended = {"choices": [{"index": 0, "token_ids": [7, 3], "prompt_token_ids": [2, 9]}]}
    with ScriptedServer([(200, ended, {}, 0)]) as server:
        assert sampler_for(server).sample([[2, 9]]) == [[7, 3]]  # ended by EOS: complete
    timeout = pytest.raises(VLLMClientError, match=r"/v1/completions failed 2 times; last failure: timed out")
    with ScriptedServer([(200, ended, {}, 1.0)]) as server, timeout as err:
        sampler_for(server, timeout=0.2).sample([[2, 9]])
    assert server.url in str(err.value)


def test_config_checks(tmp_path):
    for fields, message in [
        ({"use_vllm": True, "lmbda": 0.0}, r"`use_vllm` draws the on-policy samples .* set `lmbda` > 0"),
        ({"use_vllm": True, "lmbda": 1.0}, r"needs `vllm_server_base_url`"),
        ({"use_vllm": True, "lmbda": 1.0, "vllm_mode": "colocate"}, r"needs vLLM installed in the training venv"),
        ({"vllm_sync_steps": 0}, r"`vllm_sync_steps` must be >= 1"),
        ({"log_completions": True}, r"`log_completions` writes the on-policy samples"),
    ]:
        with pytest.raises(ValueError, match=message):
            distill_config(tmp_path, **fields)
    config = distill_config(tmp_path, use_vllm=True, lmbda=0.5, vllm_server_base_url="http://127.0.0.1:8000")
    assert (config.vllm_mode, config.vllm_sync_steps, config.log_completions) == ("server", 1, False)
    assert json.loads(json.dumps(config.to_dict()))["use_vllm"] is True
