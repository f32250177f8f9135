"""Teacher sources beyond one live teacher, as a mixin of `DistillationMixin`: an offline top-k cache
(`teachers.cache`), on-policy student samples and sequence-level KD (`teachers.onpolicy`) and several teachers
(`teachers.ensemble`). The trainer calls these methods; the loss math lives in the modules named."""

from typing import Any

from .data.collators import TeacherCacheCollator
from .teachers.cache import TeacherCache
from .teachers.onpolicy import PolicyBatchRewriter


def _tokenizer_of(processing_class: Any) -> Any:
    return getattr(processing_class, "tokenizer", processing_class)


class TeacherSourcesMixin:
    """Set-up and batch handling for `teacher_cache`, `lmbda` / `seq_kd` and multi-teacher configs."""

    _teacher_cache: TeacherCache | None = None
    _policy: PolicyBatchRewriter | None = None

    def _open_teacher_cache(self, args: Any, teacher: Any, kwargs: dict[str, Any]) -> TeacherCache | None:
        """The cache of `args.teacher_cache`, opened before `Trainer.__init__` (which prepares the datasets): the
        training dataset gets the cache's id column (row index) when it lacks it and the cache was built that way."""
        if args.teacher_cache is None:
            return None
        if teacher is not None:
            raise ValueError("Pass either `teacher_model` or `teacher_cache` (a cache replaces the live teacher).")
        cache = TeacherCache(args.teacher_cache)
        kwargs["train_dataset"] = cache.attach_row_ids(kwargs.get("train_dataset"))
        return cache

    def _setup_teacher_sources(self) -> None:
        """After the teachers are set up: `self.teachers`, the cache's collator and tokenizer check, the batch
        rewriter for on-policy samples / sequence-level KD."""
        if not getattr(self, "teachers", None):
            self.teachers = [self.teacher] if self.teacher is not None else []
        tokenizer = _tokenizer_of(self.processing_class)
        self._cache_tokenizer = tokenizer
        if self._teacher_cache is not None:
            if self._head.kind != "causal_lm":
                raise ValueError(f"Teacher caches hold causal-LM distributions; the student is a {self._head.kind}.")
            if tokenizer is not None:
                self._teacher_cache.check_tokenizer(tokenizer)
            self.data_collator = TeacherCacheCollator(self._teacher_cache, self.data_collator)
        if PolicyBatchRewriter.active(self.args):
            config = self.accelerator.unwrap_model(self.model).config
            pad = getattr(tokenizer, "pad_token_id", None)
            pad = pad if pad is not None else config.pad_token_id if config.pad_token_id is not None else 0
            eos = getattr(tokenizer, "eos_token_id", None)
            eos = eos if eos is not None else config.eos_token_id
            self._policy = PolicyBatchRewriter(self.args, pad, eos, self._head.kind == "seq2seq")

    def _set_signature_columns_if_needed(self):
        """Keep the cache's id column in the dataset (the collator consumes it; it never reaches the model)."""
        super()._set_signature_columns_if_needed()
        column = self._teacher_cache.id_column if self._teacher_cache is not None else None
        if column is not None and column not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, column]

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Rewrite the window's micro-batches (on-policy samples, seq_kd) before their supervised tokens are counted,
        so the loss is normalised by the tokens actually trained on."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self._policy is None or not batch_samples:
            return batch_samples, num_items_in_batch
        student = getattr(self, "model_wrapped", None) or self.model
        batch_samples = [
            self._policy(batch, student=student, teacher=self.teacher, accelerator=self.accelerator)
            for batch in batch_samples
        ]
        return batch_samples, self._get_num_items_in_batch(batch_samples, device)
