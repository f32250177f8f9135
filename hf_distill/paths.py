"""Telling a local path that does not exist from a Hub id, for every model, tokenizer and dataset argument.

`transformers` and `datasets` take a string that is not an existing path for a Hub id: a mistyped folder gives
`Repo id must be in the form 'repo_name' or 'namespace/repo_name'`, a missing `x.jsonl` gives `Couldn't reach 'x.jsonl'
on the Hub` (offline) or half a minute of Hub retries (online). `check_local_path` names the argument and the path
instead; the loaders (`models.load_model`, `models.load_tokenizer`, `data.loading.load_any_dataset`) and the CLI
(`cli.recipe_args.check_path_arguments`, every command and every chain stage) call it. Imports nothing heavy.
"""

import os


DATA_FILE_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet", ".txt")  # the files `load_any_dataset` reads


def looks_local(name_or_path: str, data_file: bool = False) -> bool:
    """Whether `name_or_path` can only mean a local path, never a Hub id.

    It does when it starts with `/`, `.` (`./`, `../`) or `~`; when its first component (before the first `/`) is an
    existing folder (`runs/student` with a `runs/` folder here); or, with `data_file`, when it ends in a data-file
    extension (`DATA_FILE_EXTENSIONS`: a Hub dataset id never does).

    Args:
        name_or_path (`str`): the value as given.
        data_file (`bool`): the value names a dataset.
    """
    if name_or_path.startswith((os.sep, "/", ".", "~")):
        return True
    first, sep, _ = name_or_path.partition("/")
    if sep and os.path.isdir(first):
        return True
    return data_file and name_or_path.lower().endswith(DATA_FILE_EXTENSIONS)


def check_local_path(name_or_path: str | os.PathLike | None, argument: str, *, data_file: bool = False) -> None:
    """Raise when `name_or_path` looks like a local path (`looks_local`) and nothing exists there.

    Anything else passes: an existing path, a Hub id (`namespace/name`), a shorthand (`smollm2`), None.

    Args:
        name_or_path (`str` or `os.PathLike`, *optional*): the value of a model, tokenizer or dataset argument.
        argument (`str`): what to call it in the message, e.g. `"--model_name_or_path"` (or `"model"` in the library).
        data_file (`bool`): the argument names a dataset (a name ending in .jsonl, .csv, ... is then a local file).

    Raises:
        `FileNotFoundError`: `"<argument> not found: <path> ..."`, with the absolute path looked at and the fix.
    """
    if name_or_path is None:
        return
    name = os.fspath(name_or_path)
    if not isinstance(name, str) or not looks_local(name, data_file) or os.path.exists(os.path.expanduser(name)):
        return
    where = os.path.abspath(os.path.expanduser(name))
    hub = "a Hub dataset id (`namespace/name`)" if data_file else "a Hub id (`namespace/name`)"
    raise FileNotFoundError(
        f"{argument} not found: {name} (a local path, and nothing exists at {where}). Fix the path (relative paths "
        f"are read from {os.getcwd()}), or give {hub}."
    )


__all__ = ["DATA_FILE_EXTENSIONS", "check_local_path", "looks_local"]
