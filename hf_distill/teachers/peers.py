"""Online mutual learning: K peer students trained together, each the others' teacher (Zhang et al. 2018, deep mutual
learning; Anil et al. 2018, codistillation).

Peer `i`'s loss is its hard-label CE plus the mean divergence towards the other peers' detached distributions:

    L_i = ce_weight * CE(p_i, y) + kd_weight * T^2 * 1/(K-1) * sum_{j != i} D(sg(p_j) || p_i)

and the run minimises `sum_i L_i`, which gives every peer exactly the gradient of its own `L_i` (the other peers'
distributions are constants in it), in one backward pass.

The peers are one model to the Trainer: `PeerStudents`, an `nn.Module` holding them, whose forward returns each
peer's outputs. So one optimizer, gradient accumulation, DDP (one forward, one backward per micro-batch) and
checkpoints (`model.safetensors` of the wrapper) work unchanged. `PeerStudents.save_pretrained(folder)` writes each
peer as an ordinary model to `folder/peer0`, `folder/peer1`, ... (each loadable with `from_pretrained`).
The `MutualLearning` source computes the terms, dense or with the chunked hidden-state loss (`losses.fused`).
"""

from typing import Any

from torch import nn

from ..heads import lm_head_of
from ..losses import logit_divergence
from ..model_card import CardTeacher
from ..student import save_peers, unwrap_peers
from ..terms import LossTerms, SupervisedView, divergence_kwargs, fused_head_loss, kd_scale, logit_terms
from .base import SourceContext, SourceRequest, TeacherSource, refuse_features
from .live import FUSED_FORWARD_KWARGS


def _dense_terms(outputs: tuple, view: SupervisedView, args: Any, vocab_size: int | None) -> LossTerms:
    n_peers = len(outputs)
    rows = []
    for out in outputs:
        logits = view.rows(out.logits)
        rows.append(logits[..., :vocab_size] if vocab_size is not None and view.head.has_vocab else logits)
    terms = LossTerms(n_items=view.n_items)
    for i, out in enumerate(outputs):
        ce = logit_terms(out.logits, None, view, args, vocab_size)
        terms.add(f"peer{i}_ce", ce.sums["ce"], args.ce_weight)
        if view.head.regression:
            kd = sum((rows[i].float() - rows[j].detach().float()).pow(2).sum() for j in range(n_peers) if j != i)
        else:
            kd = sum(logit_divergence(rows[i], rows[j].detach(), **divergence_kwargs(args, view.state)).sum()
                     for j in range(n_peers) if j != i)  # fmt: skip
        terms.add(f"peer{i}_kd", kd / (n_peers - 1), kd_scale(args, view.head))
    if not view.head.regression:
        terms.metric("top1_agreement", (rows[0].argmax(-1) == rows[1].argmax(-1)).sum(), rows[0].shape[0])
    return terms


def _fused_pair(hidden_i, head_i, hidden_j, head_j, args, vocab_size, labels, stats, state):
    """Peer i's divergence to peer j's detached distribution (and its CE when `labels` is given), chunked."""
    return fused_head_loss(hidden_i, head_i, hidden_j, head_j, args, vocab_size, labels, stats, state=state)


def _fused_terms(outputs: tuple, peers: list[nn.Module], view: SupervisedView, args: Any, vocab_size: int | None):
    n_peers = len(outputs)
    hidden = [view.rows(out.hidden_states[-1]) for out in outputs]  # (N, H_i)
    heads = [lm_head_of(peer) for peer in peers]
    y = view.targets()
    terms = LossTerms(n_items=y.new_tensor(y.numel()))
    for i in range(n_peers):
        kd_total, ce = 0.0, None
        for j in (j for j in range(n_peers) if j != i):
            stats: dict[str, Any] = {}
            labels = y if ce is None else None  # peer i's CE once, from its first pair
            kd, ce_ij = _fused_pair(
                hidden[i], heads[i], hidden[j], heads[j], args, vocab_size, labels, stats, view.state
            )
            ce = ce_ij if ce is None else ce
            kd_total = kd_total + kd
            if (i, j) == (0, 1) and "top1_agreement" in stats:
                terms.metric("top1_agreement", stats["top1_agreement"], y.numel())
        terms.add(f"peer{i}_ce", ce, args.ce_weight)
        terms.add(f"peer{i}_kd", kd_total / (n_peers - 1), kd_scale(args))
    return terms


