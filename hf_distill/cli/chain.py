"""`hf-distill chain --config chain.yaml`: teacher-assistant chains and born-again generations, one `train` run per
stage, each stage's student the next stage's teacher (Mirzadeh et al. 2020; Furlanello et al. 2018).

    output_dir: runs/chain
    teacher_model_name_or_path: smollm2        # the first stage's teacher
    defaults:                                  # `hf-distill train` keys shared by every stage
      dataset_name: data.jsonl
      max_steps: 100
      kd_weight: 0.9
      ce_weight: 0.1
    stages:                                    # each: a name and its own train keys (they override `defaults`)
      - {name: assistant, student_num_layers: 20}    # 30 -> 20 layers
      - {name: student, student_num_layers: 10}      # 20 -> 10 layers
    # born-again generations: same size, randomly re-initialised: `student_config: {}` in each stage

Stage `i` trains into `output_dir/stage{i}_{name}` (its student, tokenizer, recipe.yaml and a model card naming its
teacher and its place in the chain) with `teacher_model_name_or_path` set to the previous stage's folder.
The first teacher is anything `hf-distill train` loads: a Hub id, a local folder or a shorthand such as `smollm2`.
Each stage names its student as `hf-distill train` does: `student_num_layers` (evenly spaced layers of its teacher),
`student_config` (the teacher's config with overrides, randomly initialised) or `model_name_or_path`.
`teacher_model_init_kwargs` applies to the first stage's teacher only. Every stage's recipe is parsed, and the
models, tokenizers and datasets it names are checked to exist, before the first stage starts, so a typo or a missing
file in the last stage stops the chain at once. Resumable by stage: a stage whose folder holds `chain_stage.json` is
finished and skipped; an unfinished stage resumes from its last complete checkpoint (one with `trainer_state.json`,
which the Trainer writes last; a folder cut short by a kill is skipped) when it saved any.
The chain's settings are recorded in `output_dir/chain_settings.json`; a rerun with other settings stops with an error.
`--stage N` runs stage N alone (its teacher: stage N-1's finished folder), again from the start if it finished
earlier: `hf-distill chain --config chain.yaml --stage N` is the command in stage N's model card.
Under `torchrun` / `accelerate launch` (`-m hf_distill.cli.main chain ...`) every process waits at the end of each
stage until the main process has saved it.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .arguments import CliParser
from .recipe_args import read_yaml, split_config


MARKER = "chain_stage.json"
SETTINGS_FILE = "chain_settings.json"
STUDENT_KEYS = ("student_num_layers", "student_config", "model_name_or_path")
CHAIN_DECIDES = ("output_dir", "teacher_model_name_or_path", "resume_from_checkpoint")  # per stage, by the chain


CONFIG_HELP = "The chain's YAML file (required): output_dir, teacher_model_name_or_path, defaults, stages (see above)."


@dataclass
class ChainArguments:
    """What the command line may change in a chain YAML."""

    _argument_group_name = "chain"

    output_dir: str | None = field(default=None, metadata={"help": "Overrides the YAML's output_dir."})
    stage: int | None = field(
        default=None,
        metadata={
            "help": "Run only this stage (1 = the first, as the progress lines count), its teacher the previous "
            "stage's finished folder; a stage finished earlier is trained again from the start. Each stage's model "
            "card gives this as the command that reproduces it."
        },
    )


def make_parser(prog: str | None = None) -> CliParser:
    """Parser of `hf-distill chain`: `--config` is the chain's own YAML (stages of `hf-distill train` keys), not a file
    of `ChainArguments` fields.

    Args:
        prog (`str`, *optional*): the command as typed, shown in `--help`.

    Returns:
        `CliParser`: `parse_args_into_dataclasses(argv)` (without `--config`) gives `(ChainArguments,)`.
    """
    return CliParser((ChainArguments,), prog=prog, description=__doc__, config_help=CONFIG_HELP)


def load_chain(path: str, output_dir: str | None = None) -> dict[str, Any]:
    """Read and check a chain YAML; returns `{"output_dir", "teacher_model_name_or_path", "defaults", "stages"}`.

    Each stage names its student with exactly one of `student_num_layers`, `student_config` and `model_name_or_path`
    (its own, or else the defaults'; a stage's own student key replaces the defaults' one). Raises a ValueError naming
    the key and the fix for anything else (missing keys, keys the chain decides, a stage asking for more layers
    than its teacher has)."""
    chain = read_yaml(path) or {}
    if not isinstance(chain, dict):
        raise TypeError(f"{path}: a chain is a YAML mapping (output_dir, teacher_model_name_or_path, stages, ...).")
    unknown = sorted(set(chain) - {"output_dir", "teacher_model_name_or_path", "defaults", "stages"})
    if unknown:
        raise ValueError(
            f"{path}: unknown chain keys {unknown}; a chain has output_dir, teacher_model_name_or_path, defaults "
            "and stages (train keys go in `defaults` or in a stage)."
        )
    if output_dir is not None:
        chain["output_dir"] = output_dir
    for key in ("output_dir", "teacher_model_name_or_path"):
        if not chain.get(key):
            raise ValueError(
                f"{path}: set `{key}` (output_dir: the chain's folder; teacher_model_name_or_path: the first "
                "stage's teacher, a Hub id, a local folder or a shorthand such as smollm2)."
            )
    teacher = chain["teacher_model_name_or_path"]
    if not isinstance(teacher, str) and not (isinstance(teacher, list) and all(isinstance(t, str) for t in teacher)):
        raise ValueError(
            f"{path}: `teacher_model_name_or_path` must be a model name or path (or a list), got {teacher!r}."
        )
    defaults = chain.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise TypeError(f"{path}: `defaults` must be a mapping of `hf-distill train` keys, got {defaults!r}.")
    for key in CHAIN_DECIDES:
        if key in defaults:
            raise ValueError(f"{path}: `defaults` sets `{key}`, which the chain decides; remove it.")
    stages = chain.get("stages")
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        raise ValueError(f"{path}: `stages` must be a non-empty list of mappings (each a stage's train keys).")
    checked, previous_layers = [], None
    for i, stage in enumerate(stages):
        name = str(stage.get("name", f"stage{i}"))
        where = f"{path}: stage {i} ({name})"
        for key in CHAIN_DECIDES:
            if key in stage:
                raise ValueError(f"{where} sets `{key}`, which the chain decides; remove it.")
        if not name or any(sep in name for sep in ("/", "\\", os.sep)) or name in (".", ".."):
            raise ValueError(f"{where}: `name` names the stage's folder; use a plain name such as 'assistant'.")
        if stage.get("teacher_ema_decay", defaults.get("teacher_ema_decay")) is not None:
            raise ValueError(
                f"{where} sets `teacher_ema_decay`, but every chain stage has a teacher (the previous stage's "
                "student, or `teacher_model_name_or_path` for the first); remove it, or run the EMA self-distillation "
                "as its own `hf-distill train`."
            )
        if "teacher_cache" in defaults or (i > 0 and "teacher_cache" in stage):
            raise ValueError(
                f"{where}: `teacher_cache` holds the first teacher's predictions; set it in the first stage only "
                "(the later stages learn from the previous stage's student)."
            )
        own = [k for k in STUDENT_KEYS if stage.get(k) is not None]
        student = own or [k for k in STUDENT_KEYS if defaults.get(k) is not None]
        if len(student) != 1:
            raise ValueError(
                f"{where}: name its student with exactly one of {list(STUDENT_KEYS)} (in the stage or in "
                f"`defaults`), got {student or 'none'}; e.g. `student_num_layers: 10` keeps 10 of its teacher's "
                "layers, `student_config: {}` is a re-initialised model of the teacher's size (born-again)."
            )
        layers = (stage if own else defaults).get("student_num_layers")
        if layers is not None and previous_layers is not None and layers > previous_layers:
            raise ValueError(
                f"{where}: `student_num_layers: {layers}` is more than its teacher (the previous stage's "
                f"{previous_layers}-layer student) has; a chain goes down in size (e.g. 30 -> 20 -> 10)."
            )
        previous_layers = layers if student == ["student_num_layers"] else None
        checked.append(dict(stage, name=name))
    chain["defaults"] = dict(defaults)
    chain["stages"] = checked
    return chain


def stage_dirs(chain: dict[str, Any]) -> list[str]:
    """Each stage's output folder, `output_dir/stage{i}_{name}`."""
    return [os.path.join(chain["output_dir"], f"stage{i}_{s['name']}") for i, s in enumerate(chain["stages"])]


def stage_recipes(chain: dict[str, Any]) -> list[dict[str, Any]]:
    """The `hf-distill train` recipe of each stage: defaults, the stage's keys, its teacher and output folder."""
    recipes, teacher = [], chain["teacher_model_name_or_path"]
    for i, (stage, folder) in enumerate(zip(chain["stages"], stage_dirs(chain))):
        defaults = chain["defaults"]
        if any(stage.get(k) is not None for k in STUDENT_KEYS):  # the stage's own student replaces the defaults'
            defaults = {k: v for k, v in defaults.items() if k not in STUDENT_KEYS}
        recipe = {**defaults, **{k: v for k, v in stage.items() if k != "name"}}
        if i > 0:  # options of the first teacher(s) only: loading (e.g. a GGUF file), weights of several teachers
            recipe.pop("teacher_model_init_kwargs", None)
            recipe.pop("teacher_weights", None)
        recipe.update(teacher_model_name_or_path=teacher, output_dir=folder)
        recipes.append(recipe)
        teacher = folder
    return recipes


def _chain_card_section(chain: dict[str, Any], index: int, teacher: str) -> str:
    first = chain["teacher_model_name_or_path"]
    names = [first if isinstance(first, str) else ", ".join(first), *[s["name"] for s in chain["stages"]]]
    path = " -> ".join(f"**{n}**" if k == index + 1 else n for k, n in enumerate(names))
    return (
        f"\n## Teacher-assistant chain\n\nStage {index + 1} of {len(chain['stages'])} of an `hf-distill chain` run: "
        f"{path}.\nThis model's teacher: `{teacher}`.\n"
    )


def last_complete_checkpoint(folder: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` in `folder` that holds `trainer_state.json` (the Trainer writes it after the
    weights, optimizer, scheduler and RNG states), or None. A newer folder without it, cut short by a kill while it
    was written, is skipped with a message: its steps are trained again."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    folder = Path(folder)
    if not folder.is_dir():
        return None
    steps = sorted(
        (int(p.name.split("-")[-1]), p)
        for p in folder.iterdir()
        if p.is_dir() and p.name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") and p.name.split("-")[-1].isdigit()
    )
    for _, path in reversed(steps):
        if (path / "trainer_state.json").is_file():
            return str(path)
        print(f"[chain] {path} is incomplete (no trainer_state.json: cut short by a kill?); not resuming from it")
    return None


def parse_stage(recipe: dict[str, Any], prog: str) -> tuple[Any, Any, Any]:
    """`hf-distill train`'s parse of a stage's recipe: `(script_args, args, model_args)`; raises a ValueError naming
    the stage's folder for unknown or bad keys."""
    from .train import make_parser

    try:
        return make_parser(prog).parse_dict(recipe, allow_extra_keys=False)
    except (ValueError, TypeError) as err:
        raise ValueError(f"The chain stage writing to {recipe['output_dir']}: {err}") from err


def check_stages(chain: dict[str, Any], recipes: list[dict[str, Any]], prog: str) -> None:
    """Everything about every stage that can be checked before the first one trains: its keys and values
    (`parse_stage`), that it names its data and student (`train.check_arguments`), and that each model, tokenizer
    and dataset path it names exists (`recipe_args.check_path_arguments`; a teacher that is an earlier stage's
    folder is written by that stage).

    Raises:
        `ValueError` / `FileNotFoundError`: naming the stage and the problem.
    """
    from .recipe_args import check_path_arguments
    from .train import check_arguments

    earlier: list[str] = []
    for i, recipe in enumerate(recipes):
        parsed = parse_stage(recipe, prog)
        try:
            check_arguments(*parsed)
            check_path_arguments(parsed, skip=tuple(earlier))
        except (ValueError, FileNotFoundError) as err:
            stage = f"Chain stage {i + 1} of {len(recipes)} ({chain['stages'][i]['name']})"
            raise type(err)(f"{stage}, checked before any stage runs: {err}") from None
        earlier.append(recipe["output_dir"])


def stage_command(prog: str, source: str, output_dir: str | None, index: int) -> str:
    """The command that runs stage `index` (0-based) of the chain in `source` again: `hf-distill chain --config
    <source> [--output_dir ...] --stage <index + 1>` (under `accelerate launch` / `torchrun`, with the launcher)."""
    from ..recipes import command_line

    argv = ["--config", source, *(["--output_dir", output_dir] if output_dir is not None else [])]
    return command_line(prog, [*argv, "--stage", str(index + 1)])


def run_stage(recipe: dict[str, Any], prog: str, command: str | None = None, resume: bool = True) -> None:
    """One stage: `hf-distill train` with `recipe` (resuming from its last complete checkpoint if it has one and
    `resume`); `command` (`stage_command`) is the card's reproducing command."""
    from transformers import set_seed

    from ..recipes import Recipe
    from .train import build_trainer

    script_args, args, model_args = parse_stage(recipe, prog)
    set_seed(args.seed)  # the student's initialisation does not depend on what ran before in this process
    last = last_complete_checkpoint(args.output_dir) if resume else None
    trainer = build_trainer(script_args, args, model_args)
    note = "This stage's `hf-distill train` recipe: the chain's defaults and the stage's keys, its teacher and folder."
    trainer.recipe = Recipe(recipe, command or f"{prog} (stage of a chain)", note=note)
    trainer.recipe.save(args.output_dir)
    if last is not None:
        print(f"[chain] resuming from {last}")
    trainer.train(resume_from_checkpoint=last)
    trainer.save_model(args.output_dir)
    trainer.create_model_card(dataset_name=script_args.dataset_name)


def wait_for_everyone() -> None:
    """A barrier over the processes of a multi-process chain (`torchrun` / `accelerate launch`); nothing otherwise.
    Without it a process could start the next stage, and load its teacher, before the main process has saved it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def run(argv: list[str], prog: str = "hf-distill chain") -> None:
    """`hf-distill chain --config chain.yaml`: check every stage's keys, then train the stages not finished yet.

    Args:
        argv (`list[str]`): the arguments after `chain`.
        prog (`str`): the command as typed.
    """
    from ..jobs import check_or_record_settings

    source, rest = split_config(list(argv))
    (opts,) = make_parser(prog).parse_args_into_dataclasses(rest)
    if source is None:
        raise ValueError("Name the chain's YAML file: `--config chain.yaml` (see `hf-distill chain --help`).")
    chain = load_chain(source, opts.output_dir)
    recipes = stage_recipes(chain)
    check_stages(chain, recipes, prog)  # every stage's keys and inputs, before the first stage trains
    only = check_stage(opts.stage, recipes, source)
    os.makedirs(chain["output_dir"], exist_ok=True)
    check_or_record_settings(os.path.join(chain["output_dir"], SETTINGS_FILE), chain, "a teacher-assistant chain")
    for i, recipe in enumerate(recipes):
        folder = Path(recipe["output_dir"])
        if only is not None and i != only:
            continue
        finished = (folder / MARKER).exists()
        if finished and only is None:
            print(f"[chain] stage {i + 1}/{len(recipes)} ({chain['stages'][i]['name']}): finished earlier, skipped")
            continue
        if finished:  # asked for by --stage: trained again from the start
            print(f"[chain] stage {i + 1}/{len(recipes)} ({chain['stages'][i]['name']}): finished earlier, run again")
            if os.environ.get("RANK", "0") == "0":
                (folder / MARKER).unlink()
            wait_for_everyone()
        teacher = recipe["teacher_model_name_or_path"]
        print(f"[chain] stage {i + 1}/{len(recipes)} ({chain['stages'][i]['name']}): teacher {teacher} -> {folder}")
        run_stage(recipe, prog, stage_command(prog, source, opts.output_dir, i), resume=not finished)
        if os.environ.get("RANK", "0") == "0":
            with open(folder / "README.md", "a", encoding="utf-8") as f:
                f.write(_chain_card_section(chain, i, teacher))
            marker = {"stage": i, "name": chain["stages"][i]["name"], "teacher": teacher, "finished": True}
            (folder / (MARKER + ".tmp")).write_text(json.dumps(marker, indent=2))
            os.replace(folder / (MARKER + ".tmp"), folder / MARKER)
        wait_for_everyone()  # the next stage loads this one's folder on every process
    if only is None:
        print(f"[chain] done: the final student is in {recipes[-1]['output_dir']}")
    else:
        print(f"[chain] stage {only + 1} done: its student is in {recipes[only]['output_dir']}")


def check_stage(stage: int | None, recipes: list[dict[str, Any]], source: str) -> int | None:
    """The 0-based index of `--stage` (None: every stage), checked to exist and to have its teacher: a later stage
    needs the previous stage finished (its folder holds `chain_stage.json`).

    Raises:
        `ValueError`: naming the stage and the command that makes its teacher.
    """
    if stage is None:
        return None
    if not 1 <= stage <= len(recipes):
        raise ValueError(f"`--stage {stage}`: the chain in {source} has stages 1 to {len(recipes)}.")
    previous = Path(recipes[stage - 2]["output_dir"]) if stage > 1 else None
    if previous is not None and not (previous / MARKER).exists():
        raise ValueError(
            f"`--stage {stage}` is taught by stage {stage - 1}'s student, but {previous} holds no finished stage "
            f"({MARKER}). Run the stages before it first: `hf-distill chain --config {source}` (or `--stage "
            f"{stage - 1}`)."
        )
    return stage - 1
