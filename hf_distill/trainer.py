"""`DistillationMixin` holds all distillation logic; `DistillationTrainer` and `DistillationSFTTrainer` are thin
subclasses of `transformers.Trainer` and `trl.SFTTrainer`.

Loss per optimizer step (Hinton et al. 2015, with GKD's divergences):

    loss = (ce_weight * sum CE + kd_weight * T^2 * sum divergence) / num_items

where both sums run over supervised tokens (labels != -100) of the micro-batch and `num_items` counts the supervised
tokens of the whole gradient-accumulation window on all processes, so 2 x 2 accumulation gives the gradients of one
batch of 4 (and DDP's gradient averaging is undone by multiplying with the number of processes, as transformers does).
Batches with a `task` tensor (distilling step-by-step, `RationaleCollator`) get per-task token means instead:
`label_weight * L_label + rationale_weight * L_rationale` (see `hf_distill.multitask`).
"""

import logging
import os
from collections import defaultdict
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer
from trl import SFTTrainer

from .config import DistillationArguments, DistillationConfig, DistillationSFTConfig
from .features.hints import HintDistiller
from .features.projectors import ProjectorGradReset, load_projectors, save_projectors
from .heads import (
    aligned_labels,
    aligned_logits,
    check_teacher,
    decoder_of,
    detect_head,
    divergence_kwargs,
    lm_head_of,
    logit_terms,
    supervised_mask,
)
from .losses.fused import fused_logit_distillation_loss
from .model_card import trainer_model_card
from .multitask import TASK_COUNTS_KEY, add_window_task_counts, multitask_loss, split_by_task
from .quantization import fake_quantized_weights, prepare_qat_student
from .sanity import check_first_step_kd, nonfinite_teacher_problem, warn_mixed_precision_mismatch, warn_once
from .taid import TaidCallback
from .teacher_sources import TeacherSourcesMixin
from .teachers.cache import CACHE_BATCH_KEYS, CachedTeacherOutputs, cache_logit_terms, cached_teacher_outputs
from .teachers.ensemble import multi_teacher_logit_terms, setup_teachers
from .teachers.loading import (
    check_same_tokenizer,
    check_tokenizer_of_model,
    load_model,
    load_tokenizer,
    prepare_teacher,
)


logger = logging.getLogger(__name__)

# Batch keys that are not model inputs (targets, and masks produced by collators).
NON_MODEL_KEYS = {"labels", "shift_labels", "completion_mask", "assistant_masks", "task", TASK_COUNTS_KEY}
NON_MODEL_KEYS.update(CACHE_BATCH_KEYS)  # teacher-cache entries added by TeacherCacheCollator


class _SkipBatch(Exception):  # control flow, not an error
    """Raised inside `_loss_terms` when `nonfinite_teacher="skip"` drops a micro-batch."""

    def __init__(self, outputs: Any) -> None:
        self.outputs = outputs


def _tokenizer_of(processing_class: Any) -> Any:
    return getattr(processing_class, "tokenizer", processing_class)


