"""`DistillationMixin` holds all distillation logic; `DistillationTrainer` and `DistillationSFTTrainer` are thin
subclasses of `transformers.Trainer` and `trl.SFTTrainer`.

Every micro-batch goes through one `TeacherSource` (`hf_distill.teachers`), chosen once in `__init__`: the student's
forward with the source's kwargs, the source's teacher outputs, its loss terms on the batch's `SupervisedView`, plus
the feature terms (`hf_distill.features`). Loss per optimizer step (Hinton et al. 2015, with GKD's divergences):

    loss = (ce_weight * sum CE + kd_weight * T^2 * sum divergence) / num_items

where both sums run over supervised tokens (labels != -100) of the micro-batch and `num_items` counts the supervised
tokens of the whole gradient-accumulation window on all processes, so 2 x 2 accumulation gives the gradients of one
batch of 4 (and DDP's gradient averaging is undone by multiplying with the number of processes, as transformers does).
Batches with a `task` tensor (distilling step-by-step, `RationaleCollator`) get per-task token means instead:
`label_weight * L_label + rationale_weight * L_rationale` (see `hf_distill.terms`).
"""

import logging
import os
from collections import defaultdict
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer
from trl import SFTTrainer

from .checkpoints import CheckpointFileCallback
from .config import DistillationArguments, DistillationConfig, DistillationSFTConfig
from .features.early_exit import EarlyExits
from .features.hints import HintDistiller, feature_forward_kwargs
from .features.projectors import ProjectorCallback, load_projectors
from .generation.onpolicy import PolicyBatchRewriter
from .generation.vllm_sampler import VLLMStudentSampler
from .heads import detect_head
from .model_card import trainer_model_card
from .models import prepare_teacher, unregister_model
from .quantization import fake_quantized_weights, prepare_qat_student
from .sanity import (
    check_first_step_kd,
    check_rows_left,
    low_precision_weights_problem,
    nonfinite_loss_problem,
    nonfinite_teacher_problem,
    warn_if_too_long,
    warn_mixed_precision_mismatch,
)
from .taid import TaidCallback
from .teachers import SourceContext, SourceRequest, TeacherSource, select_source
from .terms import (
    TASK_COUNTS_KEY,
    LossState,
    LossTerms,
    SupervisedView,
    add_window_task_counts,
    normalised_loss,
    terms_per_task,
)


logger = logging.getLogger(__name__)

# Batch keys that are not model inputs (targets, and masks produced by collators); each teacher source adds its own
# (`TeacherSource.batch_keys`).
NON_MODEL_KEYS = frozenset({"labels", "shift_labels", "completion_mask", "assistant_masks", "task", TASK_COUNTS_KEY})


class _SkipBatch(Exception):  # control flow, not an error
    """Raised inside `_terms` when `nonfinite_teacher="skip"` drops a micro-batch."""

    def __init__(self, outputs: Any) -> None:
        self.outputs = outputs


def _rows(dataset: Any) -> int | None:
    """Rows of a sized dataset (None for an iterable dataset, a dict of datasets or none)."""
    return (
        len(dataset) if dataset is not None and not isinstance(dataset, dict) and hasattr(dataset, "__len__") else None
    )


def _tokenizer_of(processing_class: Any) -> Any:
    return getattr(processing_class, "tokenizer", processing_class)


