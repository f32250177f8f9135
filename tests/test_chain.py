"""`hf-distill chain`: stages where each student teaches the next, resumable by stage, one card per stage."""

import json

import pytest
import torch
import yaml
from conftest import make_llama, make_tokenizer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_distill.cli.chain import MARKER, SETTINGS_FILE, STOP_AFTER_ENV, ChainInterrupted, load_chain
from hf_distill.cli.main import main


@pytest.fixture
def chain_files(tmp_path):
    tok = make_tokenizer()
    make_llama(4, 32, seed=1).save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    rows = [{"text": t} for t in ["the cat sat on the mat", "a dog ran fast", "one plus two equals three"] * 4]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return tmp_path


def write_chain(folder, out, **changes):
    chain = {
        "output_dir": str(out),
        "teacher_model_name_or_path": str(folder / "teacher"),
        "defaults": {
            "dataset_name": str(folder / "data.jsonl"),
            "max_steps": 2,
            "per_device_train_batch_size": 2,
            "learning_rate": 1e-2,
            "report_to": "none",
            "use_cpu": True,
            "save_strategy": "no",
            "kd_weight": 0.6,
            "ce_weight": 0.4,
        },
        "stages": [{"name": "assistant", "student_num_layers": 3}, {"name": "student", "student_num_layers": 2}],
        **changes,
    }
    path = folder / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(chain))
    return path


def test_two_stage_chain_killed_between_stages_resumes_to_the_same_weights(chain_files, monkeypatch):
    straight = chain_files / "straight"
    main(["chain", "--config", str(write_chain(chain_files, straight))])
    resumed = chain_files / "resumed"
    config = write_chain(chain_files, resumed)
    monkeypatch.setenv(STOP_AFTER_ENV, "1")
    with pytest.raises(ChainInterrupted):
        main(["chain", "--config", str(config)])
    assert (resumed / "stage0_assistant" / MARKER).exists() and not (resumed / "stage1_student").exists()
    written = (resumed / "stage0_assistant" / "model.safetensors").stat().st_mtime_ns
    monkeypatch.delenv(STOP_AFTER_ENV)
    main(["chain", "--config", str(config)])
    assert (resumed / "stage0_assistant" / "model.safetensors").stat().st_mtime_ns == written  # skipped, not redone
    for stage, layers in (("stage0_assistant", 3), ("stage1_student", 2)):
        a, b = load_file(straight / stage / "model.safetensors"), load_file(resumed / stage / "model.safetensors")
        assert set(a) == set(b)
        for key in a:
            assert torch.equal(a[key], b[key]), (stage, key)
        assert AutoModelForCausalLM.from_pretrained(resumed / stage).config.num_hidden_layers == layers
    cards = [(resumed / s / "README.md").read_text() for s in ("stage0_assistant", "stage1_student")]
    assert f"This model's teacher: `{chain_files / 'teacher'}`" in cards[0]
    assert f"This model's teacher: `{resumed / 'stage0_assistant'}`" in cards[1]
    assert "Stage 2 of 2" in cards[1] and cards[1].count("## Teacher-assistant chain") == 1
    recipe = yaml.safe_load((resumed / "stage1_student" / "recipe.yaml").read_text())
    assert recipe["teacher_model_name_or_path"] == str(resumed / "stage0_assistant")


def test_changed_settings_and_bad_chains_are_refused(chain_files, capsys):
    out = chain_files / "c"
    main(["chain", "--config", str(write_chain(chain_files, out, stages=[{"student_num_layers": 2}]))])
    assert (out / SETTINGS_FILE).exists() and (out / "stage0_stage0" / MARKER).exists()
    with pytest.raises(SystemExit):
        main(["chain", "--config", str(write_chain(chain_files, out, stages=[{"student_num_layers": 3}]))])
    assert "other settings" in capsys.readouterr().err
    bad = chain_files / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"output_dir": "x", "teacher_model_name_or_path": "t", "stages": [{"output_dir": 1}]})
    )
    with pytest.raises(ValueError, match="the chain decides"):
        load_chain(str(bad))
    bad.write_text(yaml.safe_dump({"output_dir": "x", "teacher_model_name_or_path": "t", "stage": []}))
    with pytest.raises(ValueError, match="unknown chain keys"):
        load_chain(str(bad))


def test_chain_help():
    with pytest.raises(SystemExit) as exit_info:
        main(["chain", "--help"])
    assert exit_info.value.code == 0
