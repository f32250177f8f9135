"""Recipes: YAML mappings of config fields, read from a local file or a Hub repo, recorded with every run.

A `--config` value is, in this order:

1. a local file, when one exists at that path (a local path always wins);
2. a Hub reference, resolved with `huggingface_hub.hf_hub_download` (its cache, revision pinning and offline mode):
   `<namespace>/<repo>/<path/in/repo>.yaml`, or the HF URI `hf://[<repo_type>s/]<namespace>/<repo>/<path>`, with an
   optional revision either after the repo (`ns/repo@v1/kd/x.yaml`, the HF URI grammar) or after the file
   (`ns/repo/kd/x.yaml@v1`).

The commit a Hub reference resolved to is recorded in `recipe_source.json` next to `recipe.yaml` (the run's exact
recipe: the file with the command-line flags folded in) in the run's `output_dir`, and in the student's model card.
"""

import json
import logging
import os
import re
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml


logger = logging.getLogger(__name__)

RECIPE_FILE = "recipe.yaml"
SOURCE_FILE = "recipe_source.json"
CARD_MARKER = "<!-- hf-distill:recipe -->"  # the fenced YAML block right after it is the card's recipe
_CARD_BLOCK = re.compile(re.escape(CARD_MARKER) + r"\s*```ya?ml\n(.*?)\n```", re.DOTALL)
_SPECIAL_REF = re.compile(r"^refs/(?:convert/[\w.-]+|pr/\d+)$")


@dataclass(frozen=True)
class HubRecipeReference:
    """A recipe file in a Hub repository.

    Args:
        repo_id (`str`): `namespace/name`.
        filename (`str`): path of the YAML file inside the repo, e.g. `kd/smollm2-10l_from_smollm2_esnli.yaml`.
        repo_type (`str`): `model`, `dataset` or `space`.
        revision (`str`, *optional*): branch, tag or commit; `None` is the default branch.
    """

    repo_id: str
    filename: str
    repo_type: str = "model"
    revision: str | None = None

    def uri(self, revision: str | None = None) -> str:
        """The canonical HF URI `hf://<repo_type>s/<repo_id>[@<revision>]/<filename>` (pinned to `revision`)."""
        rev = revision or self.revision
        return f"hf://{self.repo_type}s/{self.repo_id}{f'@{rev}' if rev else ''}/{self.filename}"


def parse_recipe_reference(reference: str) -> HubRecipeReference:
    """Parse a Hub recipe reference (see the module docstring for the forms); raise a ValueError when it is none.

    Args:
        reference (`str`): e.g. `my-org/recipes/kd/tiny.yaml@v1` or `hf://datasets/my-org/recipes@v1/kd/tiny.yaml`.
    """
    from huggingface_hub import parse_hf_uri
    from huggingface_hub.errors import HfUriError

    body = reference.removeprefix("hf://")
    head, at, tail = body.rpartition("@")
    if at and ("/" not in tail or _SPECIAL_REF.match(tail)):  # revision after the file: `ns/repo/x.yaml@v1`
        prefix = head.split("/")
        typed = prefix[0] in ("models", "datasets", "spaces")
        repo_end = 3 if typed else 2
        body = "/".join(prefix[:repo_end]) + f"@{tail}/" + "/".join(prefix[repo_end:])
    try:
        uri = parse_hf_uri("hf://" + body)
    except HfUriError as err:
        raise ValueError(f"{reference!r} is not a Hub recipe reference: {err}") from err
    if uri.type not in ("model", "dataset", "space") or not uri.path_in_repo:
        raise ValueError(
            f"{reference!r} is not a Hub recipe reference: it must name a file in a model, dataset or space repo "
            "(`<namespace>/<repo>/<path/in/repo>.yaml`)."
        )
    return HubRecipeReference(uri.id, uri.path_in_repo, uri.type, uri.revision)


