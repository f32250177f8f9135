"""Cards of whole CLI runs, each checked offline against the Hub's metadata spec (`check_card`), naming its teacher,
and each rerun from its card: the `## Reproduce` command, copied verbatim out of README.md into `bash -c` in a fresh
process, must give the same weights (bit-equal, or within 1e-6). Runs: an EMA teacher, a chain stage, a served
teacher, a teacher with another tokenizer, and 2 processes under `accelerate launch`."""

import contextlib
import io
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, make_llama, make_tokenizer, run_processes
from safetensors.torch import load_file

from hf_distill.card_sections import check_card
from hf_distill.cli.main import main


TEXTS = ["the cat sat on the mat", "a dog ran fast", "one plus two equals three", "the red cat is big"] * 2
RUN = dict(max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, report_to="none", use_cpu=True,
           save_strategy="no", seed=0, max_length=32, logging_steps=1)  # fmt: skip
BIN = Path(sys.executable).parent  # `hf-distill` and `accelerate` as a user's shell finds them
RERUN_ENV = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": str(torch.get_num_threads())}


def run_files(tmp_path: Path, teacher_tokenizer=None) -> dict[str, str]:
    """A saved student (2 layers), teacher (4 layers, with `teacher_tokenizer` if given) and `data.jsonl`; each
    model's vocabulary is its tokenizer's."""
    tok = make_tokenizer()
    teacher_tok = teacher_tokenizer or tok
    make_llama(2, 32, vocab_size=len(tok)).save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")
    make_llama(4, 64, vocab_size=len(teacher_tok), seed=1).save_pretrained(tmp_path / "teacher")
    teacher_tok.save_pretrained(tmp_path / "teacher")
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    return {"student": str(tmp_path / "student"), "teacher": str(tmp_path / "teacher"),
            "data": str(tmp_path / "data.jsonl")}  # fmt: skip


