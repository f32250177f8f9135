"""Loading datasets the way users name them: a Hub id, a local JSON/JSONL/CSV/Parquet file or a
`save_to_disk` folder."""

import json
import os

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from ..paths import check_local_path


FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def load_any_dataset(
    name_or_path: str, config: str | None = None, split: str | None = "train"
) -> Dataset | DatasetDict:
    """Load a dataset by Hub id, local data file, or `save_to_disk` folder.

    Args:
        name_or_path (`str`): Hub id (e.g. `"esnli"`), a file ending in .json/.jsonl/.csv/.parquet/.txt, or a folder
            written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`.
        config (`str`, *optional*): Hub dataset config name.
        split (`str`, *optional*): split to return; None returns every split as a `DatasetDict`.
    """
    if os.path.isdir(name_or_path) and (
        os.path.exists(os.path.join(name_or_path, "dataset_info.json"))
        or os.path.exists(os.path.join(name_or_path, "dataset_dict.json"))
    ):
        data = load_from_disk(name_or_path)
        if isinstance(data, DatasetDict) and split is not None:
            if split not in data:
                raise ValueError(f"Split {split!r} not in {name_or_path} (splits: {list(data)}).")
            return data[split]
        return data
    ext = os.path.splitext(name_or_path)[1].lower()
    if os.path.isfile(name_or_path):
        if ext not in FILE_FORMATS:
            raise ValueError(f"Cannot read {name_or_path}: supported files end in {sorted(FILE_FORMATS)}.")
        if os.path.getsize(name_or_path) == 0:
            raise ValueError(f"{name_or_path} is empty (0 bytes): it has no rows. Point to a file with data.")
        try:
            data = load_dataset(FILE_FORMATS[ext], data_files=name_or_path, split="train")
        except Exception as err:
            problem = json_file_problem(name_or_path) if FILE_FORMATS[ext] == "json" else None
            if problem is None:
                raise ValueError(f"Cannot read {name_or_path}: {type(err).__name__}: {err}") from err
            raise ValueError(problem) from None  # one clear line instead of datasets' chained traceback
        if len(data) == 0:
            raise ValueError(
                f"{name_or_path} has no rows (only blank lines or an empty list). Point to a file with data."
            )
        return data if split in (None, "train") else _missing_split(name_or_path, split)
    check_local_path(name_or_path, "Dataset", data_file=True)  # else datasets asks the Hub for a missing local file
    return load_dataset(name_or_path, config, split=split)


def json_file_problem(path: str) -> str | None:
    """What makes a .json / .jsonl file unreadable as rows, naming the file and line, or None if nothing is found.

    A file is fine as one JSON list (or object of columns), or as one JSON object per line (JSON Lines).
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if not text.strip():
        return f"{path} is empty (only whitespace): it has no rows. Point to a file with data."
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if whole in ([], {}):
        return f"{path} holds an empty JSON {type(whole).__name__}: it has no rows. Point to a file with data."
    if isinstance(whole, list | dict):
        return (
            None
            if isinstance(whole, dict) or all(isinstance(r, dict) for r in whole)
            else (f"{path}: a JSON list whose items are not all objects (rows must be {{column: value}} objects).")
        )
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            return (
                f"{path}, line {number}: not valid JSON ({err.msg} at column {err.colno}): {line.strip()[:80]!r}. "
                "Each line of a JSON Lines file must be one complete JSON object; fix or remove that line."
            )
        if not isinstance(row, dict):
            return f"{path}, line {number}: a JSON {type(row).__name__}, not an object ({{column: value}} per line)."
    return None


def _missing_split(path: str, split: str) -> Dataset:
    raise ValueError(f"{path} is a single data file (one 'train' split); pass it as its own dataset for {split!r}.")
