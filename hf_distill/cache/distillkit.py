"""Reading DistillKit's compressed logit datasets (arcee-ai/DistillKit, `distillkit/compression`), our own decoder.

DistillKit's `sample_logits_vllm.py` writes Parquet files (`data_<n>.parquet`) of rows
`input_ids: list<uint64>`, `compressed_logprobs: list<list<uint8>>` and `bytepacked_indices: list<list<uint8>>`,
plus the `compression_config.yaml` of its `DistributionQuantizationConfig` in the same folder. Row i of the two byte
columns is vLLM's `prompt_logprobs[i + 1]` (the empty first position dropped): the teacher's top-k distribution of
token `input_ids[i + 1]` given the tokens before it, so a row has `len(input_ids) - 1` of them. Values are vLLM's raw
log-probs (`logprobs_mode="raw_logprobs"`, temperature 1, not renormalised over the top k), entries sorted most
likely first.

Byte layout of one position (what this module decodes; `DistillKitCodec`):

- `bytepacked_indices`: the k token ids, `ceil(log2 d)` bits each (DistillKit computes it in float32), packed most
  significant bit first into one bit stream, zero-padded to a whole byte.
- `compressed_logprobs`, in order:
  1. `exact_k` values as `exact_dtype` (little-endian float16 / bfloat16 / float32 / float64);
  2. one coefficient per `polynomial_terms` entry, as `term_dtype`;
  3. per residual bin: its scale as `scale_dtype`, then `num_elements` unsigned integers of `element_bits` bits
     (most significant bit first, zero-padded to a byte). Value `(q - 2^(bits-1)) * scale`; for 1 bit `(2q - 1) *
     scale`. Bins cover entries `exact_k ...` in order; entries they do not cover have residual 0.
  The last `k - exact_k` entries are the polynomial `sum_i c_i x^i` (an integer term i is `x ** i`, `"sqrt"` and
  `"exp"` are those functions of x) at `x = 0, 1, ..., k - exact_k - 1` (or k - exact_k points spread over [0, 1]
  with `normalize_t`), plus the residuals. With `delta_encoding` the k decoded numbers are the first log-prob followed
  by the differences between neighbours, and a cumulative sum gives the log-probs.

DistillKit's older format (`packed_indices` / `exact_values` / `coeffs`: centred logits, not log-probs) is refused.
"""

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np


CONFIG_FILE = "compression_config.yaml"  # written next to the Parquet files by DistillKit's sampler


COLUMNS = ("compressed_logprobs", "bytepacked_indices")


LEGACY_COLUMNS = ("packed_indices", "exact_values", "coeffs")


FLOAT_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


SPECIAL_TERMS = {"sqrt": np.sqrt, "exp": np.exp}


def index_bits(d: int) -> int:
    """Bits per packed token id for a vocabulary of `d` entries: `ceil(log2 d)` evaluated in float32, as DistillKit's
    compressor computes it."""
    return int(np.ceil(np.log2(np.float32(d), dtype=np.float32)))


def _floats(data: np.ndarray, dtype: str) -> np.ndarray:
    """`(N, n * width)` little-endian bytes -> `(N, n)` float64."""
    data = np.ascontiguousarray(data)
    if dtype == "bfloat16":  # the top half of a float32
        halves = data.view("<u2").astype(np.uint32) << 16
        return halves.view(np.float32).astype(np.float64)
    return data.view({"float16": "<f2", "float32": "<f4", "float64": "<f8"}[dtype]).astype(np.float64)


