"""Sequence-level KD targets (Kim & Rush 2016) from a served teacher: its completion of each prompt becomes the
training row (`hf-distill cache-teacher --generate --teacher_api_base URL`). A black-box teacher has no log-probs, so
the student learns the teacher's sequences with CE. Completions cut at the length limit are counted (SFT would append
an EOS there) and warned about or dropped.
"""

import logging
import os
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from .api import APITeacher


logger = logging.getLogger(__name__)


def generate_completions_dataset(
    teacher: "APITeacher",
    dataset: Any,
    output_dir: str,
    *,
    prompt_column: str = "prompt",
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    show_progress: bool = True,
    drop_truncated: bool = False,
) -> Any:
    """Sequence-level KD targets from an API teacher: each row's completion written by the teacher.

    A completion cut at `max_new_tokens` (`finish_reason: "length"`) still gets an EOS from `trl.SFTTrainer` (it
    appends one to every text completion; a chat template closes the turn), which teaches the student to stop where
    the teacher was cut off. Such rows are counted and warned about, or dropped with `drop_truncated=True`.

    Args:
        dataset ([`~datasets.Dataset`]): rows with a `prompt_column` of text or chat messages; other columns are
            kept, an existing `completion` column is replaced.
        output_dir (`str`): the response store (`api_responses.jsonl`, resumable) and the result,
            `<output_dir>/train_dataset` (`save_to_disk`).
        drop_truncated (`bool`, *optional*, defaults to `False`): leave out the rows whose completion stopped at
            `max_new_tokens` instead of warning about them.

    Returns:
        [`~datasets.Dataset`]: the rows with `completion` (text, or `[{"role": "assistant", ...}]` for chat-message
        prompts) ready for `trl.SFTTrainer` / `hf-distill train` (a black-box teacher has no log-probs: the student
        learns the teacher's sequences with CE, as in Kim & Rush 2016).
    """
    if prompt_column not in dataset.column_names:
        raise ValueError(
            f"An API teacher needs text prompts: the dataset has no {prompt_column!r} column (columns: "
            f"{dataset.column_names}); set `prompt_column`."
        )
    prompts = list(dataset[prompt_column])
    results, _ = teacher.generate(
        prompts,
        os.path.join(output_dir, "api_responses.jsonl"),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        desc="seq-KD targets",
        show_progress=show_progress,
    )
    texts = [r[0]["text"] for r in results]
    completions = [
        text if isinstance(p, str) else [{"role": "assistant", "content": text}] for p, text in zip(prompts, texts)
    ]
    if "completion" in dataset.column_names:
        dataset = dataset.remove_columns("completion")
    dataset = dataset.add_column("completion", completions)
    truncated = [i for i, r in enumerate(results) if r[0].get("finish_reason") == "length"]
    if truncated and drop_truncated:
        if len(truncated) == len(dataset):
            raise ValueError(
                f"Every teacher completion stopped at max_new_tokens={max_new_tokens} (finish_reason 'length'), so "
                "`drop_truncated` leaves no row: raise max_new_tokens."
            )
        cut = set(truncated)
        dataset = dataset.select([i for i in range(len(dataset)) if i not in cut])
        logger.info(
            "Dropped %d of %d rows whose teacher completion stopped at max_new_tokens.", len(cut), len(prompts)
        )
    elif truncated:
        logger.warning(
            "%d of %d teacher completions stopped at max_new_tokens=%d (finish_reason 'length'). SFT appends EOS to "
            "each completion (a chat template closes the turn), so the student learns to stop where the teacher was "
            "cut off: raise max_new_tokens, or drop those rows (`--drop_truncated true`, `drop_truncated=True`).",
            len(truncated), len(prompts), max_new_tokens,
        )  # fmt: skip
    dataset.save_to_disk(os.path.join(output_dir, "train_dataset"))
    return dataset


__all__ = ["generate_completions_dataset"]