def write_yaml(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def reproducing_command(card: str) -> str:
    """The command of the card's `## Reproduce` section, as written."""
    match = re.search(r"## Reproduce\n\n```bash\n(.*?)\n```", card, re.DOTALL)
    assert match, "the card has no Reproduce section"
    return match.group(1)


def rerun_gives_same_weights(card: str, model_file: Path, launcher: bool = False) -> float:
    """Run the card's command verbatim in a fresh shell; returns the largest weight difference (asserted <= 1e-6)."""
    before = load_file(model_file)
    env = RERUN_ENV if not launcher else {"PATH": RERUN_ENV["PATH"]}  # launched runs: 1 thread per process, as before
    run_processes(["bash", "-c", reproducing_command(card)], timeout=600, env=env)
    after = load_file(model_file)
    assert set(before) == set(after)
    worst = max(float((before[k].double() - after[k].double()).abs().max()) for k in before)
    assert worst <= 1e-6, worst
    print(f"{model_file}: rerun from the card, largest weight difference {worst:g}")
    return worst


def test_ema_run(tmp_path):
    """EMA teacher: named as the moving average (not "none"), a model-index of the held-out loss, local data named in
    the body only, a usage snippet that runs, and a reproducing command that reruns the run."""
    files = run_files(tmp_path)
    out = tmp_path / "ema"
    config = write_yaml(tmp_path / "ema.yaml", model_name_or_path=files["student"], dataset_name=files["data"],
                        eval_dataset_name=files["data"], eval_strategy="steps", eval_steps=2,
                        teacher_ema_decay=0.5, kd_weight=0.5, ce_weight=0.5, output_dir=str(out), **RUN)  # fmt: skip
    main(["train", "--config", str(config)])
    card = (out / "README.md").read_text()
    meta = check_card(card)
    assert "- **Teacher:** an exponential moving average of the student itself (`teacher_ema_decay: 0.5`" in card
    assert meta.datasets is None and "local data `data.jsonl` (not on the Hub)" in card
    assert meta.pipeline_tag == "text-generation" and {r.metric_type for r in meta.eval_results} >= {"loss"}
    snippet = re.search(r"## Usage\n\n```python\n(.*?)\n```", card, re.DOTALL).group(1)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(snippet, {})  # noqa: S102 (the card's own usage snippet, loading this run's folder)
    assert "generated_text" in printed.getvalue()
    assert reproducing_command(card) == f"hf-distill train --config {config}"
    rerun_gives_same_weights(card, out / "model.safetensors")


def test_chain_stage(tmp_path):
    """A chain stage's card: its teacher is the previous stage's folder, and its command is the chain's plus
    `--stage 2`, which trains that stage alone again (the first stage is left as it was)."""
    files = run_files(tmp_path)
    chain = write_yaml(tmp_path / "chain.yaml", output_dir=str(tmp_path / "c"),
                       teacher_model_name_or_path=files["teacher"], defaults={"dataset_name": files["data"], **RUN},
                       stages=[{"name": "assistant", "student_num_layers": 3},
                               {"name": "student", "student_num_layers": 2}])  # fmt: skip
    main(["chain", "--config", str(chain)])
    first, second = tmp_path / "c" / "stage0_assistant", tmp_path / "c" / "stage1_student"
    card = (second / "README.md").read_text()
    check_card(card)
    assert f"- **Teacher:** `{first}` (fingerprint " in card and f"This model's teacher: `{first}`." in card
    assert reproducing_command(card) == f"hf-distill chain --config {chain} --stage 2"
    assert reproducing_command((first / "README.md").read_text()).endswith("--stage 1")
    written = (first / "model.safetensors").stat().st_mtime_ns
    rerun_gives_same_weights(card, second / "model.safetensors")
    assert (first / "model.safetensors").stat().st_mtime_ns == written
    assert (second / "README.md").read_text().count("## Teacher-assistant chain") == 1


def test_served_teacher_run(tmp_path):
    """A served teacher (a vLLM-shaped server on 127.0.0.1): the card names the served model and how it was served,
    never the URL; the command (its recipe file holds the URL) reruns the run against the same server."""
    from test_served_teacher import ModelServer

    files = run_files(tmp_path)
    tok = make_tokenizer()
    server = ModelServer(make_llama(4, 64, vocab_size=len(tok), seed=1), tok, "tiny-teacher")
    try:
        out = tmp_path / "served"
        config = write_yaml(tmp_path / "served.yaml", model_name_or_path=files["student"], dataset_name=files["data"],
                            teacher_api_base=[server.url], teacher_api_model=["tiny-teacher"], teacher_api_top_k=8,
                            output_dir=str(out), **RUN)  # fmt: skip
        main(["train", "--config", str(config)])
        card = (out / "README.md").read_text()
        check_card(card)
        assert ("- **Teacher:** `tiny-teacher`, served over an OpenAI-compatible HTTP API (one server, on this "
                "machine), top-8 log-probs per position") in card  # fmt: skip
        port = server.url.rsplit(":", 1)[1]
        assert server.url not in card and "127.0.0.1" not in card and port not in card
        assert "teacher_api_base: <not recorded in the card>" in card
        rerun_gives_same_weights(card, out / "model.safetensors")
    finally:
        server.close()


def test_cross_tokenizer_run(tmp_path):
    """A teacher with another tokenizer: the card names the teacher, its own tokenizer and the loss."""
    from test_cross_tokenizer_teacher import bpe_teacher_tokenizer

    files = run_files(tmp_path, teacher_tokenizer=bpe_teacher_tokenizer())
    out = tmp_path / "cross"
    config = write_yaml(tmp_path / "cross.yaml", model_name_or_path=files["student"], dataset_name=files["data"],
                        teacher_model_name_or_path=files["teacher"], cross_tokenizer_loss="uld",
                        output_dir=str(out), **RUN)  # fmt: skip
    main(["train", "--config", str(config)])
    card = (out / "README.md").read_text()
    check_card(card)
    teacher = files["teacher"]
    assert f"- **Teacher:** `{teacher}` (fingerprint " in card
    assert f"read with its own tokenizer `{teacher}` ({len(bpe_teacher_tokenizer())} tokens); cross-tokenizer loss " \
           "`uld`" in card  # fmt: skip
    rerun_gives_same_weights(card, out / "model.safetensors")


@pytest.mark.distributed
def test_two_process_run_under_accelerate_launch(tmp_path):
    """`accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml` (2 CPU processes; `accelerate launch --cpu
    --num_processes 2` starts one process without MPI): the card's command is the launcher with its config file, and
    rerun it again runs 2 processes and gives the same weights."""
    files = run_files(tmp_path)
    out = tmp_path / "two"
    config = write_yaml(tmp_path / "two.yaml", model_name_or_path=files["student"], dataset_name=files["data"],
                        teacher_model_name_or_path=files["teacher"], output_dir=str(out),
                        **{**RUN, "save_strategy": "steps", "save_steps": 2})  # fmt: skip
    launch = REPO / "recipes" / "accelerate" / "cpu_2proc.yaml"
    run_processes([str(BIN / "accelerate"), "launch", "--config_file", str(launch), "-m", "hf_distill.cli.main",
                   "train", "--config", str(config)], timeout=600, env={"PATH": RERUN_ENV["PATH"]})  # fmt: skip
    assert (out / "checkpoint-2" / "rng_state_1.pth").exists()  # a second process really ran
    card = (out / "README.md").read_text()
    check_card(card)
    assert reproducing_command(card) == (
        f"accelerate launch --config_file {launch} -m hf_distill.cli.main train --config {config}")  # fmt: skip
    (out / "checkpoint-2" / "rng_state_1.pth").unlink()
    rerun_gives_same_weights(card, out / "model.safetensors", launcher=True)
    assert (out / "checkpoint-2" / "rng_state_1.pth").exists()
