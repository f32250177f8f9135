"""Student initialisation from a subset of the teacher's layers (DistilBERT / BERT-PKD style).

`init_student_from_teacher` builds a NEW model of the teacher's class whose layer stack keeps chosen teacher layers,
and copies every other weight (embeddings, final norm, head, T5's relative attention bias) from the teacher. The
student is built from an edited copy of the teacher's config, so each layer gets its own `layer_idx` (KV caching
during `generate` works) and the result saves and reloads with `from_pretrained`.

`PeerStudents` holds K peer students trained together by mutual learning (the `peers` teacher source,
`hf_distill.teachers.peers`): one model to the Trainer, whose forward returns each peer's outputs, saved as one
ordinary model per peer (`peer0`, `peer1`, ...).
"""

import copy
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .heads import LABEL_KINDS, detect_head, unwrap


logger = logging.getLogger(__name__)

# Config fields that hold one entry per layer: sliced to the kept layers when their length is the teacher's depth.
PER_LAYER_FIELDS = (
    "layer_types",
    "mlp_layer_types",
    "no_rope_layers",
    "kv_sharing_modes",
    "indexer_types",
    "layers_block_type",
    "layers_num_experts",
    "num_attention_heads_per_layer",
    "swiglu_limits",
    "swiglu_limits_shared",
    "per_layer_config",
    "rope_types",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
)
# Config fields that hold teacher layer indices: remapped to student indices (dropped layers vanish).
LAYER_INDEX_FIELDS = ("mlp_only_layers",)


@dataclass(frozen=True)
class _Stack:
    path: str  # module path of the nn.ModuleList, e.g. "model.layers"
    depth_field: str  # config field holding its depth, e.g. "num_hidden_layers"


# Supported families: causal LMs with `model.model.layers` (Llama, Mistral, Qwen2/3, Gemma, Phi3, SmolLM, ...) and
# T5-style encoder-decoders. The first matching entry wins.
_FAMILIES: tuple[tuple[_Stack, ...], ...] = (
    (_Stack("model.layers", "num_hidden_layers"),),
    (_Stack("encoder.block", "num_layers"), _Stack("decoder.block", "num_decoder_layers")),
)
_RELATIVE_BIAS = re.compile(r"layer\.0\.SelfAttention\.relative_attention_bias\.")


