r"""Compact teacher-cache rows (`cache_teacher(compression="compact")`, cache format version 2): about 2 bytes per
top-k entry instead of 6, decoded with vectorised numpy (no Python loop per token or entry).

One row of n supervised positions with k entries each is stored as a single byte string (`payload`) plus two small
columns (`id_golomb_order`, the exp-Golomb order b of the row's ids, and `crc32` of the payload):

    payload = span (n x fp16) | tail (n x fp16) | values | len(ids_prefix) (uint32) | ids_prefix | ids_fields

- Ids (lossless): each position's k ids are sorted ascending and delta-coded, `g_1 = id_1`, `g_i = id_i - id_{i-1} - 1`
  (>= 0), then exp-Golomb-coded with one order b per row (the b in 0..ceil(log2 V) that makes the row shortest):
  `h = (g >> b) + 1 = 2^m + r` stores m in unary in `ids_prefix` (m 0 bits, then a 1) and the (m + b)-bit field
  `(r << b) | (g mod 2^b)` in `ids_fields`. The gaps of an LM's top-k are heavy-tailed (SmolLM2, k = 64: median 61,
  99th percentile ~8800), which exp-Golomb codes in about 9.3 bits per id, against 10.7 for a Rice code and 16 for
  plain bit-packing in ceil(log2(49152)) bits (docs/teacher_cache.md). Decoding is vectorised: `np.unpackbits`, the
  positions of the 1 bits give every m, a cumulative sum of the widths every field's offset, one gather all fields.
- Log-probs (lossy): per position, `span` = largest - smallest log-prob (fp16). Every entry (in id order) stores
  `q = round(L * sqrt((top - l) / span))` in `value_bits` bits (L = 2^value_bits - 1), decoded as
  `top - l' = span * (q / L)^2`. The square root spends the levels where the probabilities are large: the error bound
  `|(top - l') - (top - l)| <= span * (u / L + 1 / (4 L^2))`, u = sqrt((top - l) / span), is span / (4 L^2) at the top
  entry and grows only where `p / p_top = exp(-(top - l))` is small. The largest log-prob `top` itself is not stored:
  the k probabilities and the tail mass sum to 1, so `top = log(1 - e^tail) - logsumexp(-(top - l'))`, which also makes
  every decoded position exactly normalised. Log-probs below -1e4 (probability 0 in fp32) are stored as -1e4.
- Tail: `tail_logmass` as fp16, as in the uncompressed format (the sparse loss's tail bucket, `losses/sparse.py`).

Decoded rows are returned most likely first (entries sorted by decoded log-prob, ties by id), like uncompressed rows.
`quantization_error` measures what the quantization costs on a cache: the KL between the (k + 1)-bucket teacher
distributions (k tokens + tail, as the sparse loss sees them) of the fp16 values and of the decoded compact values.
"""

import math
import zlib

import numpy as np


DEFAULT_VALUE_BITS = 6
LOGPROB_FLOOR = -1.0e4


def id_bits(vocab_size: int) -> int:
    """ceil(log2(V)): the bits of one id in plain bit-packing (the size compact delta coding is compared with)."""
    return max(1, math.ceil(math.log2(vocab_size)))


