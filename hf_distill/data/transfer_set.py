"""Data-free transfer set: instruction prompts answered by the teacher itself (Gou et al. 2021, data-free KD).

With no task data at hand, the student can be distilled on the teacher's own samples: a varied set of instruction
prompts (templates x topics, written here) is chat-formatted with the tokenizer's template and completed by the
teacher with seeded nucleus sampling. The result is a `DatasetDict` ("train" / "test", held-out prompts never seen in
training) in conversational form.

Generation is cached on disk under a key of everything that changes the samples (teacher weights and config,
tokenizer, prompts, sampling settings, count, seed, batch size): a second call with the same key loads from disk,
and each finished batch is written at once, so an interrupted run resumes with the remaining batches only. Each batch
is sampled under its own seed, so a resumed run gives the same samples as an uninterrupted one.
"""

import hashlib
import json
import logging
import os
import random
from typing import Any

import torch
from datasets import Dataset, DatasetDict, Features, List, Value, load_from_disk
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl.trainer.utils import pad

from ..generation.api import APITeacher
from ..jobs import ResumableJob, atomic_path, fingerprint, write_json_atomic


logger = logging.getLogger(__name__)

PROMPT_TEMPLATES = (
    "Explain {topic} in simple terms.",
    "List three interesting facts about {topic}.",
    "Write a short story about {topic}.",
    "Give me some practical advice about {topic}.",
    "Compare {topic} with something similar and describe the main differences.",
    "Define {topic} in one or two sentences.",
    "Summarise what everyone should know about {topic}.",
    "Write a short poem about {topic}.",
    "What are the advantages and disadvantages of {topic}?",
    "Describe the history of {topic} briefly.",
    "How would you explain {topic} to a ten-year-old?",
    "Give three tips for someone who is new to {topic}.",
    "What are common misconceptions about {topic}?",
    "Write a short dialogue between two friends talking about {topic}.",
    "Why does {topic} matter?",
    "Write a haiku about {topic}.",
    "What questions should a beginner ask about {topic}?",
    "Give a step-by-step guide to getting started with {topic}.",
    "Suggest a fun weekend activity connected to {topic}.",
    "Write a friendly email to a colleague about {topic}.",
    "What might the future of {topic} look like?",
    "Explain how {topic} affects everyday life.",
    "Write a short quiz with answers about {topic}.",
    "Describe {topic} to someone who has never heard of it.",
)
PROMPT_TOPICS = (
    "the water cycle",
    "photosynthesis",
    "healthy sleep",
    "learning a new language",
    "the solar system",
    "saving money",
    "cooking pasta",
    "recycling",
    "the internet",
    "volcanoes",
    "public speaking",
    "time management",
    "climate change",
    "gardening",
    "the human heart",
    "electric cars",
    "friendship",
    "the Roman Empire",
    "machine learning",
    "coffee",
    "regular exercise",
    "honeybees",
    "rainbows",
    "chess",
    "the ocean",
    "reading books",
    "mountains",
    "music",
    "cats",
    "baking bread",
)
_FEATURES = Features(
    {
        "messages": List({"role": Value("string"), "content": Value("string")}),
        "prompt": Value("string"),
        "completion": Value("string"),
    }
)


def default_prompts() -> list[str]:
    """The project's instruction prompts: every template x topic (24 x 30 = 720 distinct prompts), in a fixed
    shuffled order so that any prefix mixes templates and topics."""
    prompts = [template.format(topic=topic) for template in PROMPT_TEMPLATES for topic in PROMPT_TOPICS]
    random.Random(0).shuffle(prompts)
    return prompts


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of one user turn followed by the assistant's generation prompt (plain text without a template)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt + "\n", add_special_tokens=True)["input_ids"])


