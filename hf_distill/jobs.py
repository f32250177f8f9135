"""The skeleton the resumable offline jobs share (`cache_teacher`, MiniPLM `score`, `generate_rationales`,
`build_transfer_set`, API-teacher requests): a settings record that decides whether earlier work in an output folder
can be reused, kill-safe writes, which items are done, and splitting the rest over processes.

A job's life, as `ResumableJob` runs it (every process runs the same code on the same inputs):

    job = ResumableJob(output_dir, settings, what="MiniPLM scores", settings_file="state.json", state=PartialState())
    job.check_settings()                           # earlier output made with other settings: a clear error
    todo = job.todo(items, done=finished_ids)      # the same list on every process
    job.wait(); job.record_settings()              # everyone has read the same finished set; main writes the record
    with job.split(todo) as mine:                  # `PartialState.split_between_processes`
        shards = job.shard_writer(shard_dir, ".jsonl")
        for batch in batched(mine, n):
            shards.write_records(work(batch))      # one whole file per flush: a kill loses only unflushed work
    job.wait()                                     # then the main process gathers every process's shards

Kill safety. Every file is written to a temporary name in its folder and renamed (`atomic_path`): a reader sees the
old file or the new one, never half of one (a kill, not a power cut: nothing is fsync'd). Append-only JSON-lines logs
(`AppendLog`) are flushed and fsync'd per append; a line a kill cut short is tolerated (`read_appended_records` skips
it, the log ends it before appending).
"""

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- fingerprint, writes
def fingerprint(obj: Any) -> str:
    """sha256 (hex) of `obj` as canonical JSON (sorted keys; values JSON cannot hold are written with `str`)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to `path` (`.<name>.<random>.tmp`) to write a file or folder to; renamed to `path` when
    the block ends without an error, removed when it raises. A kill leaves at most a stray temporary file, which no
    reader looks at (readers glob for their own suffix)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through `atomic_path`: a kill never leaves a torn file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write `obj` as JSON to `path` through `atomic_path`."""
    write_text_atomic(path, json.dumps(obj, indent=indent))


