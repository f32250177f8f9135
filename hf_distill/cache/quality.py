"""What the compact format's quantization costs on a cache (`quantization_error`)."""

from collections.abc import Sequence

import numpy as np
import torch

from ..losses.sparse import teacher_bucket_log_probs
from .compact import DEFAULT_VALUE_BITS, decode_row, encode_row
from .reader import TeacherCache


def _bucket_kl(
    ref_ids: np.ndarray,
    ref_lp: np.ndarray,
    ref_tail: np.ndarray,
    ids: np.ndarray,
    lp: np.ndarray,
    tail: np.ndarray,
    vocab_size: int,
) -> torch.Tensor:
    """Per-position KL(reference buckets || decoded buckets), both aligned by id; `(n,)` float64."""
    ref_order, order = np.argsort(ref_ids, axis=1), np.argsort(ids, axis=1)
    if not np.array_equal(np.take_along_axis(ref_ids, ref_order, 1), np.take_along_axis(ids, order, 1)):
        raise ValueError("The two caches hold different top-k ids for the same row; compare caches of one teacher.")
    p = teacher_bucket_log_probs(
        torch.from_numpy(np.take_along_axis(ref_lp, ref_order, 1)).double(),
        torch.from_numpy(ref_tail).double(),
        vocab_size,
    )
    q = teacher_bucket_log_probs(
        torch.from_numpy(np.take_along_axis(lp, order, 1)).double(), torch.from_numpy(tail).double(), vocab_size
    )
    return (p.exp() * (p - q)).nansum(-1).clamp(min=0)  # nansum: 0 * log(0/0) of an empty tail bucket


def quantization_error(
    cache: "TeacherCache | str",
    reference: "TeacherCache | str | None" = None,
    *,
    value_bits: int = DEFAULT_VALUE_BITS,
    row_ids: Sequence | None = None,
    batch_rows: int = 256,
) -> dict[str, float]:
    """What the compact format's quantization costs on a cache: per supervised position, the KL divergence from the
    reference teacher distribution to the decoded one, over the k + 1 buckets of the sparse loss (k tokens + tail).

    - `cache` compact, `reference` an uncompressed (fp16 or fp32) cache of the same teacher and rows: measured
      between the two caches.
    - `cache` uncompressed, no `reference`: each row is encoded with `value_bits` and decoded in memory (what
      `compression="compact"` would store), and compared with the cache's own values.

    Args:
        cache (`TeacherCache` or `str`): the cache (or folder) to measure.
        reference (`TeacherCache` or `str`, *optional*): the uncompressed cache to compare with.
        value_bits (`int`): bits per log-prob for the in-memory round trip (ignored with a `reference`).
        row_ids (`Sequence`, *optional*): rows to measure (default: all of `cache`).
        batch_rows (`int`): rows read at a time.

    Returns:
        `dict`: `kl_mean`, `kl_max` (nats per position), `max_abs_logprob_error` (over entries with p >= 1e-3 of the
        position's top-k mass), `positions`, `rows`, `bytes_per_entry` (payload bytes of the measured rows / entries).
    """
    cache = cache if isinstance(cache, TeacherCache) else TeacherCache(cache)
    if reference is not None:
        reference = reference if isinstance(reference, TeacherCache) else TeacherCache(reference)
        if not cache.compact or reference.compact:
            raise ValueError("Pass a compact cache as `cache` and an uncompressed one as `reference`.")
        if reference.vocab_size != cache.vocab_size or reference.k != cache.k:
            raise ValueError("The two caches have different k or vocabularies; compare caches of one teacher.")
    elif cache.compact:
        raise ValueError(
            "A compact cache no longer holds the fp16 values; pass `reference=` an uncompressed cache of the same "
            "rows (or measure an uncompressed cache, which is round-tripped in memory)."
        )
    ids_all = list(row_ids) if row_ids is not None else cache.row_ids()
    kls, max_err, payload_bytes, entries = [], 0.0, 0, 0
    for start in range(0, len(ids_all), batch_rows):
        chunk = ids_all[start : start + batch_rows]
        rows = cache.lookup(chunk)
        refs = reference.lookup(chunk) if reference is not None else rows
        for row, ref in zip(rows, refs, strict=True):
            if reference is None:
                payload, b = encode_row(ref.ids, ref.logprobs, ref.tail, cache.vocab_size, value_bits)
                ids, lp, tail = decode_row(payload, ref.ids.shape[0], cache.k, b, value_bits)
                payload_bytes += len(payload)
            else:
                ids, lp, tail = row.ids, row.logprobs, row.tail
            if ref.ids.shape[0] == 0:
                continue
            kls.append(_bucket_kl(ref.ids, ref.logprobs, ref.tail, ids, lp, tail, cache.vocab_size))
            ref_order, order = np.argsort(ref.ids, axis=1), np.argsort(ids, axis=1)
            a, z = np.take_along_axis(ref.logprobs, ref_order, 1), np.take_along_axis(lp, order, 1)
            weight = np.exp(a - np.logaddexp.reduce(a, axis=1, keepdims=True))
            err = np.abs(a - z)[weight >= 1e-3]
            max_err = max(max_err, float(err.max()) if err.size else 0.0)
            entries += ref.ids.size
    if reference is not None:
        import pyarrow.compute as pc

        for start in range(0, len(ids_all), batch_rows):
            table = cache.table(ids_all[start : start + batch_rows])
            payload_bytes += pc.sum(pc.binary_length(table.column("payload"))).as_py() or 0
    kl = torch.cat(kls) if kls else torch.zeros(0, dtype=torch.float64)
    return {
        "kl_mean": float(kl.mean()) if kl.numel() else 0.0,
        "kl_max": float(kl.max()) if kl.numel() else 0.0,
        "max_abs_logprob_error": max_err,
        "positions": int(kl.numel()),
        "rows": len(ids_all),
        "bytes_per_entry": payload_bytes / max(entries, 1),
    }
