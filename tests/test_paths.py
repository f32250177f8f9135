"""`hf_distill.paths`: a local-looking path that does not exist is named as such, never taken for a Hub id."""

import os

import pytest

from hf_distill.paths import DATA_FILE_EXTENSIONS, check_local_path, looks_local


@pytest.mark.parametrize(
    ("value", "data_file", "local"),
    [
        ("./student", False, True),
        ("../student", False, True),
        ("/models/student", False, True),
        ("~/student", False, True),
        ("runs/student", False, True),  # `runs/` exists (made by the test)
        ("HuggingFaceTB/SmolLM2-135M", False, False),
        ("smollm2", False, False),
        ("gpt2", False, False),
        ("data.jsonl", True, True),
        ("data.CSV", True, True),
        ("data.jsonl", False, False),  # a model named so is a Hub id
        ("stanfordnlp/imdb", True, False),
        ("esnli", True, False),
    ],
)
def test_looks_local(value, data_file, local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert looks_local(value, data_file) is local


def test_check_local_path_names_the_argument_and_the_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "student").mkdir(parents=True)
    (tmp_path / "data.jsonl").write_text("{}\n")
    for value in ("runs/student", "./runs/student", str(tmp_path / "runs"), "data.jsonl", "org/model", None):
        check_local_path(value, "--model_name_or_path", data_file=True)  # exists, or a Hub id: nothing raised
    with pytest.raises(FileNotFoundError) as info:
        check_local_path("runs/studnet", "--model_name_or_path")
    message = str(info.value)
    assert message.startswith("--model_name_or_path not found: runs/studnet (a local path")
    assert os.path.join(str(tmp_path), "runs", "studnet") in message and "Hub id" in message
    with pytest.raises(FileNotFoundError, match=r"^--dataset_name not found: missing.jsonl .*Hub dataset id"):
        check_local_path("missing.jsonl", "--dataset_name", data_file=True)
    with pytest.raises(FileNotFoundError, match="not found: "):
        check_local_path(tmp_path / "absent", "model")  # a PathLike too


def test_data_file_extensions_are_the_files_datasets_are_read_from():
    from hf_distill.data.loading import FILE_FORMATS

    assert set(DATA_FILE_EXTENSIONS) == set(FILE_FORMATS)


def test_loaders_name_a_missing_local_path(tmp_path, monkeypatch):
    from hf_distill.data.loading import load_any_dataset
    from hf_distill.models import load_model, load_tokenizer

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="^Dataset not found: missing.jsonl"):
        load_any_dataset("missing.jsonl")
    with pytest.raises(FileNotFoundError, match=r"^Tokenizer not found: \./tok"):
        load_tokenizer("./tok")
    with pytest.raises(FileNotFoundError, match=r"^Model not found: \./student"):
        load_model("./student")