def _eos_ids(teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(teacher, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


def _fingerprint(teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    """Teacher identity (name, config, a strided sample of every weight) and tokenizer identity, as hashes."""
    weights = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].to("cpu", torch.float64).numpy()
        weights.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        weights.update(sample.tobytes())
    config = teacher.config.to_dict()
    config.pop("transformers_version", None)
    tok = {
        "class": type(tokenizer).__name__,
        "name": getattr(tokenizer, "name_or_path", ""),
        "size": len(tokenizer),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
    }
    return {
        "teacher": str(getattr(teacher.config, "_name_or_path", "") or type(teacher).__name__),
        "config": fingerprint(config),
        "weights": weights.hexdigest(),
        "tokenizer": fingerprint(tok),
    }


def _generate_batch(
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    eos_ids: list[int],
    sampling: dict[str, Any],
    seed: int,
) -> list[tuple[str, bool]]:
    """Sample one completion per prompt: (text, ended_at_eos). Left padding; the attention mask comes from each
    prompt's length, never from `input_ids == pad_token_id` (pad is often EOS, which the chat template contains)."""
    encoded = [_prompt_ids(tokenizer, p) for p in prompts]
    width = max(len(ids) for ids in encoded)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    input_ids = pad([torch.tensor(ids, dtype=torch.long) for ids in encoded], pad_id, "left")  # (B, T)
    attention_mask = pad([torch.ones(len(ids), dtype=torch.long) for ids in encoded], 0, "left")  # (B, T)
    device = next(teacher.parameters()).device
    fork_devices = [device] if device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        out = teacher.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            pad_token_id=pad_id,
            eos_token_id=eos_ids,
            **sampling,
        )
    results = []
    for row in out[:, width:].tolist():  # (B, new tokens)
        ended = next((i for i, token in enumerate(row) if token in eos_ids), None)
        tokens = row if ended is None else row[:ended]
        results.append((tokenizer.decode(tokens, skip_special_tokens=True).strip(), ended is not None))
    return results


def _api_samples(
    teacher: APITeacher,
    tokenizer: PreTrainedTokenizerBase | None,
    prompts: list[str],
    sampling: dict[str, Any],
    seed: int,
    store: str,
) -> list[tuple[str, bool]]:
    """One completion per prompt from a served teacher: (text, ended_before_max_new_tokens)."""
    if teacher.endpoint == "chat":
        requests: list = [[{"role": "user", "content": p}] for p in prompts]
    elif tokenizer is not None and getattr(tokenizer, "chat_template", None):
        requests = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    else:
        requests = [p + "\n" for p in prompts]
    results, _ = teacher.generate(
        requests,
        store,
        max_new_tokens=sampling["max_new_tokens"],
        temperature=sampling.get("temperature", 0.0),
        top_p=sampling.get("top_p", 1.0),
        seed=seed,
        desc="Sampling the transfer set",
    )
    return [(r[0]["text"].strip(), r[0]["finish_reason"] != "length") for r in results]


def build_transfer_set(
    teacher: PreTrainedModel | APITeacher,
    tokenizer: PreTrainedTokenizerBase | None,
    *,
    num_samples: int,
    max_new_tokens: int = 128,
    temperature: float = 0.8,
    top_p: float = 0.95,
    batch_size: int = 8,
    seed: int = 0,
    cache_dir: str | None = None,
    prompts: list[str] | None = None,
    held_out_fraction: float = 0.1,
) -> DatasetDict:
    """Sample a data-free transfer set from a causal-LM teacher.

    Sample `i` answers prompt `i % P` of the `P` prompts (so prompts repeat, with fresh samples, when `num_samples >
    P`). The last `round(held_out_fraction * min(num_samples, P))` of the used prompts (at least one when the fraction
    is positive) are held out: every sample of those prompts goes to "test", the rest to "train". Completions are cut
    at the first EOS token; empty ones are dropped (the count is logged).

    Args:
        teacher (`PreTrainedModel` or `APITeacher`): a causal LM (decoder-only), used in eval mode under `no_grad`;
            or a served teacher (`hf_distill.generation.api.APITeacher`): sample `i` is one request seeded with
            `seed + i` (`batch_size` unused; its `max_concurrency` requests run at once), the chat endpoint gets the
            prompt as a user turn (the completions endpoint the tokenizer's chat-formatted text, when given).
        tokenizer (`PreTrainedTokenizerBase`): the teacher's tokenizer; its chat template formats the prompts when it
            has one (plain `prompt + "\\n"` otherwise).
        num_samples (`int`): samples to generate (train + test, before dropping empty completions).
        max_new_tokens (`int`): completion length limit.
        temperature (`float`): sampling temperature; 0 means greedy decoding.
        top_p (`float`): nucleus sampling mass.
        batch_size (`int`): prompts per `generate` call (part of the cache key: padding changes the numerics).
        seed (`int`): batch `b` is sampled after `torch.manual_seed(seed * 1_000_003 + b)` (the caller's RNG state
            is restored afterwards).
        cache_dir (`str` or `None`): folder for the cache; results go to `<cache_dir>/transfer-<key>/`. None: no
            cache, nothing written.
        prompts (`list[str]` or `None`): user instructions; default `default_prompts()` (720 prompts).
        held_out_fraction (`float`): fraction of the used prompts held out for "test", in [0, 1).

    Returns:
        `datasets.DatasetDict`: splits "train" and "test" with columns `messages` (`[{"role": "user", ...},
        {"role": "assistant", ...}]`), `prompt` and `completion` (plain text). For `trl.SFTTrainer` pass
        `select_columns(["messages"])`, or map the messages to conversational `prompt` / `completion` lists: with the
        text columns present, TRL treats the rows as plain-text prompt-completion pairs without the chat template.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`num_samples` must be a positive int, got {num_samples!r}.")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"`batch_size` and `max_new_tokens` must be >= 1, got {batch_size} and {max_new_tokens}.")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"Need `temperature` >= 0 and 0 < `top_p` <= 1, got {temperature} and {top_p}.")
    if not 0 <= held_out_fraction < 1:
        raise ValueError(f"`held_out_fraction` must be in [0, 1), got {held_out_fraction}.")
    api = isinstance(teacher, APITeacher)
    if not api and getattr(teacher.config, "is_encoder_decoder", False):
        raise ValueError(
            f"The transfer set is sampled from a causal LM; {type(teacher).__name__} is an encoder-decoder."
        )
    prompts = list(default_prompts() if prompts is None else prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("`prompts` must be a non-empty list of non-empty strings.")
    eos_ids = [] if api else _eos_ids(teacher, tokenizer)
    if not api and not eos_ids:
        raise ValueError("Neither the tokenizer nor the teacher's generation config defines an EOS token.")

    used = min(num_samples, len(prompts))
    n_held = 0 if held_out_fraction == 0 else min(used - 1, max(1, round(held_out_fraction * used)))
    if held_out_fraction > 0 and n_held == 0:
        logger.warning("Only one distinct prompt is used: the 'test' split is empty.")
    held_out = set(range(used - n_held, used))
    sampling: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
    if temperature > 0:
        sampling.update(temperature=temperature, top_p=top_p)
    settings = {
        **sampling,
        "num_samples": num_samples,
        "seed": seed,
        "batch_size": None if api else batch_size,
        "held_out_fraction": held_out_fraction,
        "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
        "eos_ids": eos_ids,
    }

    folder = batches_dir = None
    if cache_dir is not None:  # the folder is named by the fingerprint of everything that changes the samples
        identity = {**(teacher.identity if api else _fingerprint(teacher, tokenizer)), **settings}
        folder = os.path.join(cache_dir, f"transfer-{fingerprint(identity)[:16]}")
        final_dir = os.path.join(folder, "dataset")
        if os.path.isdir(final_dir):
            logger.info("Transfer set loaded from the cache %s (no generation).", final_dir)
            return load_from_disk(final_dir)
        batches_dir = os.path.join(folder, "batches")
        os.makedirs(batches_dir, exist_ok=True)
        write_json_atomic(os.path.join(folder, "identity.json"), identity, indent=None)

    if api:  # one "batch": the API store resumes per request
        if folder is None:
            raise ValueError("An API teacher needs `cache_dir` (its responses are stored there, resumable).")
        batch_size = num_samples
        used_prompts = [prompts[i % len(prompts)] for i in range(num_samples)]
        store = os.path.join(folder, "api_responses.jsonl")
        flat = _api_samples(teacher, tokenizer, used_prompts, sampling, seed, store)
    n_batches = (num_samples + batch_size - 1) // batch_size
    results: dict[int, list] = {0: flat} if api else {}
    if batches_dir is not None:  # one file per finished batch, written atomically
        for b in range(n_batches):
            path = os.path.join(batches_dir, f"batch-{b:06d}.json")
            if os.path.isfile(path):
                with open(path) as f:
                    results[b] = json.load(f)
        if results:
            logger.info("Resuming the transfer set: %d of %d batches already on disk.", len(results), n_batches)
    todo = ResumableJob.todo(range(n_batches), results)

    was_training = teacher.training if not api else None
    if not api:
        teacher.eval()
    try:
        with tqdm(total=n_batches, initial=len(results), desc="Sampling the transfer set", unit="batch") as bar:
            for b in todo:
                indices = range(b * batch_size, min((b + 1) * batch_size, num_samples))
                batch_prompts = [prompts[i % len(prompts)] for i in indices]
                results[b] = _generate_batch(
                    teacher, tokenizer, batch_prompts, eos_ids, sampling, seed=seed * 1_000_003 + b
                )
                if batches_dir is not None:
                    write_json_atomic(os.path.join(batches_dir, f"batch-{b:06d}.json"), results[b], indent=None)
                bar.update(1)
    finally:
        if not api:
            teacher.train(was_training)

    columns: dict[str, dict[str, list]] = {split: {name: [] for name in _FEATURES} for split in ("train", "test")}
    empty = truncated = 0
    for i in range(num_samples):
        completion, ended = results[i // batch_size][i % batch_size]
        truncated += not ended
        if not completion:
            empty += 1
            continue
        prompt = prompts[i % len(prompts)]
        split = columns["test" if i % len(prompts) in held_out else "train"]
        split["messages"].append([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}])
        split["prompt"].append(prompt)
        split["completion"].append(completion)
    if empty:
        logger.warning("Dropped %d of %d empty teacher completions.", empty, num_samples)
    logger.info(
        "Transfer set: %d train / %d test samples; %d of %d completions hit max_new_tokens=%d before EOS.",
        len(columns["train"]["prompt"]),
        len(columns["test"]["prompt"]),
        truncated,
        num_samples,
        max_new_tokens,
    )
    data = DatasetDict({split: Dataset.from_dict(cols, features=_FEATURES) for split, cols in columns.items()})
    if folder is None:
        return data
    final_dir = os.path.join(folder, "dataset")
    with atomic_path(final_dir) as tmp_dir:
        data.save_to_disk(str(tmp_dir), num_shards=dict.fromkeys(data, 1))  # an empty split needs one (empty) shard
    return load_from_disk(final_dir)
