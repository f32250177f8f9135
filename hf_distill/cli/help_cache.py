"""A cache of the subcommands' `--help` texts.

`hf-distill train --help` lists `TrainingArguments`' fields, so building it imports torch and transformers: seconds
for a process that only prints. The text changes only when this package's files, its dependencies' versions, the
command or the terminal width change, so the console script writes it once per such key (under
`~/.cache/hf_distill/help`, or `$XDG_CACHE_HOME/hf_distill/help`, or the folder in `HF_DISTILL_HELP_CACHE`; `0` turns
the cache off) and later prints it without importing anything heavy. Imports only the standard library.
"""

import hashlib
import json
import os
import shutil
from importlib import metadata
from pathlib import Path


CACHE_ENV = "HF_DISTILL_HELP_CACHE"
# Whose versions shape the help text (their dataclass fields, defaults and help strings).
DEPENDENCIES = ("transformers", "trl", "peft", "accelerate", "datasets", "torch")
PACKAGE = Path(__file__).resolve().parents[1]


def cache_dir() -> Path | None:
    """The folder of cached help texts, or None when `HF_DISTILL_HELP_CACHE=0`."""
    value = os.environ.get(CACHE_ENV, "")
    if value == "0":
        return None
    if value:
        return Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hf_distill" / "help"


def is_help_request(argv: list[str], help_flags: tuple[str, ...] = ("-h", "--help")) -> bool:
    """Whether `argv` (after `hf-distill`) only asks for a command's help: command words and a help flag, no other
    option (`train --config x.yaml --help` is not cached)."""
    return any(a in help_flags for a in argv) and all(a in help_flags or not a.startswith("-") for a in argv)


def help_key(argv: list[str]) -> str:
    """The cache key of `argv`'s help text: the command words, the dependencies' versions, the terminal width
    (argparse wraps to it) and the size and modification time of every file of this package."""
    digest = hashlib.sha256(json.dumps([a for a in argv if not a.startswith("-")]).encode())
    for name in DEPENDENCIES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "-"
        digest.update(f"{name}={version};".encode())
    digest.update(f"columns={shutil.get_terminal_size().columns};".encode())
    for path in sorted(PACKAGE.rglob("*.py")):
        stat = path.stat()
        digest.update(f"{path.relative_to(PACKAGE)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:32]


def read_help(argv: list[str]) -> str | None:
    """The cached help text of `argv`, or None (not cached, or the cache is off or unreadable)."""
    folder = cache_dir()
    if folder is None:
        return None
    try:
        return (folder / f"{help_key(argv)}.txt").read_text(encoding="utf-8")
    except OSError:
        return None


def write_help(argv: list[str], text: str) -> None:
    """Store `text` as `argv`'s help (atomically); a cache folder that cannot be written is left alone."""
    folder = cache_dir()
    if folder is None or not text:
        return
    path = folder / f"{help_key(argv)}.txt"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    except OSError:
        pass
