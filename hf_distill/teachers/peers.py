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

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from ..heads import (
    LABEL_KINDS,
    detect_head,
    divergence_kwargs,
    fused_head_loss,
    kd_scale,
    lm_head_of,
    logit_terms,
    unwrap,
)
from ..losses import logit_divergence
from ..terms import LossTerms, SupervisedView
from .base import SourceContext, TeacherSource
from .live import FUSED_FORWARD_KWARGS


PEERS_FILE = "peers.json"


@dataclass
class PeerOutputs(ModelOutput):
    """What `PeerStudents.forward` returns.

    Attributes:
        logits (`torch.Tensor`): peer 0's logits (what evaluation code that reads `logits` sees).
        peer_outputs (`tuple`): each peer's own model output, in peer order.
    """

    logits: torch.Tensor | None = None
    peer_outputs: tuple | None = None


class PeerStudents(nn.Module):
    """K >= 2 peer students of one head kind and vocabulary, trained as one model.

    Args:
        peers (`list[nn.Module]`): the students (they may differ in size or architecture, and must share the
            tokenizer and the head kind).

    Example:
        >>> model = PeerStudents([student_a, student_b])
        >>> trainer = DistillationTrainer(model=model, args=DistillationConfig("out", kd_weight=1.0), ...)
        >>> trainer.train(); trainer.save_model("out")   # out/peer0, out/peer1 (the trainer picks the `peers` source)
    """

    def __init__(self, peers: list[nn.Module]):
        super().__init__()
        if len(peers) < 2:
            raise ValueError(f"Mutual learning needs at least 2 peer students, got {len(peers)}.")
        if len({id(unwrap(p)) for p in peers}) < len(peers):
            raise ValueError(
                "The same model is given twice as a peer; peers teach each other, so each must be its own model "
                "(e.g. `copy.deepcopy(student)` or another initialisation)."
            )
        if not all(hasattr(unwrap(p), "config") for p in peers):
            raise ValueError("Every peer must be a transformers model with a `config`.")
        kinds = [detect_head(p).kind for p in peers]
        if len(set(kinds)) > 1:
            raise ValueError(
                f"The peers have different head kinds {kinds}; mutual learning compares their predictions, so every "
                "peer must be the same kind of model (e.g. all AutoModelForCausalLM)."
            )
        sizes = [output_size(p) for p in peers]
        if len(set(sizes)) > 1:
            raise ValueError(
                f"The peers predict over different output sizes {sizes} (vocabulary or labels); mutual learning "
                "compares their distributions token by token, so the peers must share one tokenizer and head size. "
                "Give them one vocabulary (e.g. `peer.resize_token_embeddings(n)` for a padded embedding matrix)."
            )
        self.peers = nn.ModuleList(peers)
        self.config = unwrap(peers[0]).config  # read by Trainer/TRL checks (use_cache, name_or_path, ...)
        self.main_input_name = getattr(unwrap(peers[0]), "main_input_name", "input_ids")
        self.generation_config = getattr(unwrap(peers[0]), "generation_config", None)  # TRL sets its pad token

    def get_base_model(self) -> nn.Module:
        """Peer 0, which stands for every peer where one model's head or config is asked for (`heads.unwrap`)."""
        return self.peers[0]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> PeerOutputs:
        """Every peer on the same inputs (`(B, T)` ids and masks); keyword arguments go to each peer unchanged."""
        named = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "token_type_ids": token_type_ids,
            "decoder_input_ids": decoder_input_ids,
            "decoder_attention_mask": decoder_attention_mask,
            "inputs_embeds": inputs_embeds,
            "labels": labels,
        }
        inputs = {k: v for k, v in named.items() if v is not None}
        outputs = tuple(peer(**inputs, **kwargs) for peer in self.peers)
        return PeerOutputs(logits=outputs[0].logits, peer_outputs=outputs)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """As `nn.Module.state_dict`, with tied weights (shared storage) as separate copies, so that safetensors can
        write a checkpoint of peers with tied embeddings; loading fills both names with the same values."""
        state = super().state_dict(*args, **kwargs)
        seen: set[tuple[int, int, tuple]] = set()
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                continue
            ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
            if ident in seen:
                state[key] = value.clone()
            seen.add(ident)
        return state

    def add_model_tags(self, tags: list[str] | str) -> None:
        """Model-card tags on every peer."""
        for peer in self.peers:
            if hasattr(peer, "add_model_tags"):
                peer.add_model_tags(tags)

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        """Gradient checkpointing in every peer."""
        for peer in self.peers:
            peer.gradient_checkpointing_enable(**kwargs)

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Peer 0's decoder inputs for seq2seq peers (all peers share the tokenizer)."""
        return unwrap(self.peers[0]).prepare_decoder_input_ids_from_labels(labels=labels)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> list[str]:
        """Write peer `i` to `save_directory/peer{i}` with its own `save_pretrained` (`kwargs` passed on) and list
        the folders in `save_directory/peers.json`; returns the folders."""
        os.makedirs(save_directory, exist_ok=True)
        kwargs.pop("state_dict", None)  # Trainer passes the wrapper's; each peer saves its own
        folders = []
        for i, peer in enumerate(self.peers):
            folder = os.path.join(save_directory, f"peer{i}")
            unwrap(peer).save_pretrained(folder, **kwargs)
            folders.append(folder)
        with open(os.path.join(save_directory, PEERS_FILE), "w", encoding="utf-8") as f:
            json.dump({"peers": [f"peer{i}" for i in range(len(self.peers))]}, f, indent=2)
        return folders


