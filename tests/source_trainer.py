"""A test-only trainer that runs one `TeacherSource` per micro-batch exactly as the trainer's contract says
(`teachers/base.py`): student forward with the source's kwargs, `source.outputs`, `source.terms`, plus optional
extra terms (early exits), normalised by `terms.normalised_loss`. It lets the sources of issue 20 be trained before the
trainer dispatches to them itself; the tests that use it check the sources, not this class."""

from typing import Any

from hf_distill import DistillationTrainer
from hf_distill.teachers.base import SourceContext
from hf_distill.terms import SupervisedView, normalised_loss


class SourceTrainer(DistillationTrainer):
    """`DistillationTrainer` whose loss is `make_source(context)`'s terms (+ `extra(outputs, view)`'s)."""

    @staticmethod
    def _needs_teacher(args: Any) -> bool:
        return False

    def __init__(self, *args: Any, make_source, extra=None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        context = SourceContext(
            self.args, self._head, self.accelerator.unwrap_model(self.model), self.processing_class
        )
        self.source = make_source(context)
        self.extra = extra(context) if extra is not None else None
        for callback in getattr(self.source, "callbacks", list)():
            self.add_callback(callback)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        model_inputs = self._model_inputs(inputs)
        kwargs = self.source.student_forward_kwargs()
        if self.extra is not None:
            kwargs = {**kwargs, **self.extra.forward_kwargs()}
        outputs = model(**model_inputs, **kwargs)
        view = SupervisedView.from_batch(inputs, self._head)
        terms = self.source.terms(outputs, self.source.outputs(model_inputs, inputs), view)
        if self.extra is not None:
            terms.update(self.extra.terms(outputs, view))
        loss, metrics = normalised_loss(terms, view, self.args, num_items_in_batch, self.accelerator.num_processes)
        for name, (value, count) in metrics.items():
            self._record_sum(name, value, count)
        return (loss, outputs) if return_outputs else loss

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if hasattr(self.source, "load_checkpoint"):
            self.source.load_checkpoint(resume_from_checkpoint)