class DistillationMixin:
    """Teacher handling, loss assembly and metrics shared by both distillation trainers.

    Attributes set up in `__init__`: `teacher_source` (the one `TeacherSource` every batch goes through, built by
    itself: `hf_distill.teachers`), `teachers` (its live teacher models) and `teacher` (the first, or None).
    """

    _tag_names: ClassVar[list[str]] = ["hf-distill", "distillation"]
    _config_class: type = DistillationConfig
    loss_is_scaled_for_ga = True  # compute_loss divides by the accumulation window's token count itself
    recipe: Any = None  # the CLI's `hf_distill.recipes.Recipe`: embedded in the model card
    kd_signal_checked = False  # set by `sanity.check_first_step_kd` after the first training step

    def __init__(
        self,
        model=None,
        teacher_model: PreTrainedModel | str | list | None = None,
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
        teacher = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        request = SourceRequest(args, teacher, teacher_processing_class, model)
        source_class = select_source(request)  # which teacher the run asks for; its preconditions, before any work
        kwargs["train_dataset"] = source_class.prepare_dataset(request, kwargs.get("train_dataset"))
        self._check_dataset(kwargs.get("train_dataset"), args, kwargs.get("data_collator"))
        rows_in = {split: _rows(kwargs.get(f"{split}_dataset")) for split in ("train", "eval")}
        super().__init__(model=model, args=args, **kwargs)
        for split, before in rows_in.items():
            check_rows_left(split, before, _rows(getattr(self, f"{split}_dataset")), args)
        # Make Trainer count the supervised tokens of each accumulation window (`num_items_in_batch`).
        self.model_accepts_loss_kwargs = True
        warn_mixed_precision_mismatch(self.args)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._skipped_batches = 0  # micro-batches dropped by nonfinite_teacher="skip"
        self._head = detect_head(self.model)
        self._loss_shifts_labels = self._head.shifts_labels  # how Trainer counts `num_items_in_batch`: as we do
        student = self.accelerator.unwrap_model(self.model)
        if args.student_quantization is not None:  # torchao QAT: fake-quantized Linear layers (quantization.py)
            prepare_qat_student(student, args.student_quantization, args.student_quantization_group_size)
        if (problem := low_precision_weights_problem(student)) is not None:
            logger.warning_once(problem)
        if hasattr(self.data_collator, "check_model"):  # e.g. RationaleCollator: seq2seq vs causal views
            self.data_collator.check_model(self.model)
        context = SourceContext(args, self._head, student, _tokenizer_of(self.processing_class), None,
                                feature_forward_kwargs(args), self._place_teacher,
                                self.is_fsdp_enabled or self.is_deepspeed_enabled)  # fmt: skip
        self.teacher_source: TeacherSource = source_class.from_request(request, context)
        logger.info("Teacher source: %s.", self.teacher_source.name)
        # the teachers given to the run (a self-taught source's EMA copy of the student is not one of them)
        self.teachers = [] if self.teacher_source.starts_as_student else list(self.teacher_source.models)
        self.teacher = self.teachers[0] if self.teachers else None
        self.data_collator = self.teacher_source.wrap_collator(self.data_collator)
        for callback in self.teacher_source.callbacks():  # e.g. the EMA teacher's update
            self.add_callback(callback)
        self._hints = self._setup_hints() if self.teacher is not None and args.uses_features else None
        vocab_size = self.teacher_source.vocab_size
        self._early_exits = EarlyExits(args, student, vocab_size) if EarlyExits.active(args) else None
        self._policy = None
        if PolicyBatchRewriter.active(args):  # on-policy samples / seq-KD: batch rewriters before the forward pass
            sampler = VLLMStudentSampler.from_args(args, context.tokenizer, student.config) if args.use_vllm else None
            self._policy = PolicyBatchRewriter.for_student(args, context.tokenizer, student.config,
                                                           self._head.kind == "seq2seq", sampler)  # fmt: skip
            for callback in self._policy.callbacks():  # releases the vLLM sampler when training ends
                self.add_callback(callback)
        if args.kd_loss == "taid":  # TAID's t is training state: moved, logged and checkpointed by this callback
            self.add_callback(TaidCallback.from_args(args))
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

    # ----------------------------------------------------------------------------------------------- set-up
    def _place_teacher(self, teacher: nn.Module) -> nn.Module:
        """A loaded teacher frozen and placed beside the student for inference (`models.prepare_teacher`: DDP,
        FSDP, DeepSpeed ZeRO), handed to the teacher source in its `SourceContext`."""
        return prepare_teacher(teacher, self)

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
        """Keep the raw columns the collator reads or carries (`dataset_columns`: RationaleCollator; `kept_columns`:
        the teacher source's wrappers, e.g. the cache's id column or the rows' conversations) through
        `remove_unused_columns`; none of them reaches the model."""
        super()._set_signature_columns_if_needed()
        extra = list(getattr(self.data_collator, "dataset_columns", ()))
        extra += getattr(self.data_collator, "kept_columns", ())
        self._signature_columns += [c for c in dict.fromkeys(extra) if c not in self._signature_columns]

    def _setup_hints(self) -> HintDistiller:
        """Layer map and projectors; the projectors train with the student (own optimizer group, synced across
        processes) and are checkpointed beside it, but are never part of the exported student."""
        hints = HintDistiller(self.args, self.accelerator.unwrap_model(self.model), self.teacher)
        if hints.projectors is not None:
            hints.projectors.to(self.args.device)
            if self.accelerator.num_processes > 1:  # DDP-wrapped so their gradients are averaged like the student's
                hints.projectors = self.accelerator.prepare_model(hints.projectors)
                # not a model of the run: keep it out of save_state and of Trainer's "student prepared?" check
                unregister_model(self.accelerator, hints.projectors)
            self.add_callback(ProjectorCallback(hints.projectors))  # zeroed with the student, saved in checkpoints
        return hints

    def _projectors(self) -> nn.Module | None:
        projectors = self._hints.projectors if self._hints is not None else None
        return self.accelerator.unwrap_model(projectors) if projectors is not None else None

    def _clip_grad_norm(self, model):
        """One gradient norm (and clip) over the student and the hint projectors, which train together; a NaN/inf norm
        stops the run before the optimizer step (clipping by an inf norm would write NaN or zeros into the weights),
        except under fp16's loss scaler, which skips such steps itself."""
        norm = self._clip_grad_norm_all(model)
        scaled = self.args.fp16 or self.is_deepspeed_enabled
        if norm is not None and not scaled and not bool(torch.isfinite(torch.as_tensor(norm)).all()):
            raise FloatingPointError(
                f"The gradient norm is {float(norm)} at optimizer step {self.state.global_step + 1} although the "
                "loss was finite: the backward pass overflowed (student outputs or weights too large for fp32, "
                "e.g. a diverged run or a huge learning rate). Stopped before the optimizer step: nothing of this "
                "step was applied and saved checkpoints are untouched."
            )
        return norm

    def _clip_grad_norm_all(self, model):
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

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """As `Trainer.save_model`; a QAT student (`student_quantization`) is saved with its weights rounded onto the
        int grid, except in checkpoints (`checkpoint-N`), which keep the latent fp32 weights for resuming. Into a
        checkpoint it also writes the files of the `checkpoints.CheckpointFileCallback`s (EMA teacher, hint
        projectors), before the Trainer writes that checkpoint's `trainer_state.json`."""
        self._save_model(output_dir, _internal_call)
        if _internal_call and output_dir is not None:
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, CheckpointFileCallback):
                    callback.write_checkpoint(self.args, self.state, output_dir)

    def _save_model(self, output_dir: str | None, _internal_call: bool) -> None:
        if not _internal_call and self.teacher_source.save_model(  # the source's own export (e.g. one folder a peer)
            self.model, output_dir or self.args.output_dir, self.processing_class, self.args.should_save
        ):
            return None
        if self.args.student_quantization is None or (_internal_call and output_dir is not None):
            return super().save_model(output_dir, _internal_call)
        with fake_quantized_weights(self.accelerator.unwrap_model(self.model)):
            return super().save_model(output_dir, _internal_call)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.teacher_source.load_checkpoint(resume_from_checkpoint)  # its training state (the EMA teacher)
        projectors = self._projectors()
        if projectors is not None:
            load_projectors(projectors, resume_from_checkpoint)

    # ----------------------------------------------------------------------------------------------- loss
    def _model_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        not_inputs = NON_MODEL_KEYS.union(self.teacher_source.batch_keys)
        model_inputs = {k: v for k, v in inputs.items() if k not in not_inputs}
        if self._head.kind == "seq2seq" and "decoder_input_ids" not in model_inputs:
            unwrapped = self.accelerator.unwrap_model(self.model)
            model_inputs["decoder_input_ids"] = unwrapped.prepare_decoder_input_ids_from_labels(
                labels=inputs["labels"]
            )
        model_inputs["use_cache"] = False
        return model_inputs

    def _prepare_batch(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """Hook to rewrite the batch before the forward passes (identity here)."""
        return inputs

    def _terms(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[LossTerms, SupervisedView, Any]:
        """One micro-batch through the teacher source: the supervised view, the student's forward, the teacher's
        outputs, the logit terms (once per task for step-by-step batches) and the feature terms.

        Returns:
            `(terms, view, student_outputs)`.
        """
        inputs = self._prepare_batch(model, inputs)
        if "labels" not in inputs:
            raise ValueError(
                f"The batch has no `labels` (keys: {sorted(inputs)}). Use a collator that adds them, e.g. "
                "`DataCollatorForLanguageModeling(tokenizer, mlm=False)`, or DistillationSFTTrainer for raw text."
            )
        view = SupervisedView.from_batch(inputs, self._head, self.loss_state())
        model_inputs = self._model_inputs(inputs)
        self._check_length(inputs)
        source = self.teacher_source
        exit_kwargs = self._early_exits.forward_kwargs() if self._early_exits is not None else {}
        outputs = model(**model_inputs, **{**source.student_forward_kwargs(), **exit_kwargs})
        teacher_outputs = source.outputs(model_inputs, inputs)
        self._check_finite(teacher_outputs, outputs, inputs)

        def logit_terms(v: SupervisedView) -> LossTerms:
            terms = source.terms(outputs, teacher_outputs, v)
            # warns once if KD is exactly 0 (or has no tokens) on the first step; an EMA teacher starts as the student
            if "kd" in terms.sums and not source.starts_as_student:
                check_first_step_kd(self, terms.sums["kd"], terms.n_items)
            return terms

        terms = logit_terms(view) if view.task is None else terms_per_task(logit_terms, view)
        terms.n_items = view.n_items
        if self._hints is not None:  # hidden-state hints, attention transfer and relation terms
            terms.update(self._hints.terms(outputs, teacher_outputs, view))
        if self._early_exits is not None:  # deep-to-shallow self-distillation (features/early_exit.py)
            terms.update(self._early_exits.terms(outputs, view))
        return terms, view, outputs

    def _loss_terms(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[dict, dict, torch.Tensor, Any]:
        """`_terms` as plain values: `(sums, weights, n_tokens, student_outputs)`, each sum a scalar over the
        supervised tokens and `weights[name]` its factor in the loss."""
        terms, _, outputs = self._terms(model, inputs)
        return terms.sums, terms.weights, terms.n_items, outputs

    def _check_length(self, inputs: dict[str, Any]) -> None:
        """Warn once when a batch is longer than a model's `max_position_embeddings` (`max_length` not set)."""
        positions = inputs.get("position_ids")
        length = int(positions.max()) + 1 if positions is not None else inputs["input_ids"].shape[-1]
        unwrap = self.accelerator.unwrap_model
        teacher = unwrap(self.teacher) if self.teacher is not None else None
        warn_if_too_long(length, {"student": unwrap(self.model), "teacher": teacher})

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

    def _check_finite_loss(self, model: nn.Module, terms: LossTerms) -> None:
        """Stop before the backward pass when a loss term is NaN/inf (NaN and inf pass every range check; a NaN loss
        would turn the student's weights into NaN and the run would save them): nothing of the step is applied."""
        problem = nonfinite_loss_problem(terms.sums, terms.weights, self.accelerator.unwrap_model(model))
        if problem is not None:
            where = f"optimizer step {self.state.global_step + 1}" if model.training else "evaluation"
            raise FloatingPointError(
                f"{problem} Stopped at {where} before the backward pass: nothing of this step was applied and saved "
                "checkpoints are untouched."
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`sum_name weight * sum / num_items` over the terms of the teacher source and the feature terms (module
        docstring), normalised by `terms.normalised_loss`; every term is logged as `<name>_loss`."""
        try:
            terms, view, outputs = self._terms(model, inputs)
        except _SkipBatch as skip:  # a zero loss that still reaches every student parameter (DDP needs the backward)
            outputs = skip.outputs
            loss = 0.0 * sum(p.sum() for p in model.parameters() if p.requires_grad)
            return (loss, outputs) if return_outputs else loss
        self._check_finite_loss(model, terms)
        self._observe_taid(model, terms.sums, terms.n_items)
        loss, metrics = normalised_loss(terms, view, self.args, num_items_in_batch, self.accelerator.num_processes)
        for name, (value, count) in metrics.items():
            self._record_sum(name, value, count)
        return (loss, outputs) if return_outputs else loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Rewrite the window's micro-batches (on-policy samples, seq_kd) before their supervised tokens are counted,
        so the loss is normalised by the tokens actually trained on; then count each task's tokens in the window
        (step-by-step batches)."""
        if self._policy is None:
            batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        else:  # the window read and rewritten (generate or vLLM) before its tokens are counted
            student = getattr(self, "model_wrapped", None) or self.model
            batch_samples = self._policy.next_window(epoch_iterator, num_batches, student=student,
                                                     teacher=self.teacher, accelerator=self.accelerator,
                                                     step=self.state.global_step,
                                                     complete=self.teacher_source.rewritten)  # fmt: skip
            num_items_in_batch = self._get_num_items_in_batch(batch_samples, device)
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

    def loss_state(self) -> LossState:
        """The training state the loss reads this step, handed to the teacher source with each batch's view: TAID's
        current t (None before its callback ran, or without `kd_loss: taid`)."""
        taid = self._taid_callback()
        return LossState(taid_t=taid.t if taid is not None else None)

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

    def create_model_card(
        self, model_name: str | None = None, dataset_name: str | list[str] | None = None, **kwargs
    ) -> None:
        """Write README.md in `output_dir` with our card (`model_card.trainer_model_card`); used by `push_to_hub`.
        `dataset_name`: one dataset, or the datasets of a mixture (each listed)."""
        if not self.is_world_process_zero():
            return
        dataset = dataset_name or kwargs.get("dataset")
        card = trainer_model_card(self, model_name, dataset if isinstance(dataset, str | list | tuple) else None)
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
