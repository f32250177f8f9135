"""Where the teacher's distribution comes from: one interface (`base.TeacherSource`), one file per source, each
registered under the kind of teacher the config asks for.

| kind                    | asked for by                                        | file                       |
| ----------------------- | --------------------------------------------------- | -------------------------- |
| `none`                  | nothing below (hard-label CE only)                  | `base.py`                  |
| `live`                  | one teacher with the student's tokenizer            | `live.py` (dense or fused) |
| `ensemble`              | several teachers (`teacher_weights`, ...)           | `ensemble.py`              |
| `cross-tokenizer`       | one teacher + `cross_tokenizer_loss`                | `cross_tokenizer.py`       |
| `cache`                 | `teacher_cache`                                     | `cached.py`                |
| `cross-tokenizer-cache` | `teacher_cache` + `cross_tokenizer_loss`            | `cross_tokenizer_cache.py` |
| `served`                | `teacher_api_base` (vLLM top-k log-probs over HTTP) | `served.py`                |
| `ema`                   | `teacher_ema_decay`                                 | `ema.py`                   |
| `context`               | `self`, `teacher_system_prompt`, `teacher_context_column` | `context.py`         |
| `peers`                 | the trainer's model is `PeerStudents([...])`        | `peers.py`                 |

`select_source` returns the one registered class whose `requested` holds (two at once is an error naming both);
the trainer then calls its `prepare_dataset` before `Trainer.__init__` and `from_request` after it (`base.py`). A new
source is one file here plus one `register_source` line below (and its config fields).
"""

from typing import Any

from .base import SourceContext, SourceRequest, TeacherSource
from .cached import CacheTeacher
from .context import ContextTeacher
from .cross_tokenizer import CrossTokenizerTeacher
from .cross_tokenizer_cache import CachedCrossTokenizerTeacher
from .ema import EMATeacher
from .ensemble import EnsembleTeacher
from .live import FusedLiveTeacher, LiveTeacher
from .peers import MutualLearning
from .served import ServedTeacher


SOURCES: dict[str, type[TeacherSource]] = {}  # kind -> source class, in the order their names appear in errors


def register_source(source: type[TeacherSource]) -> type[TeacherSource]:
    """Register a source class under its `kind` (usable as a class decorator); returns it."""
    if source.kind in SOURCES and SOURCES[source.kind] is not source:
        raise ValueError(f"A teacher source of kind {source.kind!r} is registered already ({SOURCES[source.kind]}).")
    SOURCES[source.kind] = source
    return source


for _source in (LiveTeacher, EnsembleTeacher, CrossTokenizerTeacher, CacheTeacher, CachedCrossTokenizerTeacher,
                EMATeacher, MutualLearning):  # fmt: skip
    register_source(_source)
register_source(ServedTeacher)
register_source(ContextTeacher)


def select_source(request: SourceRequest) -> type[TeacherSource]:
    """The source class the request asks for, its preconditions checked (`TeacherSource.check`): the one registered
    class whose `requested` holds, else the `none` source (`TeacherSource`).

    Raises:
        `ValueError`: two sources are asked for at once (e.g. a teacher and a `teacher_cache`), or a precondition
        fails (e.g. KD with no teacher at all).
    """
    args = request.args
    if args.teacher_weights is not None and len(request.teachers) < 2:
        raise ValueError(
            f"`teacher_weights` ({args.teacher_weights}) weighs several teachers, but {len(request.teachers)} teacher "
            "is given, so it would have no effect. Remove it, or give several teachers (a list as `teacher_model=` "
            "or `teacher_model_name_or_path`)."
        )
    asked = [source for source in SOURCES.values() if source.requested(request)]
    if len(asked) > 1:
        first, second = asked[0].describe(request), asked[1].describe(request)
        raise ValueError(
            f"Pass either {first} or {second}: each is a teacher of its own ({asked[0].kind}, {asked[1].kind}), and "
            "a run distils from one; drop one of them."
        )
    source = asked[0] if asked else TeacherSource
    source.check(request)
    return source


def build_source(request: SourceRequest, context: SourceContext, dataset: Any = None) -> TeacherSource:
    """`select_source`, `prepare_dataset` (its result is discarded; the trainer keeps it) and `from_request` in one
    call, for a source used outside the trainer (tests, scripts)."""
    source = select_source(request)
    source.prepare_dataset(request, dataset)
    return source.from_request(request, context)


__all__ = [
    "SOURCES",
    "CacheTeacher",
    "CachedCrossTokenizerTeacher",
    "ContextTeacher",
    "CrossTokenizerTeacher",
    "EMATeacher",
    "EnsembleTeacher",
    "FusedLiveTeacher",
    "LiveTeacher",
    "MutualLearning",
    "ServedTeacher",
    "SourceContext",
    "SourceRequest",
    "TeacherSource",
    "build_source",
    "register_source",
    "select_source",
]
