"""Dataset mixtures (`datasets:` in a recipe, TRL's mixture format plus per-dataset `rename_columns`)."""

import json

import pytest
from conftest import make_llama, make_tokenizer
from test_cli import train_argv

from hf_distill.cli.main import main
from hf_distill.data.mixture import DatasetMixtureArguments, load_mixture, mixture_sizes


def write_rows(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


@pytest.fixture
def two_files(tmp_path):
    a = write_rows(tmp_path / "a.jsonl", [{"question": f"qa{i}", "equation": f"ea{i}"} for i in range(10)])
    b = write_rows(
        tmp_path / "b.jsonl", [{"premise": f"pb{i}", "explanation_1": f"xb{i}", "label": i % 3} for i in range(30)]
    )
    return a, b


def entries(a, b, fractions=(0.25, 0.75)):
    return [
        {"path": a, "rename_columns": {"question": "prompt", "equation": "completion"}, "fraction": fractions[0]},
        {
            "path": b,
            "rename_columns": {"premise": "prompt", "explanation_1": "completion"},
            "columns": ["prompt", "completion"],
            "fraction": fractions[1],
        },
    ]


@pytest.mark.parametrize(
    "lengths, fractions",
    [([10, 30], [0.25, 0.75]), ([10, 30], [0.5, 0.5]), ([100, 7, 40], [1, 1, 2]), ([5, 5], [None, None])],
)
def test_sizes_follow_trls_rule(tmp_path, lengths, fractions):
    """The rows taken from each dataset equal what `trl.scripts.utils.get_dataset` takes for the same fractions."""
    from trl.scripts.utils import DatasetConfig, DatasetMixtureConfig, get_dataset

    configs = []
    for i, n in enumerate(lengths):
        path = write_rows(tmp_path / f"d{i}.jsonl", [{"text": f"d{i}-{j}"} for j in range(n)])
        configs.append(DatasetConfig(path="json", data_files=path, fraction=fractions[i]))
    combined = get_dataset(DatasetMixtureConfig(datasets=configs))["train"]
    trl_counts = [sum(t.startswith(f"d{i}-") for t in combined["text"]) for i in range(len(lengths))]
    assert mixture_sizes(lengths, fractions) == trl_counts


def test_mixture_renames_selects_and_takes_shares(two_files):
    a, b = two_files
    data = load_mixture(DatasetMixtureArguments(datasets=entries(a, b, (0.5, 0.5))), seed=3)
    train = data["train"]
    assert sorted(train.column_names) == ["completion", "prompt"]
    from_a = [p for p in train["prompt"] if p.startswith("qa")]
    from_b = [p for p in train["prompt"] if p.startswith("pb")]
    assert len(from_a) == len(from_b) == 10 and len(train) == 20  # 0.5 / 0.5 of (10, 30): 10 + 10, no row repeated
    assert len(set(from_b)) == 10 and from_b != [f"pb{i}" for i in range(10)]  # shuffled before the cut, not a head
    again = load_mixture(DatasetMixtureArguments(datasets=entries(a, b, (0.5, 0.5))), seed=3)["train"]
    assert again["prompt"] == train["prompt"]  # the seed fixes it


def test_mixture_test_split(two_files):
    data = load_mixture(DatasetMixtureArguments(datasets=entries(*two_files), test_split_size=4), seed=0)
    assert len(data["train"]) == 36 and len(data["test"]) == 4


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda e: e[1].pop("columns"), r"different columns .*datasets\[1\] .*'label'"),
        (lambda e: e[0]["rename_columns"].update(missing="x"), r"datasets\[0\] .*rename_columns names \['missing'\]"),
        (lambda e: e[1].update(columns=["prompt", "nope"]), r"datasets\[1\] .*columns names \['nope'\]"),
        (lambda e: e[0].update(fraction=None), r"`fraction` must be set for every dataset"),
    ],
)
def test_mixture_errors_name_the_dataset(two_files, change, message):
    mixture = entries(*two_files)
    change(mixture)
    with pytest.raises(ValueError, match=message):
        load_mixture(DatasetMixtureArguments(datasets=mixture))


@pytest.fixture
def tiny_pair(tmp_path):
    tok = make_tokenizer()
    for name, model in {"teacher": make_llama(4, 64, seed=1), "student": make_llama(2, 32)}.items():
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    return tmp_path


def test_train_from_a_mixture_recipe(tiny_pair, two_files):
    import yaml

    recipe = tiny_pair / "mix.yaml"
    recipe.write_text(yaml.safe_dump({"datasets": entries(*two_files), "test_split_size": 4}))
    out = tiny_pair / "out"
    argv = train_argv(out, "--config", str(recipe), "--model_name_or_path", str(tiny_pair / "student"),
                      "--teacher_model_name_or_path", str(tiny_pair / "teacher"), "--max_steps", "1",
                      "--per_device_train_batch_size", "2", "--save_strategy", "no")  # fmt: skip
    main(argv)
    assert (out / "model.safetensors").exists()
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert [d["fraction"] for d in saved["datasets"]] == [0.25, 0.75] and saved["test_split_size"] == 4
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 1


def test_mixture_and_dataset_name_together_are_refused(tiny_pair, two_files, capsys):
    import yaml

    recipe = tiny_pair / "mix.yaml"
    recipe.write_text(yaml.safe_dump({"datasets": entries(*two_files), "dataset_name": two_files[0]}))
    with pytest.raises(SystemExit) as exit_info:
        main(train_argv(tiny_pair / "out", "--config", str(recipe), "--max_steps", "1"))
    assert exit_info.value.code != 0
    assert "Pass either `dataset_name` or `datasets` (a mixture)" in capsys.readouterr().err
