"""Deep-to-shallow self-distillation through early exits (Zhang et al. 2019, "Be Your Own Teacher"; exits shared
with the final head as in LayerSkip, Elhoushi et al. 2024).

The hidden state after student layer `L` (`hidden_states[L]`, 0 = embeddings) goes through the model's own final norm
and lm_head, and that exit learns the final layer's distribution, detached (the final layer is the teacher, and is not
pulled towards its shallower exits):

    exit{L}_kd = sum over supervised items of  D(p_final.detach() || p_exit_L)     weight  early_exit_weight * T^2
    exit{L}_ce = sum over supervised items of  CE(p_exit_L, label)                weight  early_exit_weight * ce_weight

(`D` is `kd_loss` at `temperature`; `exit{L}_ce` only when `ce_weight > 0`). The terms are sums over the same
supervised items as the main terms (`hf_distill.terms`), so they add to any teacher source's terms. The exits own no
parameters: the norm and lm_head are the model's, so the exported model is an ordinary model of its class.

For causal LMs with a plain lm_head (`heads.lm_head_of`) and `use_fused_kd_loss`, the terms use the chunked
hidden-state loss (`losses.fused`), so no `[N, V]` logits are held; otherwise the exit logits are materialised.
"""

import json
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from ..heads import LMHead, detect_head, lm_head_of, unwrap
from ..losses import logit_divergence
from ..student import PeerStudents
from ..terms import LossTerms, SupervisedView, divergence_kwargs, fused_head_loss, hard_loss


UNIFORM = "uniform"


def parse_exit_layers(spec: Any) -> list[int] | str:
    """`early_exit_layers` as given (a list, `"uniform"`, a comma-separated or JSON list string) -> `"uniform"` or a
    sorted list of distinct ints. Range checks need the model (`resolve_exit_layers`)."""
    if isinstance(spec, str):
        text = spec.strip()
        if text == UNIFORM:
            return UNIFORM
        try:
            spec = json.loads(text) if text.startswith("[") else [int(p) for p in text.split(",") if p.strip()]
        except ValueError as err:
            raise ValueError(
                f"`early_exit_layers` must be 'uniform' or a list of layer numbers such as '2,4' or '[2, 4]', got "
                f"{spec!r}."
            ) from err
    if isinstance(spec, int) or not all(isinstance(x, int) and not isinstance(x, bool) for x in spec) or not spec:
        raise ValueError(f"`early_exit_layers` must be 'uniform' or a non-empty list of ints, got {spec!r}.")
    return sorted(set(spec))


def resolve_exit_layers(spec: Any, num_layers: int) -> list[int]:
    """The exit layers for a model of `num_layers` layers: `"uniform"` is `round(k * L / 4)` for k = 1, 2, 3 (distinct,
    in [1, L)); a list is checked to lie in [1, L) (layer L is the final layer itself)."""
    spec = parse_exit_layers(spec)
    if spec == UNIFORM:
        layers = sorted({round(k * num_layers / 4) for k in (1, 2, 3)} & set(range(1, num_layers)))
        if not layers:
            raise ValueError(f"early_exit_layers='uniform' needs a student with >= 2 layers, got {num_layers}.")
        return layers
    bad = [x for x in spec if not 1 <= x < num_layers]
    if bad:
        raise ValueError(
            f"`early_exit_layers` {bad} are outside [1, {num_layers}) for this {num_layers}-layer student (layer L "
            f"is the output of decoder layer L; {num_layers} is the final layer, the exits' teacher)."
        )
    return spec


def final_norm_of(model: nn.Module) -> nn.Module:
    """The final norm of a decoder (`model.get_decoder().norm` or `model.model.norm`); raises a ValueError naming
    the model when it has none."""
    model = unwrap(model)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    for candidate in (decoder, getattr(model, "model", None)):
        for name in ("norm", "final_layernorm", "ln_f"):
            norm = getattr(candidate, name, None)
            if isinstance(norm, nn.Module):
                return norm
    raise ValueError(
        f"Early exits need the final norm of the decoder, but {type(model).__name__} has none at "
        "`get_decoder().norm` / `model.norm`; early_exit_layers supports decoder LMs such as Llama, Qwen, Gemma."
    )


def _head_of(model: nn.Module) -> LMHead:
    head = lm_head_of(model)
    if head is not None:
        return head
    embeddings = unwrap(model).get_output_embeddings() if hasattr(unwrap(model), "get_output_embeddings") else None
    if not isinstance(embeddings, nn.Linear):
        raise TypeError(
            f"Early exits need the model's output embeddings (a Linear lm_head); {type(unwrap(model)).__name__} "
            "has none."
        )
    return LMHead(embeddings.weight, embeddings.bias, 1.0, None)


