"""Pieces shared by the resumable offline jobs (rationale generation, API-teacher requests, ...): the settings record
that decides whether earlier work in an output folder can be reused."""

import json
import os
from typing import Any


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
