"""Offline, seeded tiny models and tokenizers built from configs (no Hub access anywhere in the tests)."""

import contextlib
import os
import signal
import subprocess
import warnings
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    DataCollatorForLanguageModeling,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)
from vllm_server import serve_tiny_llama

from hf_distill import DistillationConfig, DistillationSFTConfig, DistillationTrainer
from hf_distill.cli.shutdown import ABANDONED, TIMEOUT_ENV


REPO = Path(__file__).resolve().parents[1]
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
WORDS = (  # noqa: SIM905
    "the a an is are was of to and in on at it this that cat dog sat mat ran fast slow big small red blue "
    "user assistant system answer question label rationale because so yes no one two three four five six "
    "plus minus equals entailment neutral contradiction"
).split()
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}<|im_start|>assistant "
    "{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %} {% else %}"
    "<|im_start|>{{ message['role'] }} {{ message['content'] }}<|im_end|> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant "
    "{% endif %}"
)


def make_tokenizer(words: list[str] | None = None, chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over `SPECIAL + words` (64 tokens by default), built offline."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + (words if words is not None else WORDS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)  # keep them whole (ids 4 and 5)
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def make_llama(
    num_layers: int = 2,
    hidden: int = 32,
    vocab_size: int = 64,
    heads: int = 4,
    seed: int = 0,
    cls: type = LlamaForCausalLM,
    **kwargs,
) -> PreTrainedModel:
    """A seeded tiny random Llama (fp32, eval-ready): a causal LM, or any other Llama head class `cls`."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
        **kwargs,
    )
    return cls(config)


def bert_config(layers: int = 2, **kwargs) -> BertConfig:
    """A tiny BERT config (vocab 64, hidden 32, 4 heads) with `layers` layers; `kwargs` add or replace fields."""
    return BertConfig(
        **{
            "vocab_size": 64,
            "hidden_size": 32,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "max_position_embeddings": 64,
            "pad_token_id": 0,
            **kwargs,
        }
    )


def make_t5(num_layers: int = 2, d_model: int = 32, vocab_size: int = 64, seed: int = 0) -> T5ForConditionalGeneration:
    """A seeded tiny random T5 (encoder and decoder of `num_layers` each)."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=3,
        decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(config)


def tokenized_texts(tok: PreTrainedTokenizerFast, texts: list[str]) -> Dataset:
    """`texts` tokenised into a dataset of `input_ids` / `attention_mask` rows (no `text` column)."""
    return Dataset.from_dict({"text": texts}).map(lambda r: tok(r["text"]), remove_columns=["text"])


def tiny_run(**fields) -> dict:
    """Config fields shared by the tiny test runs: 2 steps, a log line each step, no reporting, CPU, no checkpoints;
    `fields` add or replace any."""
    return {"max_steps": 2, "logging_steps": 1, "report_to": [], "use_cpu": True, "save_strategy": "no", **fields}


def distill_config(tmp_path, **overrides) -> DistillationConfig:
    """A tiny seeded CPU run (`tiny_run`, batch 4), output in `tmp_path/out`. `overrides` replace or add any field."""
    base = tiny_run(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, seed=0, data_seed=0)
    return DistillationConfig(**{**base, **overrides})


def distill_sft_config(tmp_path, **overrides) -> DistillationSFTConfig:
    """A tiny CPU `DistillationSFTConfig` (`tiny_run`, batch 2), output in `tmp_path/sft`. `overrides` replace or
    add any field."""
    base = tiny_run(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=2)
    return DistillationSFTConfig(**{**base, **overrides})


def make_lm_trainer(
    tmp_path, tok, texts: list[str] | Dataset, student=None, teacher=None, collator=None, **overrides
) -> DistillationTrainer:
    """A causal-LM `DistillationTrainer` on `texts` (a list of strings is tokenised, a `Dataset` used as is) with
    `distill_config(tmp_path, **overrides)`; the student and teacher default to `make_llama(2, 32)` and
    `make_llama(4, 64, seed=1)`, the collator to the causal-LM one."""
    return DistillationTrainer(
        model=student if student is not None else make_llama(2, 32),
        teacher_model=teacher if teacher is not None else make_llama(4, 64, seed=1),
        args=distill_config(tmp_path, **overrides),
        train_dataset=texts if isinstance(texts, Dataset) else tokenized_texts(tok, texts),
        data_collator=collator or DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok,
    )


def one_sgd_step(batch_size: int, accumulation: int) -> dict:
    """Config fields for one plain SGD update (lr 1, no clipping, constant schedule) over `accumulation`
    micro-batches of `batch_size` rows: gradient-accumulation runs then compare weight for weight."""
    return dict(
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
    )


def trained_weights(trainer) -> dict[str, torch.Tensor]:
    """Run `trainer.train()` and return a detached copy of the model's state dict."""
    trainer.train()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture
def teacher() -> LlamaForCausalLM:
    return make_llama(num_layers=4, hidden=64, seed=1)


@pytest.fixture
def student() -> LlamaForCausalLM:
    return make_llama(num_layers=2, hidden=32, seed=0)


@pytest.fixture
def tiny_t5() -> T5ForConditionalGeneration:
    return make_t5()


@pytest.fixture(scope="session")
def _vllm_session(tmp_path_factory):
    words = WORDS + [f"w{i}" for i in range(64 - len(SPECIAL) - len(WORDS))]  # 64 tokens, the model's vocabulary
    yield from serve_tiny_llama(tmp_path_factory.mktemp("vllm") / "tiny-llama", make_tokenizer(words), lora=False)


@pytest.fixture(scope="session")
def _vllm_lora_session(tmp_path_factory):
    words = WORDS + [f"w{i}" for i in range(64 - len(SPECIAL) - len(WORDS))]
    yield from serve_tiny_llama(tmp_path_factory.mktemp("vllm-lora") / "tiny-llama", make_tokenizer(words), lora=True)


@pytest.fixture
def vllm_server(_vllm_session):
    """A real vLLM server of a tiny Llama (tests/vllm_server.py), started once per session, always stopped: yields
    `ServedModel(url, model, folder, tokenizer, server)`. Without LoRA (vLLM 0.32 on CPU crashes on prompt log-probs
    of several requests at once when `--enable-lora` is on); `vllm_lora_server` has runtime LoRA. A test that stopped
    the server (or left it dead) does not fail the tests after it: each test gets it started again."""
    _vllm_session.server.start()
    return _vllm_session


@pytest.fixture
def vllm_lora_server(_vllm_lora_session):
    """As `vllm_server`, with `--enable-lora --max-lora-rank 8` and runtime adapter loading."""
    _vllm_lora_session.server.start()
    return _vllm_lora_session


def descendants(root: int) -> dict[int, str]:
    """`root` and every process below it (pid -> "ppid stat elapsed args"), parents before children."""
    try:
        rows = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,stat=,etime=,args="], capture_output=True, text=True,
                              check=False).stdout.splitlines()  # fmt: skip
    except FileNotFoundError:  # no procps: only the launcher itself is known
        rows = [f"{root} ? ? ? (ps not installed)"]
    table = {int(r.split()[0]): r.split(None, 1)[1] for r in rows if r.strip()}
    tree, frontier = {}, [root]
    while frontier:
        pid = frontier.pop(0)
        tree[pid] = table.get(pid, "(gone)")
        frontier += [child for child, row in table.items() if int(row.split()[0]) == pid and child not in tree]
    return tree