def early_exit_terms(
    hidden_states: tuple[torch.Tensor, ...],
    layers: list[int],
    norm: nn.Module,
    head: LMHead,
    view: SupervisedView,
    args: Any,
    fused: bool = True,
    vocab_size: int | None = None,
) -> LossTerms:
    """The early-exit terms of one micro-batch.

    Args:
        hidden_states (`tuple[torch.Tensor, ...]`): the student's `hidden_states`, `L + 1` tensors of shape
            `(B, T, H)`; `hidden_states[-1]` is the final (normed) state the model's logits come from.
        layers (`list[int]`): exit layers, each in `[1, L)`.
        norm (`nn.Module`): the model's final norm, applied to each exit's `(N, H)` rows.
        head (`LMHead`): the model's lm_head (weight `(V, H)`, bias, logit scale, softcap).
        view (`SupervisedView`): the micro-batch's supervised items (N of them).
        args: `kd_loss` and its hyper-parameters, `temperature`, `ce_weight`, `early_exit_weight`, `kd_chunk_size`.
        fused (`bool`): chunked hidden-state loss (no `(N, V)` logits held); False materialises the exit logits.
        vocab_size (`int`, *optional*): compare only the first `vocab_size` logits (padded heads).

    Returns:
        `LossTerms`: `exit{L}_kd` (weight `early_exit_weight * T^2`), `exit{L}_ce` (weight `early_exit_weight *
        ce_weight`, only when `ce_weight > 0`) for each exit, summed over the view's N items, and the metric
        `exit{L}_agreement` (top-1 agreement of exit L with the final layer).
    """
    y = view.targets()
    out = LossTerms(n_items=y.new_tensor(y.numel()))
    final = view.rows(hidden_states[-1]).detach()  # (N, H): the teacher side never gets a gradient
    weight = float(args.early_exit_weight)
    kd_w, ce_w = weight * args.temperature**2, weight * args.ce_weight
    with_ce = args.ce_weight > 0
    target_logits = None
    if not fused:
        with torch.no_grad():
            target_logits = head.logits(final)
            target_logits = target_logits[..., :vocab_size] if vocab_size is not None else target_logits
    for layer in layers:
        exit_hidden = norm(view.rows(hidden_states[layer]))  # (N, H)
        if fused:
            stats: dict[str, Any] = {}
            kd, ce = fused_head_loss(exit_hidden, head, final, head, args, vocab_size, y if with_ce else None, stats,
                                     state=view.state)  # fmt: skip
            agreement = stats.get("top1_agreement")
        else:
            logits = head.logits(exit_hidden)
            logits = logits[..., :vocab_size] if vocab_size is not None else logits
            kd = logit_divergence(logits, target_logits, **divergence_kwargs(args, view.state)).sum()
            ce = hard_loss(logits, y, view.head) if with_ce else None
            agreement = (logits.argmax(-1) == target_logits.argmax(-1)).sum()
        out.add(f"exit{layer}_kd", kd, kd_w)
        if with_ce:
            out.add(f"exit{layer}_ce", ce, ce_w)
        if agreement is not None:
            out.metric(f"exit{layer}_agreement", agreement.detach(), y.numel())
    return out


class EarlyExits:
    """Early-exit self-distillation for one student, configured from `early_exit_layers` / `early_exit_weight`.

    Args:
        args: the config (`DistillationArguments`).
        student (`nn.Module`): the (unwrapped) student, a decoder LM with a final norm and an lm_head.
        vocab_size (`int`, *optional*): the real vocabulary (padded heads).

    Example:
        >>> exits = EarlyExits(args, student)                                      # args.early_exit_layers = [1]
        >>> out = student(**inputs, **exits.forward_kwargs())
        >>> terms = exits.terms(out, SupervisedView.from_batch(batch, head))      # exit1_kd, exit1_ce
    """

    def __init__(self, args: Any, student: nn.Module, vocab_size: int | None = None):
        peers = isinstance(extract_model_from_parallel(student, keep_torch_compile=False), PeerStudents)
        if peers:
            raise ValueError(
                "`early_exit_layers` with PeerStudents (mutual learning) is not supported: the exits would read one "
                "peer's hidden states only. Remove `early_exit_layers`, or train a single student."
            )
        model = unwrap(student)
        num_layers = getattr(model.config, "num_hidden_layers", None)
        if num_layers is None:
            raise ValueError(f"early_exit_layers needs `config.num_hidden_layers`; {type(model).__name__} has none.")
        if getattr(model.config, "is_encoder_decoder", False):
            raise ValueError("early_exit_layers supports decoder-only LMs; the student is an encoder-decoder.")
        kind = detect_head(model).kind
        if kind != "causal_lm":
            raise ValueError(
                f"early_exit_layers supports causal LM students (an lm_head over the vocabulary); this student is a "
                f"{kind} model ({type(model).__name__}). Remove `early_exit_layers`."
            )
        self.args, self.student, self.vocab_size = args, student, vocab_size
        self.layers = resolve_exit_layers(args.early_exit_layers, num_layers)
        self.norm = final_norm_of(student)
        _head_of(student)  # raises now, not at the first step, when the student has no Linear lm_head
        self.fused = bool(args.use_fused_kd_loss) and lm_head_of(student) is not None

    @staticmethod
    def active(args: Any) -> bool:
        """Whether the config switches early exits on."""
        return args.early_exit_layers is not None and args.early_exit_weight > 0

    def forward_kwargs(self) -> dict[str, Any]:
        """What the student's forward must return: every layer's hidden states."""
        return {"output_hidden_states": True}

    def terms(self, student_outputs: Any, view: SupervisedView) -> LossTerms:
        """`early_exit_terms` of the student's outputs (which must hold `hidden_states`)."""
        hidden = getattr(student_outputs, "hidden_states", None)
        if hidden is None:
            raise ValueError("Early exits need the student's hidden states: call it with output_hidden_states=True.")
        return early_exit_terms(hidden, self.layers, self.norm, _head_of(self.student), view, self.args,
                                self.fused, self.vocab_size)  # fmt: skip
