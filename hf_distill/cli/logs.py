"""Quiet default logs for the `hf-distill` command line only (a Python user's logging and warnings stay theirs).

Where each silenced message comes from (all are Python `logging` records, so a filter on the logger that makes them
drops them; none is printed by C code):

- `torchao`: `Failed to load .../torchao/_C_mxfp8...so` / `_C_cutlass_90a...so` (`torchao/__init__.py` tries every
  CUDA extension library it ships; on a CPU-only machine they cannot load, and nothing we run needs them).
- `torchao.kernel.intmm`: `Warning: Detected no triton, on systems without Triton certain kernels will not work`
  (torchao's Triton int-matmul kernels, for GPUs; our CPU QAT path does not use them).
- `torch.utils._pytree`: `<enum 'KernelPreference'> is an Enum subclass ... register_constant() on Enum subclasses is
  deprecated` (torchao 0.18 registers its enums with torch 2.13's pytree when imported; printed by torch's own log
  handler with the `W1206 ...` prefix).

One Python warning is silenced too: `FutureWarning: `gradient_checkpointing` is deprecated ... Use
`activation_checkpointing` instead` (transformers 5.23's `TrainingArguments.__post_init__`): TRL's `SFTConfig`
defaults `gradient_checkpointing=True`, so every `train` config warned, whatever its recipe said.

`cache-teacher --teacher_api_base ...` logs one `HTTP Request: POST ...` line per request (`httpx`, and `openai`'s
retries; `httpx2` with openai 3) at INFO: the CLI handler shows them as DEBUG, i.e. only with `--debug`.
"""

import logging
import os
import warnings


KNOWN_NOISE = {  # logger -> the fragments of the messages from it that we cannot act on
    "torchao": ("Failed to load ",),
    "torchao.kernel.intmm": ("Detected no triton",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
}
KNOWN_WARNINGS = ((FutureWarning, r"`gradient_checkpointing` is deprecated"),)  # (category, message regex)
HTTP_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2", "openai")  # httpx2: the client of openai >= 3
HANDLER_NAME = "hf-distill"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class DropKnownNoise(logging.Filter):
    """Drops the records whose message contains one of `fragments` (a filter of the logger that makes them)."""

    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        """`False` (drop) for a known message."""
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


class HttpRequestsToDebug(logging.Filter):
    """On the CLI's handler: INFO records of the HTTP client loggers become DEBUG records, shown only when `show`
    (`--debug`, or `OPENAI_LOG` set: the client's logs were asked for). Every other record passes."""

    def __init__(self, show: bool):
        super().__init__()
        self.show = show

    def filter(self, record: logging.LogRecord) -> bool:
        """Demote an HTTP client's INFO record and keep it only if `show`; keep any other record."""
        if record.levelno == logging.INFO and record.name.split(".")[0] in HTTP_LOGGERS:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return self.show
        return True


def quiet_known_noise() -> None:
    """Attach a `DropKnownNoise` filter to each logger of `KNOWN_NOISE` (once per process) and ignore the
    `KNOWN_WARNINGS`."""
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, fragments in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropKnownNoise) for f in logger.filters):
            logger.addFilter(DropKnownNoise(fragments))


def configure_logging(debug: bool = False) -> None:
    """The CLI's logging: known noise dropped; when nobody configured logging yet (no handler on the root logger),
    one stderr handler with timestamps that shows HTTP request lines only with `--debug`. The root level is left as
    is (WARNING) until a command asks for its progress lines (`show_info`).

    Args:
        debug (`bool`): `--debug` (or `HF_DISTILL_DEBUG=1`): our own DEBUG records and the HTTP request lines too.
    """
    quiet_known_noise()
    root = logging.getLogger()
    if root.handlers:  # a user's configuration, or pytest's: theirs
        return
    handler = logging.StreamHandler()
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(HttpRequestsToDebug(debug or bool(os.environ.get("OPENAI_LOG"))))
    root.addHandler(handler)
    if debug:
        logging.getLogger("hf_distill").setLevel(logging.DEBUG)


def show_info() -> None:
    """Let INFO records through (the progress lines of `cache-teacher` and `miniplm`) when the CLI's handler is the
    one configured (`configure_logging`); a user's or pytest's configuration is left alone."""
    root = logging.getLogger()
    if any(handler.get_name() == HANDLER_NAME for handler in root.handlers) and root.level > logging.INFO:
        root.setLevel(logging.INFO)
