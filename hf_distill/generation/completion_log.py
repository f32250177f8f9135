"""`log_completions: true`: every on-policy completion in `output_dir/completions.jsonl`, and a few printed.

One JSON object per row, appended as the rows are trained on (a run that starts at step 1 starts a new file; a
resumed run appends):

- `step`: the optimizer step that trains on the row (1-based, as `checkpoint-{step}`);
- `policy_step`: the optimizer step of the weights that sampled it (`step - 1` with `generate` and with vLLM synced
  every step: the weights of `checkpoint-{step - 1}`; older with `vllm_sync_steps` > 1 or `vllm_overlap_generation`);
- `prompt_ids`, `completion_ids`: token ids; `prompt`, `completion`: their text (special tokens kept) when the run
  has a tokenizer.

Under several processes each process's rows are gathered to the main process, which alone writes. At each logging
step a small table of the newest rows is printed, as TRL's `log_completions` does (with `rich` when installed).
"""

import json
import logging
import os
from typing import Any


logger = logging.getLogger(__name__)

FILE_NAME = "completions.jsonl"


class CompletionLog:
    """Appends on-policy completions to `output_dir/completions.jsonl` and prints a sample at logging steps.

    Args:
        output_dir (`str`): the run's output folder.
        tokenizer (*optional*): decodes prompts and completions (`tokenizer.decode`); None writes ids only.
        logging_steps (`float`, defaults to `1`): print at steps that are multiples of it (and at step 1).
        num_to_print (`int`, *optional*, defaults to `4`): rows printed (None: all of the window).
    """

    def __init__(self, output_dir: str, tokenizer: Any = None, logging_steps: float = 1, num_to_print: int | None = 4):
        self.path = os.path.join(output_dir, FILE_NAME)
        self.tokenizer = tokenizer
        self.logging_steps = max(1, int(logging_steps)) if logging_steps >= 1 else 1
        self.num_to_print = num_to_print
        self._started = False  # whether this run has written (or cleared) the file yet

    def rows(self, step: int, policy_step: int, prompts: list[list[int]], completions: list[list[int]]) -> list[dict]:
        """The JSON rows of one micro-batch's B prompts and their B completions."""
        out = []
        for prompt, completion in zip(prompts, completions):
            row = {"step": step, "policy_step": policy_step, "prompt_ids": prompt, "completion_ids": completion}
            if self.tokenizer is not None:
                row["prompt"] = self.tokenizer.decode(prompt, skip_special_tokens=False)
                row["completion"] = self.tokenizer.decode(completion, skip_special_tokens=False)
            out.append(row)
        return out

    def write(self, rows: list[dict], accelerator: Any = None, step: int | None = None) -> None:
        """Append `rows` (gathered from every process first: call it on all of them, once per accumulation window)
        and print a sample at logging steps. The first call of a run that starts at `step` 1 empties the file (an
        earlier run's rows never mix in); a resumed run appends."""
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            rows = gather_object(rows)
        if accelerator is not None and not accelerator.is_main_process:
            return
        if not self._started and step == 1 and os.path.exists(self.path):
            os.remove(self.path)
        self._started = True
        if not rows:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        step = rows[-1]["step"]
        if step == 1 or step % self.logging_steps == 0:
            self.print_table(rows[: self.num_to_print] if self.num_to_print is not None else rows)

    def print_table(self, rows: list[dict]) -> None:
        """A table of step, policy step, prompt and completion (the last 80 characters of the prompt)."""
        if not rows:
            return
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:  # plain log lines
            for row in rows:
                logger.info("step %d (policy %d): %r -> %r", row["step"], row["policy_step"],
                            _text(row, "prompt")[-80:], _text(row, "completion"))  # fmt: skip
            return
        table = Table(title=f"On-policy completions, step {rows[-1]['step']}", show_lines=True)
        for column in ("step", "policy step", "prompt", "completion"):
            table.add_column(column)
        for row in rows:
            table.add_row(
                str(row["step"]), str(row["policy_step"]), _text(row, "prompt")[-80:], _text(row, "completion")
            )
        Console().print(table)


def _text(row: dict, key: str) -> str:
    return row[key] if key in row else str(row[f"{key}_ids"])


def read_completions(output_dir: str) -> list[dict]:
    """The rows of `output_dir/completions.jsonl`, in order."""
    with open(os.path.join(output_dir, FILE_NAME), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