def fused_peers_reason(model: nn.Module, head_kind: str, sharded: bool = False) -> str | None:
    """Why the fused loss cannot serve these peers, or None when it can."""
    if head_kind != "causal_lm":
        return f"the peers are {head_kind} models"
    if sharded:
        return "FSDP/DeepSpeed shard the lm_head weights outside forward"
    if any(lm_head_of(peer) is None for peer in unwrap_peers(model).peers):
        return "a peer's logits are not a plain lm_head of its last hidden state"
    return None


class MutualLearning(TeacherSource):
    """The peers teach each other; no teacher model runs (`outputs` is None, the peers' outputs are the student's).

    Args:
        context (`SourceContext`): `context.student` is the (unwrapped) `PeerStudents`.
        fused (`bool`, *optional*): chunked hidden-state loss; default `args.use_fused_kd_loss` where every peer has a
            plain lm_head (`fused_peers_reason`).
        sharded (`bool`): FSDP / DeepSpeed.
    """

    kind = "peers"
    name = "peers"

    def __init__(self, context: SourceContext, fused: bool | None = None, sharded: bool | None = None):
        super().__init__(context)
        self.wrapper = unwrap_peers(context.student)
        sharded = context.sharded if sharded is None else sharded
        if fused is None:
            fused = (
                bool(context.args.use_fused_kd_loss)
                and fused_peers_reason(self.wrapper, context.head.kind, sharded) is None
            )
        self.fused = fused
        self.name = "peers-fused" if fused else "peers"

    @staticmethod
    def active(student: nn.Module | None) -> bool:
        """Whether `student` is a `PeerStudents` (under any wrapper)."""
        try:
            unwrap_peers(student)
        except ValueError:
            return False
        return True

    @classmethod
    def requested(cls, request: SourceRequest) -> bool:
        """Asked for by the trainer's model being `PeerStudents([...])`."""
        return request.student is not None and cls.active(request.student)

    @classmethod
    def describe(cls, request: SourceRequest) -> str:
        return "PeerStudents (peers teach each other)"

    @classmethod
    def check(cls, request: SourceRequest) -> None:
        refuse_features(request, "mutual learning (the peers are the students)")

    def save_model(self, model: nn.Module, output_dir: str, processing_class: Any, should_save: bool) -> bool:
        """Every peer to `output_dir/peer{i}` with the tokenizer beside it (`student.save_peers`)."""
        save_peers(model, output_dir, processing_class, should_save)
        return True

    def card_teacher(self) -> CardTeacher:
        """The other peers (no teacher model); the usage snippet loads the first peer's folder."""
        n = len(self.wrapper.peers)
        return CardTeacher(
            f"the other peers: {n} peer students trained together, each the others' teacher (deep mutual learning); "
            f"each peer is saved in its own folder, `peer0/` to `peer{n - 1}/`",
            student_subfolder="peer0",
        )

    def student_forward_kwargs(self) -> dict[str, Any]:
        kwargs = super().student_forward_kwargs()
        return {**kwargs, **FUSED_FORWARD_KWARGS} if self.fused else kwargs

    def terms(self, student_outputs: Any, teacher_outputs: Any, view: SupervisedView) -> LossTerms:
        """`peer{i}_ce` (weight `ce_weight`) and `peer{i}_kd` (weight `kd_weight * T^2`, the mean over the other
        peers of the divergence to their detached distributions) for each peer, summed over the view's items, and
        `top1_agreement` of peers 0 and 1."""
        outputs = student_outputs.peer_outputs
        if self.fused:
            return _fused_terms(outputs, list(self.wrapper.peers), view, self.context.args, self.context.vocab_size)
        return _dense_terms(outputs, view, self.context.args, self.context.vocab_size)
