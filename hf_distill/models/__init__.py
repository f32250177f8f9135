"""Models outside the training loop's own: loading (Hub id, local path, GGUF, the `smollm2` / `gemma3` shorthands),
the checks that a teacher can teach a student, and placement of a frozen teacher beside the student.

Used by the teacher sources, student construction, MiniPLM, rationales and the CLI alike.
"""

from .checks import (
    check_same_tokenizer,
    check_saved_tokenizer,
    check_teacher,
    check_tokenizer_of_model,
    load_teacher,
    saved_tokenizer,
    shared_vocab_size,
    teacher_tokenizer_of,
    tokenizer_vocab_size,
)
from .loading import (
    SHORTHANDS,
    Shorthand,
    dequantized_copy,
    gemma3_folder,
    gemma3_location,
    gemma3_model,
    gemma3_tokenizer,
    load_model,
    load_tokenizer,
    output_vocab_size,
    parse_init_kwargs,
    quantized_student_kwargs,
    shorthand_of,
    smollm2_folder,
    smollm2_location,
)
from .placement import check_teacher_fits, prepare_teacher, shared_parameter_names, unregister_model


__all__ = [
    "SHORTHANDS",
    "Shorthand",
    "check_same_tokenizer",
    "check_saved_tokenizer",
    "check_teacher",
    "check_teacher_fits",
    "check_tokenizer_of_model",
    "dequantized_copy",
    "gemma3_folder",
    "gemma3_location",
    "gemma3_model",
    "gemma3_tokenizer",
    "load_model",
    "load_teacher",
    "load_tokenizer",
    "output_vocab_size",
    "parse_init_kwargs",
    "prepare_teacher",
    "quantized_student_kwargs",
    "saved_tokenizer",
    "shared_parameter_names",
    "shared_vocab_size",
    "shorthand_of",
    "smollm2_folder",
    "smollm2_location",
    "teacher_tokenizer_of",
    "tokenizer_vocab_size",
    "unregister_model",
]