def batched(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of `size` items of `items` (the last may be shorter); `itertools.batched` from Python 3.12."""
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


# ----------------------------------------------------------------------------------------------- settings
def _differing(
    old: Mapping[str, Any], settings: Mapping[str, Any], keys: Iterable[str], defaults: Mapping[str, Any]
) -> dict[str, tuple[Any, Any]]:
    return {
        key: (old.get(key, defaults.get(key)), settings.get(key, defaults.get(key)))
        for key in keys
        if old.get(key, defaults.get(key)) != settings.get(key, defaults.get(key))
    }


def check_settings(
    path: str | os.PathLike,
    settings: Mapping[str, Any],
    what: str,
    *,
    keys: Iterable[str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    warn_keys: Iterable[str] = (),
) -> None:
    """Check a job's `settings` against those recorded at `path` (nothing to check when the file does not exist).

    A resumed job must run with the settings its earlier output was made with; otherwise its rows would mix two
    different jobs.

    Args:
        path (`str`): the settings file (JSON).
        settings (`dict`): JSON-serialisable settings of this run.
        what (`str`): what the folder holds, for the error message (e.g. "rationales").
        keys (`Iterable[str]`, *optional*): the keys that decide the output; default all keys of `settings` (other
            entries of the file, such as a status, are not compared).
        defaults (`dict`, *optional*): the value a key has in a file written before the key existed.
        warn_keys (`Iterable[str]`): keys whose change is only logged as a warning (e.g. a model renamed), also when
            they are among `keys`.

    Raises:
        `ValueError`: the recorded settings differ; names each differing key as (before, now) and the fix.
    """
    path = Path(path)
    if not path.exists():
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    defaults, warn_keys = defaults or {}, tuple(warn_keys)
    keys = [key for key in (settings.keys() if keys is None else keys) if key not in warn_keys]
    differ = _differing(old, settings, keys, defaults)
    if differ:
        changes = ", ".join(f"a different {key} ({before!r}, now {now!r})" for key, (before, now) in differ.items())
        raise ValueError(
            f"{path} holds {what} made with other settings ({differ}, as (before, now)): {changes}. Resuming would "
            "mix the two: pass the same settings to resume, or use a new output folder (or delete this one to start "
            "over)."
        )
    for key, (before, now) in _differing(old, settings, warn_keys, defaults).items():
        logger.warning("Resuming %s with %s %r; the finished part used %r.", what, key, now, before)


def check_or_record_settings(path: str, settings: dict[str, Any], what: str) -> None:
    """Record a job's `settings` at `path` (JSON, written atomically), or check them against the recorded ones
    (`check_settings` over all keys of `settings`).

    Args:
        path (`str`): the settings file.
        settings (`dict`): JSON-serialisable settings that decide the output.
        what (`str`): what the folder holds, for the error message (e.g. "rationales").

    Raises:
        `ValueError`: the recorded settings differ; names each differing key as (before, now).
    """
    if os.path.exists(path):
        check_settings(path, settings, what)
        return
    write_json_atomic(path, settings)


# ----------------------------------------------------------------------------------------------- appended records
def read_appended_records(path: str | os.PathLike, parse: Callable[[dict], Any]) -> Iterator[tuple[int, Any]]:
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


def end_with_newline(path: str | os.PathLike) -> None:
    """End a file a kill may have left with a partial last line, so that the next appended record starts a line."""
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


class AppendLog:
    """An append-only JSON-lines file, kill-safe: `append` writes whole lines, flushed and fsync'd before it returns.

    On open, a last line cut short by an earlier kill is ended, so it cannot swallow the next record (reading skips
    it: `read_appended_records`).

    >>> with AppendLog(path) as log:
    ...     log.append([{"index": 0, "text": "..."}])  # on disk when this returns
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = None

    def __enter__(self):  # -> AppendLog
        end_with_newline(self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # closed in __exit__
        return self

    def append(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Write `records` as JSON lines and persist them (flush + fsync)."""
        self._file.write("".join(json.dumps(record) + "\n" for record in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    def __exit__(self, *exc: object) -> None:
        self._file.close()


# ----------------------------------------------------------------------------------------------- shards
class ShardWriter:
    """Numbered shard files of one process and run: `<shard_dir>/<run id>-rank<rank:05d>-<n:06d><suffix>`, each
    written whole through `atomic_path` (a kill loses only the rows not flushed yet; no shard is ever torn).

    Args:
        shard_dir (`str`): the folder, shared by all processes.
        suffix (`str`): file suffix (".jsonl", ".arrow"); readers glob `*<suffix>` (`shard_paths`).
        process_index (`int`): this process's rank.
    """

    def __init__(self, shard_dir: str | os.PathLike, suffix: str, process_index: int = 0):
        self.shard_dir, self.suffix, self.process_index = Path(shard_dir), suffix, process_index
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.count = 0

    def write(self, write: Callable[[Path], None]) -> Path:
        """Write the next shard with `write(temporary path)`; returns the shard's path."""
        name = f"{self.run_id}-rank{self.process_index:05d}-{self.count:06d}{self.suffix}"
        with atomic_path(self.shard_dir / name) as tmp:
            write(tmp)
        self.count += 1
        return self.shard_dir / name

    def write_records(self, records: Iterable[Mapping[str, Any]]) -> Path:
        """Write the next shard as JSON lines."""
        text = "".join(json.dumps(record) + "\n" for record in records)
        return self.write(lambda tmp: tmp.write_text(text, encoding="utf-8"))


def shard_paths(shard_dir: str | os.PathLike, suffix: str) -> list[Path]:
    """The finished shards of every process and run, sorted by name (temporary files of a killed writer excluded)."""
    return sorted(Path(shard_dir).glob(f"*{suffix}"))


def read_shard_records(shard_dir: str | os.PathLike, suffix: str = ".jsonl") -> Iterator[dict[str, Any]]:
    """Every record of the JSON-lines shards in `shard_dir` (`ShardWriter.write_records`), shard by shard."""
    for path in shard_paths(shard_dir, suffix):
        for _, record in read_appended_records(path, dict):
            yield record


# ----------------------------------------------------------------------------------------------- the job
class ResumableJob:
    """One resumable offline job writing into `output_dir`, in one process or under `accelerate launch` / `torchrun`.

    It holds the job's settings (checked against, then recorded in, `output_dir/settings_file`), says which items are
    left, splits them over the processes of `state`, and hands out kill-safe writers. See the module docstring for
    the order of calls.

    Args:
        output_dir (`str`): the job's folder (shared by all processes); created if missing.
        settings (`dict`): JSON-serialisable settings (and any metadata the settings file also records).
        what (`str`): what the folder holds, for messages (e.g. "a teacher cache").
        settings_file (`str`): the settings file's name inside `output_dir`.
        keys (`Sequence[str]`, *optional*): the settings that decide the output (checked on resume, fingerprinted);
            default all keys of `settings`.
        defaults (`dict`, *optional*): values of keys that files written before them lack.
        warn_keys (`Sequence[str]`): settings whose change on resume is only a warning.
        state (`accelerate.PartialState`, *optional*): the processes to split the work over; None: this process alone.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        settings: dict[str, Any],
        *,
        what: str,
        settings_file: str = "settings.json",
        keys: Sequence[str] | None = None,
        defaults: Mapping[str, Any] | None = None,
        warn_keys: Sequence[str] = (),
        state: Any = None,
    ):
        self.output_dir = Path(output_dir)
        self.settings, self.what, self.state = settings, what, state
        self.keys = list(settings) if keys is None else list(keys)
        self.defaults, self.warn_keys = dict(defaults or {}), tuple(warn_keys)
        self.settings_path = self.output_dir / settings_file
        self.output_dir.mkdir(parents=True, exist_ok=True)

    @property
    def fingerprint(self) -> str:
        """sha256 of the settings that decide the output."""
        return fingerprint({key: self.settings.get(key, self.defaults.get(key)) for key in self.keys})

    @property
    def is_main_process(self) -> bool:
        return self.state is None or self.state.is_main_process

    @property
    def process_index(self) -> int:
        return 0 if self.state is None else self.state.process_index

    def check_settings(self) -> None:
        """Raise a `ValueError` naming each changed setting when the folder holds output of other settings."""
        check_settings(
            self.settings_path,
            self.settings,
            self.what,
            keys=self.keys,
            defaults=self.defaults,
            warn_keys=self.warn_keys,
        )

    def record_settings(self, **updates: Any) -> None:
        """Main process: apply `updates` to the settings (e.g. `status="complete"`) and write them atomically."""
        self.settings.update(updates)
        if self.is_main_process:
            write_json_atomic(self.settings_path, self.settings)

    def check_or_record_settings(self) -> None:
        """`check_settings`, then record the settings when the folder has none yet."""
        self.check_settings()
        if not self.settings_path.exists():
            self.record_settings()

    @staticmethod
    def batched(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
        """Consecutive lists of `size` items (the last may be shorter)."""
        return batched(items, size)

    @staticmethod
    def todo(items: Iterable[Any], done: Collection[Any]) -> list[Any]:
        """The items not in `done`, in their order (the same list on every process)."""
        return [item for item in items if item not in done]

    def split(self, todo: Sequence[Any]) -> contextlib.AbstractContextManager:
        """Context manager giving this process its contiguous part of `todo` (`split_between_processes`)."""
        if self.state is None:
            return contextlib.nullcontext(list(todo))
        return self.state.split_between_processes(list(todo))

    def wait(self) -> None:
        """Barrier over the processes (nothing in one process)."""
        if self.state is not None:
            self.state.wait_for_everyone()

    def shard_writer(self, shard_dir: str | os.PathLike, suffix: str) -> ShardWriter:
        """This process's `ShardWriter` for one run."""
        return ShardWriter(shard_dir, suffix, self.process_index)

    @staticmethod
    def append_log(path: str | os.PathLike) -> AppendLog:
        """An `AppendLog` at `path` (use it as a context manager)."""
        return AppendLog(path)