def evenly_spaced_layers(num_teacher_layers: int, num_layers: int) -> list[int]:
    """Indices of `num_layers` evenly spaced teacher layers, always including the first and the last.

    Layer `i` of the student (`i = 0 .. n-1`, `n = num_layers`, `L = num_teacher_layers`) is teacher layer
    `floor(i * (L - 1) / (n - 1) + 1/2)`: a rounded linear ramp from 0 to L-1. Consecutive targets are at least one
    apart (n <= L), so the indices are distinct. With `n = 1` only the first layer (0) is kept.

    Example: L = 30, n = 10 -> [0, 3, 6, 10, 13, 16, 19, 23, 26, 29].
    """
    if not isinstance(num_layers, int) or isinstance(num_layers, bool):
        raise TypeError(f"`num_layers` must be an int, got {num_layers!r}.")
    if not 1 <= num_layers <= num_teacher_layers:
        raise ValueError(
            f"`num_layers` must be between 1 and the teacher's {num_teacher_layers} layers, got {num_layers}."
        )
    if num_layers == 1:
        return [0]
    span, steps = num_teacher_layers - 1, num_layers - 1
    return [(2 * i * span + steps) // (2 * steps) for i in range(num_layers)]


def _resolve_layers(layers: list[int] | None, num_layers: int | None, depth: int, what: str) -> list[int]:
    if (layers is None) == (num_layers is None):
        raise ValueError(
            f"Pass exactly one of `{what}layers` (explicit teacher layer indices) or `{what}num_layers` (evenly "
            f"spaced), got {what}layers={layers!r} and {what}num_layers={num_layers!r}."
        )
    if num_layers is not None:
        return evenly_spaced_layers(depth, num_layers)
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise TypeError(f"`{what}layers` must be a list of ints, got {layers!r}.")
    chosen = []
    for index in layers:
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError(f"`{what}layers` must hold ints, got {index!r} in {layers!r}.")
        if not -depth <= index < depth:
            raise ValueError(
                f"Layer index {index} in `{what}layers` is out of range: the teacher has {depth} layers "
                f"(valid indices 0..{depth - 1}, or negative from the end)."
            )
        chosen.append(index % depth)
    if not chosen:
        raise ValueError(f"`{what}layers` is empty: keep at least one teacher layer.")
    duplicates = sorted({i for i in chosen if chosen.count(i) > 1})
    if duplicates:
        raise ValueError(f"`{what}layers` repeats teacher layer(s) {duplicates}: each layer may be kept once.")
    return chosen


def _find_family(teacher: PreTrainedModel) -> tuple[_Stack, ...]:
    modules = dict(teacher.named_modules())
    for family in _FAMILIES:
        if all(isinstance(modules.get(s.path), torch.nn.ModuleList) for s in family) and all(
            isinstance(getattr(teacher.config, s.depth_field, None), int) for s in family
        ):
            return family
    raise ValueError(
        f"Cannot initialise a student from a {type(teacher).__name__}: no supported layer stack found. Supported are "
        "causal LMs with `model.layers` (Llama, Mistral, Qwen2/3, Gemma, ...) and T5-style encoder-decoders "
        "(`encoder.block` + `decoder.block`). Build the student yourself and load the teacher's weights."
    )


def _edit_config(config, stack: _Stack, chosen: list[int], depth: int, is_main: bool) -> None:
    """Set the stack depth; slice per-layer fields and remap layer-index fields of the primary stack."""
    setattr(config, stack.depth_field, len(chosen))
    if not is_main:
        return
    for name in PER_LAYER_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)) and len(value) == depth:
            setattr(config, name, type(value)(value[i] for i in chosen))
    for name in LAYER_INDEX_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)):
            setattr(config, name, [new for new, old in enumerate(chosen) if old in value])
    threshold = getattr(config, "max_window_layers", None)  # Qwen2: layers >= threshold use sliding attention
    if isinstance(threshold, int):
        config.max_window_layers = sum(old < threshold for old in chosen)


def _student_state_dict(
    teacher_state: dict[str, torch.Tensor], family: tuple[_Stack, ...], choices: list[list[int]]
) -> dict[str, torch.Tensor]:
    """Teacher tensors under the student's parameter names (stack entries renumbered, the rest unchanged)."""
    state = {}
    for key, tensor in teacher_state.items():
        stack = next((s for s in family if key.startswith(s.path + ".")), None)
        if stack is None:
            state[key] = tensor
            continue
        chosen = choices[family.index(stack)]
        old, _, rest = key[len(stack.path) + 1 :].partition(".")
        if _RELATIVE_BIAS.match(rest):  # T5: block 0 owns the relative position bias; it moves to the first block
            if old == "0":
                state[f"{stack.path}.0.{rest}"] = tensor
            continue
        if int(old) in chosen:
            state[f"{stack.path}.{chosen.index(int(old))}.{rest}"] = tensor
    return state