def _pack(values: np.ndarray, width: int) -> bytes:
    """Non-negative integers `(N,)` as `width`-bit big-endian fields, bit-packed and padded to a whole byte."""
    if width == 0 or values.size == 0:
        return b""
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    bits = ((values.astype(np.int64)[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1)).tobytes()


def _unpack(data: np.ndarray, count: int, width: int) -> np.ndarray:
    """Inverse of `_pack`: `count` integers (int64) of `width` bits from the uint8 array `data`."""
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    bits = np.unpackbits(data, count=count * width).reshape(count, width).astype(np.int64)
    return bits @ (np.int64(1) << np.arange(width - 1, -1, -1, dtype=np.int64))


def _golomb_order(gaps: np.ndarray, max_bits: int) -> int:
    """The order b in 0..max_bits that makes the exp-Golomb code of `gaps` `(N,)` shortest (sizes in `_fields`)."""
    b = np.arange(max_bits + 1, dtype=np.int64)[:, None]
    prefix = np.floor(np.log2((gaps[None, :] >> b) + 1)).astype(np.int64)
    return int(np.argmin((2 * prefix + 1).sum(-1) + gaps.size * b[:, 0]))


def _fields(gaps: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exp-Golomb code of order b, split in streams: gap g -> h = (g >> b) + 1 = 2^m + r (0 <= r < 2^m); m in unary,
    then an (m + b)-bit field (r << b) | (g mod 2^b). Returns m, the field widths m + b and the field values."""
    h = (gaps >> b) + 1
    m = np.floor(np.log2(h)).astype(np.int64)
    return m, m + b, ((h - (np.int64(1) << m)) << b) | (gaps & ((1 << b) - 1))


def _pack_varwidth(values: np.ndarray, widths: np.ndarray) -> bytes:
    """Concatenate `values[i]` in `widths[i]` bits each (big-endian), padded to a whole byte."""
    if values.size == 0 or widths.max() == 0:
        return b""
    j = np.arange(int(widths.max()), dtype=np.int64)
    keep = j[None, :] < widths[:, None]
    bits = (values[:, None] >> np.maximum(widths[:, None] - 1 - j[None, :], 0)) & 1
    return np.packbits(bits[keep].astype(np.uint8)).tobytes()


def _unpack_varwidth(data: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Inverse of `_pack_varwidth` for known `widths` `(N,)` (each <= 56 bits): every field is cut at once out of the
    8 bytes that start at its first bit, read as one big-endian uint64."""
    if widths.size == 0 or widths.max() == 0:
        return np.zeros(widths.size, dtype=np.int64)
    if widths.max() > 56:
        raise ValueError(f"field of {widths.max()} bits; at most 56 are supported")
    offsets = np.cumsum(widths) - widths
    padded = np.concatenate([data, np.zeros(8, dtype=np.uint8)])
    windows = padded[(offsets >> 3)[:, None] + np.arange(8)]  # (N, 8) uint8
    words = np.ascontiguousarray(windows).view(">u8").reshape(-1).astype(np.uint64)
    words = words << (offsets & 7).astype(np.uint64)
    values = words >> (64 - np.maximum(widths, 1)).astype(np.uint64)
    return np.where(widths > 0, values, 0).astype(np.int64)


def encode_row(
    ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, vocab_size: int, value_bits: int = DEFAULT_VALUE_BITS
) -> tuple[bytes, int]:
    """Encode one cached row (see the module docstring).

    Args:
        ids (`np.ndarray`): shape `(n, k)`, integer token ids in [0, V), distinct within a position.
        logprobs (`np.ndarray`): shape `(n, k)`, float teacher log-probabilities at temperature 1.
        tail (`np.ndarray`): shape `(n,)`, log of the teacher mass outside the k tokens (-inf when k = V).
        vocab_size (`int`): V.
        value_bits (`int`): bits per quantized log-prob, 1..16.

    Returns:
        `tuple[bytes, int]`: the payload and the row's exp-Golomb order b.
    """
    if not 1 <= value_bits <= 16:
        raise ValueError(f"`value_bits` must be between 1 and 16, got {value_bits}.")
    ids = np.asarray(ids, dtype=np.int64)
    n = ids.shape[0]
    if n and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"Token ids must lie in [0, {vocab_size}); got {ids.min()}..{ids.max()}.")
    order = np.argsort(ids, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1)
    values = np.maximum(np.take_along_axis(np.asarray(logprobs, np.float32), order, axis=1), LOGPROB_FLOOR)
    top = values.max(axis=1, keepdims=True, initial=LOGPROB_FLOOR)  # (n, 1)
    span = (top - values.min(axis=1, keepdims=True, initial=0.0)).clip(min=0).astype(np.float16)
    span32 = span.astype(np.float32)
    levels = (1 << value_bits) - 1
    u = np.sqrt(np.clip((top - values) / np.where(span32 > 0, span32, 1.0), 0.0, 1.0))
    q = np.rint(u * levels).astype(np.int64)
    gaps = np.diff(ids, axis=1, prepend=-1) - 1  # (n, k), >= 0 for sorted distinct ids
    if n and gaps.min() < 0:
        raise ValueError("Token ids must be distinct within each position.")
    gaps = gaps.reshape(-1)
    b = _golomb_order(gaps, id_bits(vocab_size)) if gaps.size else 0
    m, widths, fields = _fields(gaps, b)
    unary = np.zeros(int(m.sum()) + gaps.size, dtype=np.uint8)
    unary[np.cumsum(m + 1) - 1] = 1
    fixed = np.concatenate([span[:, 0], np.asarray(tail, np.float32).astype(np.float16)]).tobytes()
    unary_bytes = np.packbits(unary).tobytes()
    prefix = len(unary_bytes).to_bytes(4, "little")
    payload = fixed + _pack(q.reshape(-1), value_bits) + prefix + unary_bytes + _pack_varwidth(fields, widths)
    return payload, b


def decode_row(
    payload: bytes, num_tokens: int, k: int, golomb_order: int, value_bits: int = DEFAULT_VALUE_BITS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode one row written by `encode_row`.

    The largest log-prob of each position is not stored: it follows from the tail and the stored differences, as the
    k probabilities and the tail mass sum to 1 (`top = log(1 - e^tail) - logsumexp(-(top - l))`).

    Args:
        payload (`bytes`): the row's payload.
        num_tokens (`int`): n, the row's supervised positions.
        k (`int`): entries per position.
        golomb_order (`int`): the row's exp-Golomb order b.
        value_bits (`int`): bits per quantized log-prob (the cache's `value_bits`).

    Returns:
        `tuple`: ids `(n, k)` int32, log-probs `(n, k)` fp32 (most likely first per position), tail `(n,)` fp32.
    """
    n, b = num_tokens, golomb_order
    data = np.frombuffer(payload, dtype=np.uint8)
    fixed, value_len = 4 * n, (n * k * value_bits + 7) // 8
    if data.size < fixed + value_len + 4:
        raise ValueError(f"payload of {data.size} bytes is shorter than the {fixed + value_len + 4} expected")
    halves = data[:fixed].view(np.float16).astype(np.float64)
    span, tail = halves[:n, None], halves[n:]
    q = _unpack(data[fixed : fixed + value_len], n * k, value_bits).reshape(n, k)
    diff = span * (q / ((1 << value_bits) - 1)) ** 2  # top - l, (n, k)
    with np.errstate(divide="ignore"):
        top = np.log(-np.expm1(tail))[:, None] - np.logaddexp.reduce(-diff, axis=1, keepdims=True)
    values = np.maximum(top, LOGPROB_FLOOR) - diff
    cursor = fixed + value_len + 4
    unary_len = int.from_bytes(data[cursor - 4 : cursor].tobytes(), "little")
    ones = np.flatnonzero(np.unpackbits(data[cursor : cursor + unary_len]))
    if ones.size < n * k:
        raise ValueError(f"the id stream holds {ones.size} ids, {n * k} expected")
    m = np.diff(ones[: n * k], prepend=-1) - 1
    fields = _unpack_varwidth(data[cursor + unary_len :], m + b)
    h = (np.int64(1) << m) + (fields >> b)
    gaps = ((h - 1) << b) | (fields & ((1 << b) - 1))
    ids = (np.cumsum(gaps.reshape(n, k) + 1, axis=1) - 1).astype(np.int32)
    order = np.lexsort((ids, -values), axis=-1) if n else np.zeros((0, k), dtype=np.int64)
    return (
        np.take_along_axis(ids, order, 1),
        np.take_along_axis(values, order, 1).astype(np.float32),
        tail.astype(np.float32),
    )


def checksum(payload: bytes) -> int:
    """CRC-32 of a payload (stored per row; a mismatch means a corrupt shard)."""
    return zlib.crc32(payload)
