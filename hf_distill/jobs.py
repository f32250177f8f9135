"""Pieces shared by the resumable offline jobs (rationale generation, API-teacher requests, ...): the settings record
that decides whether earlier work in an output folder can be reused."""

import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any


logger = logging.getLogger(__name__)


def check_or_record_settings(path: str, settings: dict[str, Any], what: str) -> None:
    """Record a job's `settings` at `path` (JSON, written atomically), or check them against the recorded ones.

    A resumed job must run with the settings its earlier output was made with; otherwise its rows would mix two
    different jobs.

    Args:
        path (`str`): the settings file.
        settings (`dict`): JSON-serialisable settings that decide the output.
        what (`str`): what the folder holds, for the error message (e.g. "rationales").

    Raises:
        `ValueError`: the recorded settings differ; names each differing key as (before, now).
    """
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        differ = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if differ:
            raise ValueError(
                f"{path} holds {what} made with other settings ({differ}, as (before, now)); pass the same "
                "settings to resume, or use a new output folder."
            )
        return
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2)
    os.replace(tmp, path)


def read_appended_records(path: str, parse: Callable[[dict], Any]) -> Iterator[tuple[int, Any]]:
    """`(line number, parse(record))` for each JSON line of a file a job appends to (missing file: nothing).

    A line cut short by a kill, or one `parse` rejects (`KeyError`, `TypeError`, `ValueError`, `AttributeError`), is
    skipped with a warning: its work is redone.

    Args:
        path (`str`): the JSON-lines file.
        parse (`Callable[[dict], Any]`): turns one record into what the job keeps.
    """
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                parsed = parse(json.loads(line))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                logger.warning("Skipping unreadable line %d of %s (an interrupted write); it is redone.", number, path)
                continue
            yield number, parsed
