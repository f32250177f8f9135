"""Several datasets with weights in one recipe, in TRL's own mixture format (`trl.DatasetMixtureConfig`), plus a
per-dataset `rename_columns`, so datasets with different column names train together:

```yaml
datasets:
  - path: ../shared/data/svamp/train.jsonl        # a Hub id, a local data file or a save_to_disk folder
    rename_columns: {question: prompt, equation: completion}
    fraction: 0.3
  - path: ../shared/data/esnli/train.jsonl
    columns: [premise, explanation_1]              # TRL's column selection, applied after the renames
    rename_columns: {premise: prompt, explanation_1: completion}
    fraction: 0.7
test_split_size: 0.05                              # optional: hold out a random share for evaluation
```

`fraction` follows TRL (`trl.scripts.utils.get_dataset`): the shares are normalised to sum to one and the mixture is
as large as it can be without repeating a row of any dataset. One difference: TRL keeps the first rows of each
dataset, which takes a biased slice of a sorted file; here each dataset is shuffled with the run's seed first.
"""

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from trl.scripts.utils import DatasetConfig, DatasetMixtureConfig


if TYPE_CHECKING:  # `datasets` is imported when a mixture loads, not by `hf-distill train --help`
    from datasets import Dataset, DatasetDict


@dataclass
class MixtureDataset(DatasetConfig):
    """One dataset of a mixture: TRL's `DatasetConfig` fields (`path`, `name`, `data_dir`, `data_files`, `split`,
    `columns`, `fraction`) plus `rename_columns`, `{old: new}`, applied before `columns` selects."""

    rename_columns: dict[str, str] | str | None = None


@dataclass
class DatasetMixtureArguments(DatasetMixtureConfig):
    """TRL's `DatasetMixtureConfig` with `MixtureDataset` entries (per-dataset `rename_columns`)."""

    datasets: list[MixtureDataset] = field(
        default_factory=list,
        metadata={
            "help": "Several datasets trained together, as a YAML list of {path, name, data_dir, data_files, split, "
            "columns, fraction, rename_columns} (TRL's mixture format; `fraction`: each dataset's share). Replaces "
            "`dataset_name`."
        },
    )

    def __post_init__(self) -> None:
        entries = json.loads(self.datasets) if isinstance(self.datasets, str) else self.datasets
        self.datasets = [MixtureDataset(**entry) if isinstance(entry, dict) else entry for entry in entries or []]
        from ..validation import check_mixture_fractions

        check_mixture_fractions([entry.fraction for entry in self.datasets])


def _load_one(entry: MixtureDataset) -> "Dataset":
    from datasets import load_dataset

    from .loading import FILE_FORMATS, load_any_dataset

    local = os.path.exists(entry.path) or os.path.splitext(entry.path)[1].lower() in FILE_FORMATS
    if entry.data_files is None and entry.data_dir is None and local:
        return load_any_dataset(entry.path, entry.name, entry.split)
    return load_dataset(
        entry.path, entry.name, data_dir=entry.data_dir, data_files=entry.data_files, split=entry.split
    )


def _prepared(entry: MixtureDataset, index: int) -> "Dataset":
    dataset = _load_one(entry)
    mapping = json.loads(entry.rename_columns) if isinstance(entry.rename_columns, str) else entry.rename_columns
    where = f"datasets[{index}] ({entry.path})"
    if mapping:
        missing = sorted(set(mapping) - set(dataset.column_names))
        if missing:
            raise ValueError(
                f"{where}: rename_columns names {missing}, absent from its columns {dataset.column_names}."
            )
        dataset = dataset.rename_columns(mapping)
    if entry.columns is not None:
        missing = sorted(set(entry.columns) - set(dataset.column_names))
        if missing:
            raise ValueError(
                f"{where}: columns names {missing}, absent from its columns {dataset.column_names} (after "
                "rename_columns, which is applied first)."
            )
        dataset = dataset.select_columns(entry.columns)
    return dataset


def mixture_sizes(lengths: list[int], fractions: list[float | None]) -> list[int]:
    """Rows taken from each dataset: all of them without fractions; with fractions (all or none set), the shares
    normalised to one and the largest total that repeats no row (TRL's rule).

    Args:
        lengths (`list[int]`): rows of each dataset. fractions (`list[float | None]`): each dataset's share.

    Returns:
        `list[int]`: rows to take from each, in order.
    """
    if all(f is None for f in fractions):
        return list(lengths)
    if any(f is None for f in fractions):
        raise ValueError("`fraction` must be set for every dataset of the mixture or for none of them.")
    if any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"Every `fraction` must be >= 0 and at least one > 0, got {fractions}.")
    weights = [f / sum(fractions) for f in fractions]
    total = min(n / w for n, w in zip(lengths, weights, strict=True) if w > 0)
    return [min(n, round(w * total)) for n, w in zip(lengths, weights, strict=True)]


def load_mixture(mixture: DatasetMixtureArguments, seed: int = 42) -> "DatasetDict":
    """The mixture as one `train` split (and a `test` split with `test_split_size`).

    Each dataset is loaded (`load_any_dataset` for local paths, `datasets.load_dataset` otherwise), renamed, its
    columns selected, shuffled with `seed` and cut to its share (`mixture_sizes`); the parts are concatenated and
    shuffled once more. Every part must end with the same columns; a mismatch names each dataset's columns.

    Args:
        mixture (`DatasetMixtureArguments`): the parsed `datasets` list, `streaming`, `test_split_size`.
        seed (`int`): the run's seed (shuffles and the test split).
    """
    from datasets import DatasetDict, concatenate_datasets

    if mixture.streaming:
        raise ValueError("`streaming: true` is not supported for dataset mixtures yet; drop it.")
    if not mixture.datasets:
        raise ValueError("`datasets` is empty: list at least one dataset, or use `dataset_name`.")
    parts = [_prepared(entry, i) for i, entry in enumerate(mixture.datasets)]
    columns = [sorted(p.column_names) for p in parts]
    if any(c != columns[0] for c in columns):
        listing = "; ".join(
            f"datasets[{i}] ({e.path}): {c}" for i, (e, c) in enumerate(zip(mixture.datasets, columns))
        )
        raise ValueError(
            f"The datasets of the mixture end with different columns ({listing}). Map them onto the same names with "
            "each dataset's `rename_columns`, and keep only those with `columns`."
        )
    sizes = mixture_sizes([len(p) for p in parts], [e.fraction for e in mixture.datasets])
    try:
        combined = concatenate_datasets([p.shuffle(seed=seed).select(range(n)) for p, n in zip(parts, sizes)])
    except ValueError as err:  # same names, different types (e.g. an int label and a string label)
        features = "; ".join(f"datasets[{i}]: {p.features}" for i, p in enumerate(parts))
        raise ValueError(f"The datasets of the mixture have columns of different types ({features}): {err}") from None
    combined = combined.shuffle(seed=seed)
    if mixture.test_split_size is not None:
        return combined.train_test_split(test_size=mixture.test_split_size, seed=seed)
    return DatasetDict({"train": combined})