def launcher_env(**overrides: str) -> dict[str, str]:
    """Environment of a launched test run: CPU only, one thread per process, offline, this checkout importable, no
    `ACCELERATE_*` / `FSDP_*` settings leaking in from the caller, Python stacks on SIGABRT, a short destroy limit;
    `overrides` replace entries (e.g. `CUDA_VISIBLE_DEVICES` for a GPU test)."""
    env = dict(
        os.environ,
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        PYTHONFAULTHANDLER="1",
    )
    env[TIMEOUT_ENV] = "30"
    for key in [k for k in env if k.startswith(("ACCELERATE_", "FSDP_"))]:
        del env[key]
    return {**env, **overrides}


def run_processes(
    cmd: list[str], timeout: float = 300, cwd: Path = REPO, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a multi-process launcher (torchrun, accelerate launch) with `launcher_env()` in its own session and check it
    exits 0.

    On timeout, lists the launcher's process tree, sends every process in it SIGABRT with faulthandler on (each Python
    process prints its stacks), then SIGKILL, and fails with that output: a hang names where it hung, and leaves no
    orphans. A CLI whose final process-group destroy had to be abandoned (hf_distill.cli.shutdown) is reported as a
    warning. `env` overrides entries of `launcher_env()`.
    """
    proc = subprocess.Popen(cmd, env=launcher_env(**(env or {})), cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = descendants(proc.pid)
        for pid in reversed(tree):  # workers first, then the launcher
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGABRT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=20)  # each process prints its stacks and dies
        for pid in reversed(tree):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()  # everything read so far plus the rest: retrying loses no output
        ps = "\n".join(f"{pid} {row}" for pid, row in tree.items())
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout} s. Processes:\n{ps}\n"
                    f"stdout:\n{stdout[-3000:]}\nstderr (stacks after SIGABRT):\n{stderr[-12000:]}")  # fmt: skip
    if ABANDONED in stderr:
        warnings.warn(f"{' '.join(cmd)}: {stderr[stderr.index(ABANDONED) :][:6000]}", stacklevel=2)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{stdout[-3000:]}\n{stderr[-6000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
