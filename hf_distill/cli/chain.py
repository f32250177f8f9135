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
`teacher_model_init_kwargs` applies to the first stage's teacher only. Resumable by stage: a stage whose folder holds
`chain_stage.json` is finished and skipped; an unfinished stage resumes from its last checkpoint when it saved any.
The chain's settings are recorded in `output_dir/chain_settings.json`; a rerun with other settings stops with an error.
"""

import argparse
import json
import os
from pathlib import Path
from typing import Any

import yaml


MARKER = "chain_stage.json"
SETTINGS_FILE = "chain_settings.json"
STOP_AFTER_ENV = "HF_DISTILL_CHAIN_STOP_AFTER"  # testing hook: stop (raise) after this many finished stages


class ChainInterrupted(RuntimeError):
    """Raised by the `HF_DISTILL_CHAIN_STOP_AFTER` hook (tests of resumption)."""


def make_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="The chain's YAML file (see above).")
    p.add_argument("--output_dir", default=None, help="Overrides the YAML's output_dir.")
    return p


def load_chain(path: str, output_dir: str | None = None) -> dict[str, Any]:
    """Read and check a chain YAML; returns `{"output_dir", "teacher_model_name_or_path", "defaults", "stages"}`."""
    with open(path, encoding="utf-8") as f:
        chain = yaml.safe_load(f) or {}
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
            raise ValueError(f"{path}: set `{key}`.")
    stages = chain.get("stages")
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        raise ValueError(f"{path}: `stages` must be a non-empty list of mappings (each a stage's train keys).")
    for i, stage in enumerate(stages):
        for key in ("output_dir", "teacher_model_name_or_path"):
            if key in stage or key in (chain.get("defaults") or {}):
                raise ValueError(f"{path}: stage {i} sets `{key}`, which the chain decides; remove it.")
    chain["defaults"] = dict(chain.get("defaults") or {})
    chain["stages"] = [dict(s, name=str(s.get("name", f"stage{i}"))) for i, s in enumerate(stages)]
    return chain


def stage_dirs(chain: dict[str, Any]) -> list[str]:
    """Each stage's output folder, `output_dir/stage{i}_{name}`."""
    return [os.path.join(chain["output_dir"], f"stage{i}_{s['name']}") for i, s in enumerate(chain["stages"])]


def stage_recipes(chain: dict[str, Any]) -> list[dict[str, Any]]:
    """The `hf-distill train` recipe of each stage: defaults, the stage's keys, its teacher and output folder."""
    recipes, teacher = [], chain["teacher_model_name_or_path"]
    for i, (stage, folder) in enumerate(zip(chain["stages"], stage_dirs(chain))):
        recipe = {**chain["defaults"], **{k: v for k, v in stage.items() if k != "name"}}
        if i > 0:
            recipe.pop("teacher_model_init_kwargs", None)  # the first teacher's loading options (e.g. a GGUF file)
        recipe.update(teacher_model_name_or_path=teacher, output_dir=folder)
        recipes.append(recipe)
        teacher = folder
    return recipes


def _chain_card_section(chain: dict[str, Any], index: int, teacher: str) -> str:
    names = [chain["teacher_model_name_or_path"], *[s["name"] for s in chain["stages"]]]
    path = " -> ".join(f"**{n}**" if k == index + 1 else n for k, n in enumerate(names))
    return (
        f"\n## Teacher-assistant chain\n\nStage {index + 1} of {len(chain['stages'])} of an `hf-distill chain` run: "
        f"{path}.\nThis model's teacher: `{teacher}`.\n"
    )


def run_stage(recipe: dict[str, Any], prog: str) -> None:
    """One stage: `hf-distill train` with `recipe` (resuming from its last checkpoint if it has one)."""
    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from ..recipes import Recipe
    from .train import build_trainer, make_parser

    script_args, args, model_args = make_parser(prog).parse_dict(recipe, allow_extra_keys=False)
    set_seed(args.seed)  # the student's initialisation does not depend on what ran before in this process
    Recipe(recipe, f"{prog} (stage of a chain)").save(args.output_dir)
    trainer = build_trainer(script_args, args, model_args)
    trainer.recipe = Recipe(recipe, f"{prog} (stage of a chain)")
    last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    trainer.train(resume_from_checkpoint=last)
    trainer.save_model(args.output_dir)
    trainer.create_model_card(dataset_name=script_args.dataset_name)


def run(argv: list[str], prog: str = "hf-distill chain") -> None:
    from ..jobs import check_or_record_settings

    opts = make_parser(prog).parse_args(argv)
    chain = load_chain(opts.config, opts.output_dir)
    os.makedirs(chain["output_dir"], exist_ok=True)
    check_or_record_settings(os.path.join(chain["output_dir"], SETTINGS_FILE), chain, "a teacher-assistant chain")
    stop_after = os.environ.get(STOP_AFTER_ENV)
    recipes = stage_recipes(chain)
    for i, recipe in enumerate(recipes):
        folder = Path(recipe["output_dir"])
        if (folder / MARKER).exists():
            print(f"[chain] stage {i + 1}/{len(recipes)} ({chain['stages'][i]['name']}): finished earlier, skipped")
        else:
            teacher = recipe["teacher_model_name_or_path"]
            print(
                f"[chain] stage {i + 1}/{len(recipes)} ({chain['stages'][i]['name']}): teacher {teacher} -> {folder}"
            )
            run_stage(recipe, prog)
            if os.environ.get("RANK", "0") == "0":
                with open(folder / "README.md", "a", encoding="utf-8") as f:
                    f.write(_chain_card_section(chain, i, teacher))
                marker = {"stage": i, "name": chain["stages"][i]["name"], "teacher": teacher, "finished": True}
                (folder / (MARKER + ".tmp")).write_text(json.dumps(marker, indent=2))
                os.replace(folder / (MARKER + ".tmp"), folder / MARKER)
        if stop_after is not None and i + 1 == int(stop_after) and i + 1 < len(recipes):
            raise ChainInterrupted(f"{STOP_AFTER_ENV}={stop_after}: stopped after stage {i + 1}.")
    print(f"[chain] done: the final student is in {recipes[-1]['output_dir']}")
