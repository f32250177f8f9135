"""Where the teacher's distribution comes from, behind one interface (`base.TeacherSource`).

- `base.py`: the interface, `SourceContext`, and the no-teacher source (CE only).
- `live.py`: one live teacher, dense logits or the fused chunked loss.
- `cross_tokenizer.py`: a live teacher with another tokenizer (`cross_tokenizer_loss`); `cross_tokenizer_cache.py`:
  the same from a cache built with the teacher's own tokenizer.
- `cached.py`: an offline top-k cache (`cache.py`: its format, writer and reader; `cache_compact.py`: compact rows).
- `ensemble.py`: several live teachers sharing the student's tokenizer.
- `api.py`: black-box teachers behind OpenAI-compatible endpoints (text only: rationales, transfer sets, seq-KD).
- `onpolicy.py`: on-policy samples and sequence-level KD, batch rewriters that run before the forward pass.
- `loading.py`: loading (Hub id, path, GGUF, shorthands), placement (DDP/FSDP/ZeRO) and compatibility checks.

`select_teacher_source` picks the source once, when the trainer is built: the first entry of `SOURCES` whose
condition holds. A new source is one file here plus one line in `SOURCES`.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..cache import TeacherCache
from .base import SourceContext, TeacherSource
from .cached import CacheTeacher
from .cross_tokenizer import CrossTokenizerTeacher
from .cross_tokenizer_cache import CachedCrossTokenizerTeacher
from .ema import EMATeacher
from .ensemble import EnsembleTeacher
from .live import FusedLiveTeacher, LiveTeacher
from .peers import MutualLearning


@dataclass
class SourceRequest:
    """What the trainer knows when it picks the source.

    Attributes:
        context (`SourceContext`): passed on to the source.
        teachers (`list[nn.Module]`): the loaded, checked and placed live teachers (empty for none or a cache).
        cache (`TeacherCache`, *optional*): the opened teacher cache (`teacher_cache`).
        fused (`bool`): whether the fused chunked loss reproduces both models' logits (`use_fused_kd_loss` and
            `live.fused_unsupported_reason` is None).
        sharded (`bool`): FSDP / DeepSpeed shard the parameters (lm_heads outside forward): sources that decide the
            fused loss themselves (EMA, peers) must not pick it then.
        teacher_tokenizer (*optional*): the teacher's own tokenizer when it differs from the student's
            (`cross_tokenizer_loss`; `loading.teacher_tokenizer_of`), for the cross-tokenizer sources.
    """

    context: SourceContext
    teachers: list[nn.Module] = field(default_factory=list)
    cache: TeacherCache | None = None
    fused: bool = False
    sharded: bool = False
    teacher_tokenizer: Any = None


# (name, when it is picked, how it is built); the first match wins.
SOURCES: list[tuple[str, Callable[[SourceRequest], bool], Callable[[SourceRequest], TeacherSource]]] = [
    ("cross-tokenizer-cache", CachedCrossTokenizerTeacher.applies, CachedCrossTokenizerTeacher.from_request),
    ("cache", lambda r: r.cache is not None, lambda r: CacheTeacher(r.context, r.cache)),
    ("cross-tokenizer", CrossTokenizerTeacher.applies, CrossTokenizerTeacher.from_request),
    ("ensemble", lambda r: len(r.teachers) > 1, lambda r: EnsembleTeacher(r.context, r.teachers)),
    ("live-fused", lambda r: len(r.teachers) == 1 and r.fused, lambda r: FusedLiveTeacher(r.context, r.teachers[0])),
    ("live", lambda r: len(r.teachers) == 1, lambda r: LiveTeacher(r.context, r.teachers[0])),
    (
        "peers",
        lambda r: MutualLearning.active(r.context.student),
        lambda r: MutualLearning(r.context, sharded=r.sharded),
    ),
    ("ema", lambda r: EMATeacher.active(r.context.args, None), lambda r: EMATeacher(r.context, sharded=r.sharded)),
    ("none", lambda r: True, lambda r: TeacherSource(r.context)),
]


def select_teacher_source(request: SourceRequest) -> TeacherSource:
    """The source of the first `SOURCES` entry whose condition holds for `request`."""
    for _, applies, build in SOURCES:
        if applies(request):
            return build(request)
    raise AssertionError("SOURCES ends with a catch-all entry")  # pragma: no cover


__all__ = [
    "SOURCES",
    "CacheTeacher",
    "CachedCrossTokenizerTeacher",
    "CrossTokenizerTeacher",
    "EnsembleTeacher",
    "FusedLiveTeacher",
    "LiveTeacher",
    "SourceContext",
    "SourceRequest",
    "TeacherSource",
    "select_teacher_source",
]