@dataclass(frozen=True)
class ResolvedRecipe:
    """Where a `--config` value was read from.

    Args:
        source (`str`): the value as given.
        path (`str`): the local file read (the Hub cache's snapshot file for a Hub reference).
        hub (`HubRecipeReference`, *optional*): the parsed reference, `None` for a local file.
        commit (`str`, *optional*): the commit hash the reference resolved to.
    """

    source: str
    path: str
    hub: HubRecipeReference | None = None
    commit: str | None = None

    @property
    def pinned(self) -> str:
        """The source pinned to its commit (a local path as given)."""
        return self.hub.uri(self.commit) if self.hub is not None else self.source


def snapshot_commit(path: str, filename: str) -> str | None:
    """The `<commit>` of a Hub cache path `.../snapshots/<commit>/<filename>` (None for any other path)."""
    snapshot = Path(path).parents[len(Path(filename).parts) - 1]
    return snapshot.name if snapshot.parent.name == "snapshots" else None


def resolve_recipe(source: str, *, cache_dir: str | os.PathLike | None = None) -> ResolvedRecipe:
    """Find the recipe file a `--config` value names: a local file when one exists, else a Hub reference.

    Args:
        source (`str`): local path or Hub reference.
        cache_dir (`str`, *optional*): Hub cache folder (default: the `HF_HUB_CACHE` environment variable as it is
            now, else huggingface_hub's default).

    Raises:
        FileNotFoundError: neither a local file nor a resolvable Hub reference; the message names both readings.
    """
    if os.path.isfile(source):
        return ResolvedRecipe(source, source)
    local = f"it is not a local file (no file at {os.path.abspath(source)})"
    forms = "`<namespace>/<repo>/<path/in/repo>.yaml[@revision]` or `hf://<repo_type>s/<namespace>/<repo>/<path>`"
    try:
        ref = parse_recipe_reference(source)
    except ValueError as err:
        raise FileNotFoundError(
            f"Recipe {source!r} not found: {local}, and it is not a Hub reference ({err}; expected {forms})."
        ) from None
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError

    cache_dir = cache_dir or os.environ.get("HF_HUB_CACHE") or None
    try:
        path = hf_hub_download(
            ref.repo_id, ref.filename, repo_type=ref.repo_type, revision=ref.revision, cache_dir=cache_dir
        )
    except (EntryNotFoundError, HfHubHTTPError, HFValidationError, OSError, ValueError) as err:
        offline = (
            " HF_HUB_OFFLINE is set, so only the local Hub cache was searched." if constants.HF_HUB_OFFLINE else ""
        )
        raise FileNotFoundError(
            f"Recipe {source!r} not found: {local}, and as a Hub reference (repo {ref.repo_id!r} of type "
            f"{ref.repo_type}, file {ref.filename!r}, revision {ref.revision or 'default branch'}) it did not "
            f"resolve: {type(err).__name__}: {str(err).rstrip('.')}.{offline} Check the path, or the repo, file and "
            f"revision ({forms})."
        ) from err
    commit = snapshot_commit(path, ref.filename)
    logger.info("Recipe %s resolved to %s (commit %s).", source, path, commit)
    return ResolvedRecipe(source, path, ref, commit)


def recipe_to_yaml(config: dict[str, Any]) -> str:
    """A recipe mapping as YAML, keys in their given order (`yaml.safe_load` of it gives `config` back)."""
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True, default_flow_style=False)