def output_size(model: nn.Module) -> int | None:
    """The size of a model's predictions: the rows of its output embeddings (lm_head), else `config.num_labels`
    (classification heads), else `config.vocab_size`."""
    model = unwrap(model)
    embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    if detect_head(model).kind in LABEL_KINDS:
        return int(model.config.num_labels)
    return getattr(model.config, "vocab_size", None)


def save_peers(model: nn.Module, output_dir: str, processing_class: Any = None, is_main_process: bool = True) -> None:
    """The export of a mutual-learning run (`DistillationMixin.save_model`): every peer to `output_dir/peer{i}`, with
    the tokenizer (or processor) beside each, so each folder loads with `from_pretrained`."""
    if not is_main_process:
        return
    for folder in unwrap_peers(model).save_pretrained(output_dir):
        if processing_class is not None:
            processing_class.save_pretrained(folder)


def peer_folders(directory: str | os.PathLike) -> list[str]:
    """The peer folders `PeerStudents.save_pretrained` wrote in `directory`, in peer order."""
    with open(os.path.join(directory, PEERS_FILE), encoding="utf-8") as f:
        return [os.path.join(directory, name) for name in json.load(f)["peers"]]


def _dense_terms(outputs: tuple, view: SupervisedView, args: Any, vocab_size: int | None) -> LossTerms:
    n_peers = len(outputs)
    rows = []
    for out in outputs:
        logits = view.rows(out.logits)
        rows.append(logits[..., :vocab_size] if vocab_size is not None and view.head.has_vocab else logits)
    terms = LossTerms(n_items=view.n_items)
    for i, out in enumerate(outputs):
        ce = logit_terms(out.logits, None, view.labels, view.head, args, vocab_size, view.shift_labels)
        terms.add(f"peer{i}_ce", ce.sums["ce"], args.ce_weight)
        if view.head.regression:
            kd = sum((rows[i].float() - rows[j].detach().float()).pow(2).sum() for j in range(n_peers) if j != i)
        else:
            kd = sum(logit_divergence(rows[i], rows[j].detach(), **divergence_kwargs(args)).sum()
                     for j in range(n_peers) if j != i)  # fmt: skip
        terms.add(f"peer{i}_kd", kd / (n_peers - 1), kd_scale(args, view.head))
    if not view.head.regression:
        terms.metric("top1_agreement", (rows[0].argmax(-1) == rows[1].argmax(-1)).sum(), rows[0].shape[0])
    return terms


def _fused_pair(hidden_i, head_i, hidden_j, head_j, args, vocab_size, labels, stats):
    """Peer i's divergence to peer j's detached distribution (and its CE when `labels` is given), chunked."""
    return fused_head_loss(hidden_i, head_i, hidden_j, head_j, args, vocab_size, labels, stats)


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
            kd, ce_ij = _fused_pair(hidden[i], heads[i], hidden[j], heads[j], args, vocab_size, labels, stats)
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


def unwrap_peers(model: nn.Module) -> PeerStudents:
    """The `PeerStudents` under DDP / compile wrappers; raises a ValueError for any other model."""
    while not isinstance(model, PeerStudents):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise ValueError(
                f"Mutual learning needs the trainer's model to be `PeerStudents([...])`, got {type(model).__name__}."
            )
        model = inner
    return model


class MutualLearning(TeacherSource):
    """The peers teach each other; no teacher model runs (`outputs` is None, the peers' outputs are the student's).

    Args:
        context (`SourceContext`): `context.student` is the (unwrapped) `PeerStudents`.
        fused (`bool`, *optional*): chunked hidden-state loss; default `args.use_fused_kd_loss` where every peer has a
            plain lm_head (`fused_peers_reason`).
        sharded (`bool`): FSDP / DeepSpeed.
    """

    name = "peers"

    def __init__(self, context: SourceContext, fused: bool | None = None, sharded: bool = False):
        super().__init__(context)
        self.wrapper = unwrap_peers(context.student)
        if fused is None:
            fused = (
                bool(context.args.use_fused_kd_loss)
                and fused_peers_reason(self.wrapper, context.head.kind, sharded) is None
            )
        self.fused = fused
        self.name = "peers-fused" if fused else "peers"

    @classmethod
    def active(cls, student: nn.Module) -> bool:
        """Picked when the trainer's model is a `PeerStudents`."""
        try:
            unwrap_peers(student)
        except ValueError:
            return False
        return True

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
