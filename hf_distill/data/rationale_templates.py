"""Few-shot chain-of-thought templates for rationale generation, and the answer parsers they use.

Shipped: `ESNLI_TEMPLATE` (NLI: premise/hypothesis -> entailment/neutral/contradiction) and `SVAMP_TEMPLATE` (math word
problems: question -> number, compared by exact numeric match of the evaluated answer). Users pass their own
`RationaleTemplate` (few-shot examples, input formatter, gold-label reader, answer parser).
"""

import ast
import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


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