@dataclass
class Recipe:
    """The exact recipe of a run: config mapping (the `--config` file with the command-line flags folded in), the
    command that reproduces it and where the file came from.

    Args:
        config (`dict`): field name -> value, as in a recipe YAML.
        command (`str`): the one shell command that reproduces the run.
        resolved (`ResolvedRecipe`, *optional*): the `--config` file; `None` when the run had only flags.
        rerun (`str`, *optional*): the command that runs `config` saved as `recipe.yaml` (e.g.
            `hf-distill train --config recipe.yaml`); `None` for commands without `--config`.
        note (`str`, *optional*): shown in the card instead of the usual sentence (e.g. what the recipe lacks).
        extra (`dict`): more entries for `recipe_source.json`.
    """

    config: dict[str, Any]
    command: str
    resolved: ResolvedRecipe | None = None
    rerun: str | None = None
    note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_yaml(self) -> str:
        return recipe_to_yaml(self.config)

    def provenance(self) -> dict[str, Any]:
        """`{"source", "pinned", "repo_id", "repo_type", "filename", "revision", "commit", "command", ...}`."""
        from .version import __version__

        resolved, hub = self.resolved, self.resolved.hub if self.resolved else None
        return {
            "source": resolved.source if resolved else None,
            "pinned": resolved.pinned if resolved else None,
            "repo_id": hub.repo_id if hub else None,
            "repo_type": hub.repo_type if hub else None,
            "filename": hub.filename if hub else None,
            "revision": hub.revision if hub else None,
            "commit": resolved.commit if resolved else None,
            "command": self.command,
            "hf_distill_version": __version__,
            **self.extra,
        }

    def save(self, output_dir: str | os.PathLike) -> None:
        """Write `recipe.yaml` (runnable as `--config`) and `recipe_source.json` (source, commit, command)."""
        if os.environ.get("RANK", "0") != "0":  # one writer under torchrun / accelerate launch
            return
        os.makedirs(output_dir, exist_ok=True)
        info = self.provenance()
        header = [
            "# hf-distill recipe: this run's exact config (the --config file with the command-line flags folded in).",
            f"# source: {info['pinned']}" if info["pinned"] else "# source: command-line flags only",
            f"# command: {self.command}",
        ]
        Path(output_dir, RECIPE_FILE).write_text("\n".join(header) + "\n" + self.to_yaml(), encoding="utf-8")
        Path(output_dir, SOURCE_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

    def public(self) -> "Recipe":
        """The recipe as a public model card shows it: server URLs (`PRIVATE_FIELDS`) and tokens (`*_token`) are
        not recorded. In the config they become `PRIVATE_VALUE`; in the command a shell variable that must be set
        (`${HF_DISTILL_TEACHER_API_BASE:?...}`), so the command still reruns the run once it is."""
        config = {key: PRIVATE_VALUE if private_variable(key) else value for key, value in self.config.items()}
        return replace(self, config=config, command=public_command(self.command))

    def card_section(self) -> str:
        """Markdown for a model card: the command, the source and commit, and the recipe as a fenced YAML block, as
        `public()` shows them."""
        public = self.public()
        lines = ["## Reproduce", "", "```bash", public.command, "```", ""]
        if self.resolved is not None and self.resolved.hub is not None:
            hub = self.resolved.hub
            rev = f"revision `{hub.revision}`, " if hub.revision else ""
            lines += [f"Recipe: `{self.resolved.source}` ({rev}commit `{self.resolved.commit}`).", ""]
        elif self.resolved is not None:
            lines += [f"Recipe: local file `{self.resolved.source}`.", ""]
        rerun = f" Saved as `recipe.yaml`, `{self.rerun}` runs it again." if self.rerun else ""
        lines += [self.note or f"The exact recipe (the command's flags folded in).{rerun}", "", CARD_MARKER, "```yaml"]
        return "\n".join(lines) + "\n" + public.to_yaml().rstrip("\n") + "\n```\n"


PRIVATE_VALUE = "<not recorded in the card>"
# config fields whose values a public card must not show -> the shell variable its command reads them from instead
PRIVATE_FIELDS = {
    "teacher_api_base": "HF_DISTILL_TEACHER_API_BASE",
    "vllm_server_base_url": "HF_DISTILL_VLLM_SERVER_BASE_URL",
}


def private_variable(key: str) -> str | None:
    """The shell variable that stands for config field `key` in a public card (`PRIVATE_FIELDS`; `hub_token` ->
    `HF_TOKEN`, any other `*_token` -> its name in capitals), or None when `key` may be shown."""
    if key in PRIVATE_FIELDS:
        return PRIVATE_FIELDS[key]
    return ("HF_TOKEN" if key == "hub_token" else key.upper()) if key.endswith("_token") else None


def public_command(command: str) -> str:
    """`command` with the values of private flags (`private_variable`) replaced by a shell variable that must be set:
    `--teacher_api_base ${HF_DISTILL_TEACHER_API_BASE:?set it to the value of --teacher_api_base}`."""
    body, hash_, note = command.partition("  # ")
    try:
        tokens = shlex.split(body)
    except ValueError:
        return command
    out, changed, i = [], False, 0
    while i < len(tokens):
        token = tokens[i]
        key = token[2:].split("=", 1)[0] if token.startswith("--") else None
        variable = private_variable(key) if key else None
        if variable is None:
            out.append(shlex.quote(token))
            i += 1
            continue
        flag = token.split("=", 1)[0]
        out += [flag, f"${{{variable}:?set it to the value of {flag}}}"]  # unquoted: several URLs are several words
        changed, i = True, i + 1
        if "=" not in token:  # the flag's values: every token up to the next flag
            while i < len(tokens) and not tokens[i].startswith("--"):
                i += 1
    return (" ".join(out) + hash_ + note) if changed else command


def recipe_from_config(args: Any) -> Recipe | None:
    """The recipe of a trainer built in Python: its config's `output_dir` and every field that differs from the
    defaults (tokens left out). The student and the data were objects, so the recipe names neither; `None` when
    the config class cannot be built with defaults."""
    try:
        defaults = type(args)(output_dir=args.output_dir).to_dict()
    except (TypeError, ValueError):  # a user subclass with required fields: no recipe rather than no card
        return None
    changed = {
        key: value
        for key, value in args.to_dict().items()
        if key != "output_dir" and not key.endswith("_token") and defaults.get(key, object()) != value
    }
    config = json.loads(json.dumps({"output_dir": args.output_dir, **changed}, default=str))
    note = (
        "Trained with the Python API: the student and the data were passed as objects, so this recipe holds the "
        "config only (`output_dir` and every field that differs from the defaults). Add `model_name_or_path` (or "
        "`student_num_layers`) and `dataset_name`, save it as `recipe.yaml` and run `hf-distill train --config "
        "recipe.yaml`."
    )
    return Recipe(config, "hf-distill train --config recipe.yaml", note=note)


def recipe_from_card(card: Any) -> dict[str, Any]:
    """The recipe mapping embedded in a model card (a `ModelCard`, its text, or a path to README.md).

    Raises:
        ValueError: the card has no hf-distill recipe block.
    """
    text = getattr(card, "content", None)
    if text is None:
        text = str(card)
        if len(text) < 4096 and "\n" not in text and os.path.isfile(text):
            text = Path(text).read_text(encoding="utf-8")
    match = _CARD_BLOCK.search(text)
    if match is None:
        raise ValueError(f"The model card has no hf-distill recipe (a ```yaml block after {CARD_MARKER}).")
    return yaml.safe_load(match.group(1))


CLI_MODULE = "hf_distill.cli.main"  # what a launcher runs: `accelerate launch ... -m hf_distill.cli.main train ...`
_SCRIPT_FLAGS = ("-m", "--module", "--no-python", "--no_python")  # how the launcher read its script: replaced by -m


def _parent_argv() -> list[str] | None:
    """The command line of this process's parent (Linux `/proc`), None where it cannot be read."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    return argv[:-1] if argv and argv[-1] == "" else argv


def _launcher_flags(argv: list[str]) -> tuple[str, list[str]] | None:
    """`("accelerate" | "torchrun", the launcher's own flags)` when `argv` (a process's command line) is `accelerate
    launch ...` or `torchrun ...` (as a console script or `python -m`), else None. The launcher's parser splits its
    flags from the training script and the script's arguments."""
    if argv and os.path.basename(argv[0]).startswith("python"):
        argv = argv[1:]
        if argv[:1] == ["-m"] and len(argv) > 1:
            argv = [argv[1], *argv[2:]]
    if not argv:
        return None
    head, rest = os.path.basename(argv[0]), argv[1:]
    if head in ("torchrun", "torch.distributed.run"):
        from torch.distributed.run import get_args_parser as parser

        kind = "torchrun"
    elif (head in ("accelerate", "accelerate.commands.accelerate_cli") and rest[:1] == ["launch"]) or (
        head == "accelerate.commands.launch"
    ):
        from accelerate.commands.launch import launch_command_parser as parser

        kind, rest = "accelerate", rest[1:] if rest[:1] == ["launch"] else rest
    else:
        return None
    try:
        parsed = parser().parse_args(rest)
    except (SystemExit, ValueError):  # argparse exits on what it cannot read
        return None
    flags = rest[: len(rest) - len(parsed.training_script_args) - 1]
    return kind, [flag for flag in flags if flag not in _SCRIPT_FLAGS]


def launcher_prefix(environ: Any = None, parent_argv: list[str] | None = None) -> tuple[list[str], str | None] | None:
    """The launcher this process was started by, as the start of a command that starts it again, or None when it
    was not launched (`WORLD_SIZE` unset or 1, no `ACCELERATE_*` / `TORCHELASTIC_RUN_ID` variables).

    `accelerate launch` and `torchrun` export no record of their own flags (accelerate exports `ACCELERATE_*` settings,
    torchelastic `WORLD_SIZE`, `LOCAL_WORLD_SIZE` and `TORCHELASTIC_RUN_ID`, but neither the config file nor the
    process count as typed), so the launcher's flags are read from the parent process's command line (the worker's
    parent is the launcher) and re-parsed with the launcher's own parser. Where that cannot be read, the command is
    rebuilt from the environment (process and machine counts, mixed precision) with a note saying what it lacks.

    Args:
        environ (`Mapping`, *optional*): the environment (default `os.environ`).
        parent_argv (`list[str]`, *optional*): the parent's command line (default: read from `/proc`).

    Returns:
        `(prefix, note)`: e.g. `(["accelerate", "launch", "--config_file", "cpu_2proc.yaml", "-m",
        "hf_distill.cli.main"], None)`; `note` says what the rebuilt command may lack (None when read verbatim).
    """
    env = os.environ if environ is None else environ
    accelerate = "ACCELERATE_MIXED_PRECISION" in env or "ACCELERATE_DYNAMO_BACKEND" in env
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if not (accelerate or "TORCHELASTIC_RUN_ID" in env or world > 1):
        return None
    found = _launcher_flags(parent_argv if parent_argv is not None else (_parent_argv() or []))
    if found is not None:
        kind, flags = found
        start = ["accelerate", "launch"] if kind == "accelerate" else ["torchrun"]
        return [*start, *flags, "-m", CLI_MODULE], None
    local = int(env.get("LOCAL_WORLD_SIZE", world) or world)
    machines = max(1, world // max(1, local))
    if accelerate:
        prefix = ["accelerate", "launch", "--num_processes", str(world), "--num_machines", str(machines)]
        prefix += ["--mixed_precision", env.get("ACCELERATE_MIXED_PRECISION", "no")]
        prefix += ["--use_fsdp"] * (env.get("ACCELERATE_USE_FSDP", "").lower() == "true")
        prefix += ["--use_deepspeed"] * (env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true")
        prefix += ["--multi_gpu"] * (world > 1 and not {"--use_fsdp", "--use_deepspeed"} & set(prefix))
        note = "The launcher's command line could not be read: add the `--config_file` the run used, if any."
    else:
        prefix = ["torchrun", "--nnodes", str(machines), "--nproc_per_node", str(local)]
        note = "The launcher's command line could not be read: this torchrun command is rebuilt from its environment."
    return [*prefix, "-m", CLI_MODULE], note


def command_line(prog: str, argv: list[str], prefix: list[str] | None = None) -> str:
    """`prog argv...` as one shell-quoted command; under `accelerate launch` / `torchrun` (`launcher_prefix`) the
    launcher with its flags replaces `hf-distill`, so the command starts the same processes again.

    Args:
        prog (`str`): the command as typed, e.g. `"hf-distill train"`.
        argv (`list[str]`): its arguments.
        prefix (`list[str]`, *optional*): the launcher's start of the command; default `launcher_prefix()` (with its
            note, if any, as a trailing shell comment).
    """
    note = None
    if prefix is None:
        prefix, note = launcher_prefix() or (None, None)
    if prefix and prog.split()[:1] == ["hf-distill"]:
        prog = " ".join([shlex.join(prefix), *prog.split()[1:]])
    command = " ".join([prog, shlex.join(argv)]).strip()
    return f"{command}  # {note}" if note and prog.startswith(shlex.join(prefix)) else command