def init_student_from_teacher(
    teacher: PreTrainedModel,
    layers: list[int] | None = None,
    num_layers: int | None = None,
    *,
    decoder_layers: list[int] | None = None,
    decoder_num_layers: int | None = None,
) -> PreTrainedModel:
    """A new model of the teacher's class keeping a subset of its layers (DistilBERT-style initialisation).

    The student's config is a copy of the teacher's with the depth set to the number of kept layers, per-layer fields
    (`layer_types`, `no_rope_layers`, per-layer head counts, ...) sliced to the kept layers, layer-index fields
    (`mlp_only_layers`) remapped, `quantization_config` dropped and `_name_or_path` cleared. The model is built from
    that config (each layer gets its new `layer_idx`, so KV caching works), then every weight is copied from the
    teacher: the kept layers in the given order, and embeddings, final norm and head unchanged. Tensors are copies,
    never shared with the teacher; input and output embeddings are tied exactly when the teacher's config ties them.
    The student's parameters all require gradients, its dtype and device are the teacher's, and it has the teacher's
    train/eval mode and generation config.

    T5: `layers` / `num_layers` choose the encoder blocks, and the decoder blocks too unless `decoder_layers` /
    `decoder_num_layers` are given. Block 0 owns the relative attention bias; it is copied into the student's first
    block (which carries `has_relative_attention_bias=True`) whichever teacher block that is.

    Args:
        teacher (`PreTrainedModel`): a causal LM with `model.layers` (Llama, Mistral, Qwen2/3, Gemma, ...) or a T5.
        layers (`list[int]` or `None`): teacher layer indices to keep, in order (negative counts from the end).
        num_layers (`int` or `None`): keep this many evenly spaced layers, first and last included (see
            `evenly_spaced_layers` for the formula). Pass exactly one of `layers` and `num_layers`.
        decoder_layers (`list[int]` or `None`): T5 only: decoder blocks to keep.
        decoder_num_layers (`int` or `None`): T5 only: keep this many evenly spaced decoder blocks.

    Returns:
        `PreTrainedModel`: the student, of `type(teacher)`.

    Example:
        >>> student = init_student_from_teacher(teacher, num_layers=10)  # SmolLM2 (30 layers): 0, 3, 6, 10, ..., 29
    """
    if not isinstance(teacher, PreTrainedModel):
        raise TypeError(f"`teacher` must be a transformers PreTrainedModel, got {type(teacher).__name__}.")
    family = _find_family(teacher)
    depths = [getattr(teacher.config, s.depth_field) for s in family]
    for stack, depth in zip(family, depths, strict=True):
        actual = len(teacher.get_submodule(stack.path))
        if actual != depth:
            raise ValueError(f"`{stack.path}` has {actual} layers but config.{stack.depth_field} says {depth}.")
    choices = [_resolve_layers(layers, num_layers, depths[0], "")]
    if len(family) == 2:
        if decoder_layers is None and decoder_num_layers is None:
            decoder_layers, decoder_num_layers = layers, num_layers
        choices.append(_resolve_layers(decoder_layers, decoder_num_layers, depths[1], "decoder_"))
    elif decoder_layers is not None or decoder_num_layers is not None:
        raise ValueError(
            f"`decoder_layers` / `decoder_num_layers` apply to encoder-decoders (T5) only; {type(teacher).__name__} "
            "has one layer stack: use `layers` or `num_layers`."
        )
    quant = getattr(teacher.config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if quant is not None and str(getattr(method, "value", method)) != "gguf":  # GGUF weights are plain floats
        raise ValueError(
            f"The teacher is quantized ({method}); load it unquantized to initialise a student from its weights."
        )

    config = copy.deepcopy(teacher.config)
    for i, (stack, chosen) in enumerate(zip(family, choices, strict=True)):
        _edit_config(config, stack, chosen, depths[i], is_main=i == 0)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = ""

    reference = next(teacher.parameters())
    student = type(teacher)._from_config(config, dtype=reference.dtype)  # random init; every weight is overwritten
    state = _student_state_dict(teacher.state_dict(), family, choices)
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = set(getattr(student, "all_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(
            f"Could not map the teacher's weights onto the {type(student).__name__} student (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}); this architecture is not supported by `init_student_from_teacher`."
        )
    if getattr(config, "tie_word_embeddings", False):
        student.tie_weights()
    if getattr(teacher, "generation_config", None) is not None:  # classification heads have none
        student.generation_config = copy.deepcopy(teacher.generation_config)
    student.to(reference.device)
    student.train(teacher.training)
    logger.info(
        "Initialised a %s student from teacher layers %s.",
        type(student).__name__,
        " / ".join(f"{s.path}={c}" for s, c in zip(family, choices, strict=True)),
    )
    return student


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


def unwrap_peers(model: nn.Module) -> PeerStudents:
    """The `PeerStudents` under DDP / FSDP / DeepSpeed / compile wrappers (accelerate's `extract_model_from_parallel`);
    raises a ValueError for any other model."""
    inner = extract_model_from_parallel(model, keep_torch_compile=False)
    is_peers = isinstance(inner, PeerStudents)
    if not is_peers:
        raise ValueError(
            f"Mutual learning needs the trainer's model to be `PeerStudents([...])`, got {type(model).__name__}."
        )
    return inner