def unpack_bits(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Unsigned integers packed most significant bit first.

    Args:
        data (`np.ndarray`): `(N, B)` uint8, `B >= ceil(count * bits / 8)`.
        bits (`int`): bits per integer, 1 to 32.
        count (`int`): integers per row.

    Returns:
        `np.ndarray`: `(N, count)` int64.
    """
    if not 1 <= bits <= 32:
        raise ValueError(f"Packed fields of {bits} bits are not supported (1 to 32).")
    stream = np.unpackbits(np.ascontiguousarray(data, dtype=np.uint8), axis=-1)[:, : count * bits]
    stream = stream.reshape(data.shape[0], count, bits).astype(np.int64)
    return stream @ (np.int64(1) << np.arange(bits - 1, -1, -1, dtype=np.int64))


@dataclass
class ResidualBin:
    """One bin of quantized residuals: `num_elements` integers of `element_bits` bits and a `scale_dtype` scale."""

    scale_dtype: str
    element_bits: int
    num_elements: int

    @property
    def num_bytes(self) -> int:
        return FLOAT_BYTES[self.scale_dtype] + (self.element_bits * self.num_elements + 7) // 8


@dataclass
class DistillKitCodec:
    """DistillKit's `DistributionQuantizationConfig` (the field names of its `compression_config.yaml`) and the
    decoder of the rows it describes.

    Attributes:
        d (`int`): vocabulary size the token ids were packed for.
        k (`int`): entries per position.
        exact_k (`int`): leading entries stored as `exact_dtype` floats.
        polynomial_terms (`list`): integer powers and/or "sqrt" / "exp"; empty for none.
        residual_bins (`list[ResidualBin]`): quantized residuals of the entries after `exact_k`.
    """

    d: int
    k: int
    exact_k: int
    exact_dtype: str = "float32"
    polynomial_terms: list[int | str] = field(default_factory=list)
    term_dtype: str = "float32"
    residual_bins: list[ResidualBin] = field(default_factory=list)
    delta_encoding: bool = True
    normalize_t: bool = False

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "DistillKitCodec":
        """From the keys of DistillKit's `compression_config.yaml` (`error_diffusion` only concerns its encoder)."""
        if "vocab_size" in config or "polynomial_degree" in config:
            raise ValueError(
                "This is DistillKit's legacy logit compression config (`LegacyLogitCompressionConfig`: centred "
                "logits, not log-probs), which `--import distillkit` does not read; re-sample the logits with "
                "DistillKit's current `DistributionQuantizationConfig`."
            )
        known = {"d", "k", "exact_k", "exact_dtype", "polynomial_terms", "term_dtype", "residual_bins",
                 "delta_encoding", "error_diffusion", "normalize_t"}  # fmt: skip
        unknown = sorted(set(config) - known)
        if unknown or not {"d", "k", "exact_k"} <= set(config):
            raise ValueError(
                f"Not a DistillKit compression config: keys {sorted(config)} (need d, k, exact_k; unknown: {unknown})."
            )
        bins = [ResidualBin(**b) for b in config.get("residual_bins") or []]
        codec = cls(
            d=int(config["d"]),
            k=int(config["k"]),
            exact_k=int(config["exact_k"]),
            exact_dtype=config.get("exact_dtype", "float32"),
            polynomial_terms=list(config.get("polynomial_terms") or []),
            term_dtype=config.get("term_dtype", "float32"),
            residual_bins=bins,
            delta_encoding=bool(config.get("delta_encoding", True)),
            normalize_t=bool(config.get("normalize_t", False)),
        )
        codec.check()
        return codec

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "DistillKitCodec":
        """From a `compression_config.yaml` file."""
        import yaml

        with open(path, encoding="utf-8") as f:
            return cls.from_dict(yaml.safe_load(f))

    def check(self) -> None:
        """Raise a ValueError for a config DistillKit itself would refuse or that this decoder cannot read."""
        dtypes = [self.exact_dtype, self.term_dtype] + [b.scale_dtype for b in self.residual_bins]
        if any(t not in FLOAT_BYTES for t in dtypes):
            raise ValueError(f"DistillKit config: dtypes must be among {list(FLOAT_BYTES)}, got {dtypes}.")
        if not 0 <= self.exact_k <= self.k or self.d < 1:
            raise ValueError(f"DistillKit config: need 0 <= exact_k <= k and d >= 1 (d={self.d}, k={self.k}).")
        if sum(b.num_elements for b in self.residual_bins) > self.k - self.exact_k:
            raise ValueError("DistillKit config: the residual bins hold more elements than k - exact_k.")
        if any(not (isinstance(t, int) or t in SPECIAL_TERMS) for t in self.polynomial_terms):
            raise ValueError(f"DistillKit config: terms are ints, 'sqrt' or 'exp': {self.polynomial_terms}.")
        if self.exact_k < self.k and not self.polynomial_terms and not self.residual_bins:
            raise ValueError("DistillKit config: exact_k < k needs polynomial_terms or residual_bins.")

    @property
    def index_bits(self) -> int:
        return index_bits(self.d)

    @property
    def index_bytes(self) -> int:
        """Bytes of one position's `bytepacked_indices`."""
        return (self.k * self.index_bits + 7) // 8

    @property
    def logprob_bytes(self) -> int:
        """Bytes of one position's `compressed_logprobs`."""
        exact = self.exact_k * FLOAT_BYTES[self.exact_dtype]
        terms = len(self.polynomial_terms) * FLOAT_BYTES[self.term_dtype]
        return exact + terms + sum(b.num_bytes for b in self.residual_bins)

    def polynomial_points(self) -> np.ndarray:
        """`(k - exact_k, n_terms)` float64: the polynomial's terms at each approximated entry."""
        t = self.k - self.exact_k
        x = np.linspace(0.0, 1.0, t) if self.normalize_t else np.arange(t, dtype=np.float64)
        return np.stack([x**term if isinstance(term, int) else SPECIAL_TERMS[term](x)
                         for term in self.polynomial_terms], axis=-1)  # fmt: skip

    def decode_ids(self, data: np.ndarray) -> np.ndarray:
        """Token ids of `N` positions.

        Args:
            data (`np.ndarray`): `(N, index_bytes)` uint8, rows of `bytepacked_indices`.

        Returns:
            `np.ndarray`: `(N, k)` int64.
        """
        return unpack_bits(data, self.index_bits, self.k)

    def decode_logprobs(self, data: np.ndarray) -> np.ndarray:
        """Log-probs of `N` positions, in stored order (most likely first), computed in float64.

        Args:
            data (`np.ndarray`): `(N, logprob_bytes)` uint8, rows of `compressed_logprobs`.

        Returns:
            `np.ndarray`: `(N, k)` float64.
        """
        n, offset = data.shape[0], 0

        def take(size: int) -> np.ndarray:
            nonlocal offset
            offset += size
            return data[:, offset - size : offset]

        exact = _floats(take(self.exact_k * FLOAT_BYTES[self.exact_dtype]), self.exact_dtype)
        t = self.k - self.exact_k
        approx = np.zeros((n, t))
        if self.polynomial_terms:
            coeffs = _floats(take(len(self.polynomial_terms) * FLOAT_BYTES[self.term_dtype]), self.term_dtype)
            approx += coeffs @ self.polynomial_points().T
        start = 0
        for b in self.residual_bins:
            scale = _floats(take(FLOAT_BYTES[b.scale_dtype]), b.scale_dtype)  # (N, 1)
            q = unpack_bits(take((b.element_bits * b.num_elements + 7) // 8), b.element_bits, b.num_elements)
            level = 2.0 * q - 1.0 if b.element_bits == 1 else q - 2.0 ** (b.element_bits - 1)
            approx[:, start : start + b.num_elements] += level * scale
            start += b.num_elements
        values = np.concatenate([exact, approx], axis=-1)
        return np.cumsum(values, axis=-1) if self.delta_encoding else values


def find_codec(dataset_path: str, config_path: str | None = None) -> DistillKitCodec:
    """The compression config of a DistillKit dataset: `config_path` if given, else `compression_config.yaml` in the
    dataset's folder (a local folder, or the Hub dataset repository's root).

    Args:
        dataset_path (`str`): the dataset as given to `--dataset` (folder, Parquet file or Hub id).
        config_path (`str`, *optional*): an explicit `compression_config.yaml`.
    """
    if config_path is not None:
        return DistillKitCodec.from_file(config_path)
    folder = dataset_path if os.path.isdir(dataset_path) else os.path.dirname(dataset_path)
    if os.path.exists(dataset_path):
        local = os.path.join(folder, CONFIG_FILE)
        if os.path.exists(local):
            return DistillKitCodec.from_file(local)
    else:  # a Hub dataset id
        try:
            from huggingface_hub import hf_hub_download

            return DistillKitCodec.from_file(hf_hub_download(dataset_path, CONFIG_FILE, repo_type="dataset"))
        except Exception as error:  # offline, no such file, private repository ...
            raise ValueError(
                f"Could not read {CONFIG_FILE} of the Hub dataset {dataset_path!r} ({type(error).__name__}); give it "
                "with --distillkit_config."
            ) from error
    raise ValueError(
        f"No {CONFIG_FILE} next to {dataset_path}: DistillKit writes it beside its Parquet files; give its path with "
        "--distillkit_config."
    )