class DistillationMixin(TeacherSourcesMixin):
    """Teacher handling, loss assembly and metrics shared by both distillation trainers."""

    _tag_names: ClassVar[list[str]] = ["hf-distill", "distillation"]
    _config_class: type = DistillationConfig
    loss_is_scaled_for_ga = True  # compute_loss divides by the accumulation window's token count itself
    recipe: Any = None  # the CLI's `hf_distill.recipes.Recipe`: embedded in the model card

    def __init__(
        self,
        model=None,
        teacher_model: PreTrainedModel | str | None = None,
        args=None,
        teacher_processing_class: Any = None,
        **kwargs,
    ):
        if args is None:
            args = self._config_class(output_dir="tmp_trainer")
        if not isinstance(args, DistillationArguments):
            raise TypeError(
                f"{type(self).__name__} needs `args` of type {self._config_class.__name__} (it carries the "
                f"distillation fields), got {type(args).__name__}."
            )
        teacher_model = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        teacher_model = teacher_model if teacher_model is not None else args.teacher_models_name_or_path
        n_teachers = len(teacher_model) if isinstance(teacher_model, list | tuple) else int(teacher_model is not None)
        if args.teacher_weights is not None and n_teachers < 2:
            raise ValueError(
                f"`teacher_weights` ({args.teacher_weights}) weighs several teachers, but {n_teachers} teacher is "
                "given, so it would have no effect. Remove it, or give several teachers (a list as `teacher_model=` "
                "or `teacher_models_name_or_path`)."
            )
        self._teacher_cache = self._open_teacher_cache(args, teacher_model, kwargs)
        if teacher_model is None and self._needs_teacher(args):
            raise ValueError(
                "No teacher given: pass `teacher_model=` (a model or a Hub id/path) or set "
                "`teacher_model_name_or_path` in the config. To fine-tune without a teacher set `kd_weight=0`."
            )
        self._check_dataset(kwargs.get("train_dataset"), args, kwargs.get("data_collator"))
        super().__init__(model=model, args=args, **kwargs)
        # Make Trainer count the supervised tokens of each accumulation window (`num_items_in_batch`).
        self.model_accepts_loss_kwargs = True
        warn_mixed_precision_mismatch(self.args)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._skipped_batches = 0  # micro-batches dropped by nonfinite_teacher="skip"
        self._head = detect_head(self.model)
        self._loss_shifts_labels = self._head.shifts_labels  # how Trainer counts `num_items_in_batch`: as we do
        if args.student_quantization is not None:  # torchao QAT: fake-quantized Linear layers (quantization.py)
            unwrapped = self.accelerator.unwrap_model(self.model)
            prepare_qat_student(unwrapped, args.student_quantization, args.student_quantization_group_size)
        if hasattr(self.data_collator, "check_model"):  # e.g. RationaleCollator: seq2seq vs causal views
            self.data_collator.check_model(self.model)
        self.teacher, self._vocab_size, self._fused = None, None, False
        self._hints = None
        if teacher_model is not None and not self._needs_teacher(args):
            logger.info("kd_weight is 0 and no hint/relation term is on: the teacher is not loaded or run.")
        elif isinstance(teacher_model, list | tuple):
            setup_teachers(self, teacher_model, teacher_processing_class)
        elif teacher_model is not None:
            self._setup_teacher(teacher_model, teacher_processing_class)
        self._setup_teacher_sources()
        if args.kd_loss == "taid":  # TAID's t is training state: moved, logged and checkpointed by this callback
            self.add_callback(TaidCallback.from_args(args).publish(args))
        if self.teacher is not None and args.uses_features:
            self._setup_hints()
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

    # ----------------------------------------------------------------------------------------------- set-up
    @staticmethod
    def _needs_teacher(args: DistillationArguments) -> bool:
        return (args.kd_weight > 0 and args.teacher_cache is None) or args.uses_features or args.seq_kd

    def _check_dataset(self, dataset: Any, args: DistillationArguments, collator: Any = None) -> None:
        columns = getattr(dataset, "column_names", None)
        if not columns or isinstance(columns, dict):
            return
        usable = self._usable_columns(args)
        if getattr(collator, "dataset_columns", None):  # a collator that reads raw columns (RationaleCollator)
            usable = [tuple(collator.dataset_columns)]
        if not any(set(group) <= set(columns) for group in usable):
            raise ValueError(
                f"The training dataset has columns {columns}, but {type(self).__name__} needs one of "
                f"{' | '.join('+'.join(g) for g in usable)}. Rename or map your columns (e.g. `dataset.map`), or "
                "tokenize them first."
            )

    def _usable_columns(self, args: DistillationArguments) -> list[tuple[str, ...]]:
        return [("input_ids",)]

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        extra = [c for c in getattr(self.data_collator, "dataset_columns", ()) if c not in self._signature_columns]
        self._signature_columns += extra  # raw columns read by the collator survive `remove_unused_columns`

    def _teacher_auto_class(self) -> type:
        return self._head.auto_class

    def _setup_teacher(self, teacher: PreTrainedModel | str, teacher_processing_class: Any) -> None:
        init_kwargs = dict(self.args.teacher_model_init_kwargs or {})
        given_as_model = not isinstance(teacher, str)  # a name or path has had its own tokenizer loaded below
        if isinstance(teacher, str):
            if teacher_processing_class is None:
                try:
                    teacher_processing_class = load_tokenizer(teacher, gguf_file=init_kwargs.get("gguf_file"))
                except (OSError, ValueError) as err:
                    logger.warning(
                        "Could not load the teacher tokenizer of %s (%s); vocabularies are compared by size only.",
                        teacher,
                        err,
                    )
            teacher = load_model(teacher, self._teacher_auto_class(), **init_kwargs)
        student_tok = _tokenizer_of(self.processing_class)
        if teacher_processing_class is not None and student_tok is not None:
            check_same_tokenizer(student_tok, _tokenizer_of(teacher_processing_class))
        elif given_as_model and student_tok is not None and teacher is not self.accelerator.unwrap_model(self.model):
            check_tokenizer_of_model(teacher, student_tok)
        self._vocab_size = check_teacher(self.accelerator.unwrap_model(self.model), teacher, student_tok)
        self.teacher = prepare_teacher(teacher, self)
        self._fused = self._fused_supported()

    def _setup_hints(self) -> None:
        """Layer map and projectors; the projectors train with the student (own optimizer group, synced across
        processes) and are checkpointed beside it, but are never part of the exported student."""
        self._hints = HintDistiller(self.args, self.accelerator.unwrap_model(self.model), self.teacher)
        if self._hints.projectors is not None:
            self._hints.projectors.to(self.args.device)
            if self.accelerator.num_processes > 1:  # DDP-wrapped so their gradients are averaged like the student's
                self._hints.projectors = self.accelerator.prepare_model(self._hints.projectors)
                # not a model of the run: keep it out of save_state and of Trainer's "student prepared?" check
                wrapped = self._hints.projectors
                self.accelerator._models[:] = [m for m in self.accelerator._models if m is not wrapped]
            self.add_callback(ProjectorGradReset(self._hints.projectors))  # Trainer zeroes only the student's

    def _projectors(self) -> nn.Module | None:
        projectors = self._hints.projectors if self._hints is not None else None
        return self.accelerator.unwrap_model(projectors) if projectors is not None else None

    def _clip_grad_norm(self, model):
        """One gradient norm (and clip) over the student and the hint projectors, which train together."""
        projectors = self._projectors()
        params = [p for p in projectors.parameters() if p.grad is not None] if projectors is not None else []
        if not params:
            return super()._clip_grad_norm(model)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:  # the engine clips its own (sharded) parameters
            torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm)
            logger.warning_once("Under FSDP/DeepSpeed the hint projectors are clipped on their own gradient norm.")
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_([*model.parameters(), *params], self.args.max_grad_norm)

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        projectors = self._projectors()
        if projectors is not None and any(True for _ in projectors.parameters()):
            self.optimizer.add_param_group({"params": list(projectors.parameters()), "weight_decay": 0.0})
        return optimizer

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        projectors = self._projectors()
        if projectors is not None and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            save_projectors(projectors, folder)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """As `Trainer.save_model`; a QAT student (`student_quantization`) is saved with its weights rounded onto the
        int grid, except in checkpoints (`checkpoint-N`), which keep the latent fp32 weights for resuming."""
        if self.args.student_quantization is None or (_internal_call and output_dir is not None):
            return super().save_model(output_dir, _internal_call)
        with fake_quantized_weights(self.accelerator.unwrap_model(self.model)):
            return super().save_model(output_dir, _internal_call)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        projectors = self._projectors()
        if projectors is not None:
            load_projectors(projectors, resume_from_checkpoint)

    def _fused_supported(self) -> bool:
        """Whether the chunked hidden-state loss reproduces both models' logits here; logs why not, once."""
        if not self.args.use_fused_kd_loss:
            return False
        reason = None
        if self._head.kind != "causal_lm":
            reason = f"the student is a {self._head.kind} model"
        elif self.is_fsdp_enabled or self.is_deepspeed_enabled:
            reason = "FSDP/DeepSpeed shard the lm_head weights outside forward"
        elif lm_head_of(self.model) is None or lm_head_of(self.teacher) is None:
            reason = "the student's or teacher's logits are not a plain lm_head of the last hidden state"
        if reason:
            logger.info(
                "Using materialised logits for the KD loss: %s (set use_fused_kd_loss=False to silence).", reason
            )
        return reason is None

    # ----------------------------------------------------------------------------------------------- loss
    def _model_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        model_inputs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
        if self._head.kind == "seq2seq" and "decoder_input_ids" not in model_inputs:
            unwrapped = self.accelerator.unwrap_model(self.model)
            model_inputs["decoder_input_ids"] = unwrapped.prepare_decoder_input_ids_from_labels(
                labels=inputs["labels"]
            )
        model_inputs["use_cache"] = False
        return model_inputs

    def _loss_terms(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[dict, dict, torch.Tensor, Any]:
        """Summed loss terms of one micro-batch.

        The steps are methods so that each feature overrides one of them: `_prepare_batch` (batch rewriting, e.g.
        on-policy samples), `_teacher_outputs` (live teacher or cache), `_logit_terms` (KD + CE) and `_extra_terms`
        (hidden-state hints, attention and relation losses).

        Returns:
            `(sums, weights, n_tokens, student_outputs)`: `sums[name]` is a scalar summed over the supervised tokens,
            `weights[name]` its factor in the loss, `n_tokens` the number of supervised tokens.
        """
        inputs = self._prepare_batch(model, inputs)
        if "labels" not in inputs:
            raise ValueError(
                f"The batch has no `labels` (keys: {sorted(inputs)}). Use a collator that adds them, e.g. "
                "`DataCollatorForLanguageModeling(tokenizer, mlm=False)`, or DistillationSFTTrainer for raw text."
            )
        model_inputs = self._model_inputs(inputs)
        self._check_length(inputs)
        forward_kwargs = self._forward_kwargs()
        if self._fused:  # final hidden states instead of [B, T, V] logits (one position's logits is kept)
            forward_kwargs = {**forward_kwargs, "output_hidden_states": True, "logits_to_keep": 1}
        outputs = model(**model_inputs, **forward_kwargs)
        teacher_outputs = self._teacher_outputs(model_inputs, inputs)
        self._check_finite(teacher_outputs, outputs, inputs)
        sums, weights, n_tokens = self._logit_terms(outputs, teacher_outputs, inputs)
        extra_sums, extra_weights = self._extra_terms(outputs, teacher_outputs, inputs)
        sums.update(extra_sums)
        weights.update(extra_weights)
        return sums, weights, n_tokens, outputs

    def _check_length(self, inputs: dict[str, Any]) -> None:
        """Warn once when a batch is longer than a model's `max_position_embeddings` (`max_length` not set)."""
        positions = inputs.get("position_ids")
        length = int(positions.max()) + 1 if positions is not None else inputs["input_ids"].shape[-1]
        for name, model in (("student", self.model), ("teacher", self.teacher)):
            if model is None:  # no live teacher (a cache, or CE only)
                continue
            config = getattr(self.accelerator.unwrap_model(model), "config", None)
            limit = getattr(config, "max_position_embeddings", 0)
            if isinstance(limit, int) and 0 < limit < length:
                warn_once(
                    "A batch has sequences of %d positions, more than the %s's max_position_embeddings (%d): "
                    "positions beyond it are outside what the model was trained for. Set `max_length` (<= %d) to "
                    "truncate rows.",
                    length,
                    name,
                    limit,
                    limit,
                )

    def _check_finite(self, teacher_outputs: Any, outputs: Any, inputs: dict[str, Any]) -> None:
        """Stop (or, with `nonfinite_teacher="skip"`, drop the micro-batch) when the teacher's outputs hold NaN/inf:
        a divergence against them would silently turn the student's weights into NaN."""
        problem = nonfinite_teacher_problem(teacher_outputs, self.teacher) if teacher_outputs is not None else None
        if problem is None:
            return
        training = self.model.training
        where = f"optimizer step {self.state.global_step + 1}" if training else "evaluation"
        rows = f"micro-batch of {inputs['labels'].shape[0]} rows"
        if self.args.nonfinite_teacher == "skip" and training:
            self._skipped_batches += 1
            logger.warning(
                "Skipped a %s at %s (%d skipped so far; nonfinite_teacher=skip): %s",
                rows,
                where,
                self._skipped_batches,
                problem,
            )
            raise _SkipBatch(outputs)
        raise FloatingPointError(
            f"Non-finite teacher outputs at {where} ({rows}; nothing of this step was applied, saved checkpoints are "
            f"untouched): {problem} To drop such micro-batches instead, set `nonfinite_teacher=skip`."
        )

    def _prepare_batch(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """Hook to rewrite the batch before the forward passes (identity here)."""
        return inputs

    def _forward_kwargs(self) -> dict[str, Any]:
        """Extra forward arguments for both models (e.g. `output_hidden_states=True` for hints)."""
        return self._hints.forward_kwargs() if self._hints is not None else {}

    def _teacher_outputs(self, model_inputs: dict[str, Any], inputs: dict[str, Any]) -> Any:
        """The teacher's outputs on the student's inputs, or None without a teacher."""
        if self._teacher_cache is not None:
            return cached_teacher_outputs(inputs)
        if len(self.teachers) > 1:
            with torch.no_grad():
                return [teacher(**model_inputs, **self._forward_kwargs()) for teacher in self.teachers]
        if self.teacher is None:
            return None
        with torch.no_grad():
            if self._fused and not self._forward_kwargs():  # the base model alone: no lm_head, no logits
                return decoder_of(self.teacher)(**model_inputs)
            kwargs = {
                **self._forward_kwargs(),
                **({"output_hidden_states": True, "logits_to_keep": 1} if self._fused else {}),
            }
            return self.teacher(**model_inputs, **kwargs)

    def _logit_terms(
        self, outputs: Any, teacher_outputs: Any, inputs: dict[str, Any]
    ) -> tuple[dict, dict, torch.Tensor]:
        """KD (`sum divergence`, weight `kd_weight * T^2`) and CE (`sum CE`, weight `ce_weight`), summed over
        supervised positions of the student's head (see `heads.py`: tokens, masked tokens or examples)."""
        if "task" in inputs:  # distilling step-by-step: one set of terms per task view (multitask.py)
            return split_by_task(self._logit_terms, outputs, teacher_outputs, inputs)
        labels, shift_labels = inputs["labels"], inputs.get("shift_labels")
        if isinstance(teacher_outputs, CachedTeacherOutputs):
            return cache_logit_terms(self, outputs, teacher_outputs, inputs)
        if isinstance(teacher_outputs, list):
            return multi_teacher_logit_terms(self, outputs, teacher_outputs, inputs)
        if self._fused:
            return self._fused_logit_terms(outputs, teacher_outputs, labels, shift_labels)
        teacher_logits = teacher_outputs.logits if teacher_outputs is not None else None
        terms = logit_terms(
            outputs.logits, teacher_logits, labels, self._head, self.args, self._vocab_size, shift_labels
        )
        if terms.agreement is not None:
            self._record_sum("top1_agreement", *terms.agreement)
        if "kd" in terms.sums:  # warns once if KD is exactly 0 on the first step
            check_first_step_kd(self, terms.sums["kd"], terms.n_items)
        return terms.sums, terms.weights, terms.n_items

    def _fused_logit_terms(
        self, outputs: Any, teacher_outputs: Any, labels: torch.Tensor, shift_labels: torch.Tensor | None
    ) -> tuple[dict, dict, torch.Tensor]:
        """KD and CE sums from final hidden states, chunked over tokens (never the full [N, V] logits)."""
        args: DistillationArguments = self.args
        mask = supervised_mask(labels, self._head, shift_labels)
        s_hidden = aligned_logits(outputs.hidden_states[-1], self._head, shift_labels)[mask]
        t_last = getattr(teacher_outputs, "last_hidden_state", None)
        t_last = teacher_outputs.hidden_states[-1] if t_last is None else t_last
        t_hidden = aligned_logits(t_last, self._head, shift_labels)[mask]
        y = aligned_labels(labels, self._head, shift_labels)[mask]
        s_head, t_head = lm_head_of(self.model), lm_head_of(self.teacher)
        stats: dict[str, torch.Tensor] = {}
        kd, ce = fused_logit_distillation_loss(
            s_hidden,
            s_head.weight,
            t_hidden,
            t_head.weight,
            **divergence_kwargs(args),
            chunk_size=args.kd_chunk_size,
            student_bias=s_head.bias,
            teacher_bias=t_head.bias,
            student_logit_scale=s_head.logit_scale,
            teacher_logit_scale=t_head.logit_scale,
            student_softcap=s_head.softcap,
            teacher_softcap=t_head.softcap,
            vocab_size=self._vocab_size,
            labels=y,
            reduction="sum",
            stats=stats,
            loss_weights=(args.kd_weight * args.temperature**2, args.ce_weight),
        )
        if "top1_agreement" in stats:
            self._record_sum("top1_agreement", stats["top1_agreement"], y.numel())
        check_first_step_kd(self, kd, y.numel())
        sums = {"kd": kd, "ce": ce}
        weights = {"kd": args.kd_weight * args.temperature**2, "ce": args.ce_weight}
        return sums, weights, y.new_tensor(y.numel())

    def _extra_terms(self, outputs: Any, teacher_outputs: Any, inputs: dict[str, Any]) -> tuple[dict, dict]:
        """Hidden-state hints, attention transfer and relation terms (`hf_distill.features.hints`), when configured."""
        if self._hints is None:
            return {}, {}
        n_tokens = supervised_mask(inputs["labels"], self._head, inputs.get("shift_labels")).sum()
        return self._hints.terms(outputs, teacher_outputs, inputs, self._head, n_tokens)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        try:
            sums, weights, n_tokens, outputs = self._loss_terms(model, inputs)
        except _SkipBatch as skip:  # a zero loss that still reaches every student parameter (DDP needs the backward)
            outputs = skip.outputs
            loss = 0.0 * sum(p.sum() for p in model.parameters() if p.requires_grad)
            return (loss, outputs) if return_outputs else loss
        self._observe_taid(model, sums, n_tokens)
        if "task" in inputs:  # label_weight * L_label + rationale_weight * L_rationale, per-task token means
            loss = multitask_loss(self, sums, weights, n_tokens, inputs, num_items_in_batch)
            return (loss, outputs) if return_outputs else loss
        total = sum(weights[k] * v for k, v in sums.items())
        for name, value in sums.items():
            self._record_sum(f"{name}_loss", value.detach(), n_tokens)
        self._record_sum("total_loss", total.detach(), n_tokens)
        if num_items_in_batch is None:
            loss = total / n_tokens.clamp(min=1)
        else:
            loss = total / torch.as_tensor(num_items_in_batch, device=total.device).clamp(min=1)
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        return (loss, outputs) if return_outputs else loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        add_window_task_counts(batch_samples, self._head, self.args, self.accelerator)  # per-task GA normalisation
        return batch_samples, num_items_in_batch

    def _observe_taid(self, model: nn.Module, sums: dict, n_tokens: torch.Tensor) -> None:
        """Adds this micro-batch's KD sum and token count, summed over processes, to TAID's optimizer-step loss."""
        taid = self._taid_callback()
        kd_keys = [k for k in sums if k == "kd" or k.endswith("_kd")]  # `label_kd` / `rationale_kd` for step-by-step
        if taid is None or not model.training or not kd_keys:
            return
        kd = sum(sums[k] for k in kd_keys).detach().double()
        pair = torch.stack([kd, torch.as_tensor(n_tokens, dtype=torch.float64, device=kd.device)])
        taid.observe(self.accelerator.gather(pair.to(self.accelerator.device).unsqueeze(0)).sum(0))

    def _taid_callback(self) -> TaidCallback | None:
        """The TAID callback (looked up each time: resuming with `restore_callback_states_from_checkpoint` replaces
        it by a new instance)."""
        if self.args.kd_loss != "taid":
            return None
        return next((cb for cb in self.callback_handler.callbacks if isinstance(cb, TaidCallback)), None)

    # ----------------------------------------------------------------------------------------------- metrics
    def _record_sum(self, name: str, value: torch.Tensor, count: torch.Tensor | int) -> None:
        """Accumulate a token-summed metric; `log` reports sum / count over all processes."""
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        pair = torch.stack(
            [
                torch.as_tensor(value, device=device, dtype=torch.float64).detach(),
                torch.as_tensor(count, device=device, dtype=torch.float64),
            ]
        )
        total = self.accelerator.gather_for_metrics(pair.unsqueeze(0)).sum(0)
        self._metrics[mode][name].append(total.tolist())

    def _averaged_metrics(self, mode: str) -> dict[str, float]:
        metrics = {}
        for name, pairs in self._metrics[mode].items():
            value, count = map(sum, zip(*pairs))
            metrics[name] = value / count if count else 0.0
        self._metrics[mode].clear()
        return metrics

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = self._averaged_metrics(mode)
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        elif (taid := self._taid_callback()) is not None:
            metrics["taid_t"] = taid.t
        logs.update(metrics)
        super().log(logs, *args, **kwargs)

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, **kwargs) -> None:
        """Write README.md in `output_dir` with our card (tags, teacher, losses, results); used by `push_to_hub`."""
        if not self.is_world_process_zero():
            return
        dataset = dataset_name or kwargs.get("dataset")
        card = trainer_model_card(self, model_name, dataset if isinstance(dataset, str) else None)
        os.makedirs(self.args.output_dir, exist_ok=True)
        card.save(os.path.join(self.args.output_dir, "README.md"))

    def evaluation_loop(self, *args, **kwargs):
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        output.metrics.update({f"{prefix}_{k}": v for k, v in self._averaged_metrics("eval").items()})
        return output


class DistillationTrainer(DistillationMixin, Trainer):
    """`transformers.Trainer` with a teacher. Drop-in: same arguments plus `teacher_model` and a `DistillationConfig`.

    Example:
        >>> trainer = DistillationTrainer(model=student, teacher_model=teacher, args=DistillationConfig("out"),
        ...                               train_dataset=tokenized, data_collator=collator, processing_class=tok)
    """

    _config_class = DistillationConfig


class DistillationSFTTrainer(DistillationMixin, SFTTrainer):
    """`trl.SFTTrainer` with a teacher: chat templates, completion-only / assistant-only loss, packing and
    `peft_config` work as in TRL; the loss adds the teacher's distribution on the same supervised tokens."""

    _config_class = DistillationSFTConfig

    def _usable_columns(self, args: DistillationArguments) -> list[tuple[str, ...]]:
        return [(args.dataset_text_field,), ("messages",), ("prompt", "completion"), ("prompt",), ("input_ids",)]
