"""Loading datasets the way users name them: a Hub id, a local JSON/JSONL/CSV/Parquet file or a
`save_to_disk` folder."""

import os

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk


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
        data = load_dataset(FILE_FORMATS[ext], data_files=name_or_path, split="train")
        return data if split in (None, "train") else _missing_split(name_or_path, split)
    return load_dataset(name_or_path, config, split=split)


def _missing_split(path: str, split: str) -> Dataset:
    raise ValueError(f"{path} is a single data file (one 'train' split); pass it as its own dataset for {split!r}.")
