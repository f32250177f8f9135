"""Fault sweep: bad inputs and kills, run through the `hf-distill` CLI as a new user would, on tiny local models.

Each case runs `hf-distill ...` in a fresh subprocess and is classified by what the user sees:
- `clear error`: non-zero exit, the expected message (`needle`) on stderr and no Python traceback (an error with
  another message is `error without the expected message`, not clear);
- `works` / `warns`: exit 0, finite saved weights (and, for `warns`, the expected warning);
- `RAW TRACEBACK`: a Python traceback reached the user for an input mistake;
- `SILENT WRONG`: exit 0 where an error was due, or saved weights with NaN/inf;
- kill cases: a run killed with SIGKILL right after a checkpoint, then resumed, must end with the weights of the
  uninterrupted run (`exact resume`), bit for bit.

Cases are grouped by class (`class` in each result): numbers, ignored settings, API teacher replies (a scripted
OpenAI-compatible stub on 127.0.0.1 in a thread), paths, cross-tokenizer, data, export, bf16, served teacher and
vLLM on-policy (a real tiny vLLM server from tests/vllm_server.py, started once and always stopped), draft evaluate,
context distillation, cache-teacher, training faults, kill + resume.

    python benchmarks/fault_sweep.py --out runs/bench                 # every case
    python benchmarks/fault_sweep.py --out runs/try --only paths,data  # some classes (no kill + resume)
    python benchmarks/fault_sweep.py --out runs/fix --only data --rerun_into runs/bench/fault_sweep.json  # after a fix

Prints one table and writes `fault_sweep.json`. The fast cases are also unit tests (tests/test_bad_inputs.py).
"""

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402
from conftest import WORDS, launcher_env, make_llama, make_t5, make_tokenizer  # noqa: E402
from openai_stub import ScriptedServer, reply  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from vllm_server import free_port  # noqa: E402


TEXTS = ["the cat sat on the mat", "a dog ran fast", "one plus two equals three", "the big red dog is slow"] * 3
PAIRS = [("the cat sat on", "the mat"), ("one plus two equals", "three"), ("a dog", "ran fast"), ("is it big", "no")]
RUN = ["--report_to", "none", "--use_cpu", "true", "--per_device_train_batch_size", "2", "--max_steps", "2"]
RUN += ["--save_strategy", "no", "--logging_steps", "1", "--seed", "0"]
OUT = "{out}"  # replaced by the case's own output folder


class Case(NamedTuple):
    cls: str  # the class of fault (docs count per class)
    name: str
    argv: list[str]  # after `hf-distill`; a `train` gets `--output_dir <out>`, other commands use OUT
    expected: str  # error | works | warns
    needle: str | None  # text the error or warning must contain (None only for `works`)


# ----------------------------------------------------------------------------------------------- files
def bpe_tokenizer(vocab_size: int = 330):
    """A byte-level BPE tokenizer over the test words (another tokenizer than the students' word-level one)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    corpus = [" ".join(WORDS[i : i + 5]) for i in range(0, len(WORDS), 3)] + [p for p, _ in PAIRS]
    bpe.train_from_iterator(corpus, vocab_size=vocab_size, min_frequency=2, special_tokens=["<pad>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def served_tokenizer():
    """The tests' served tokenizer (tests/conftest.py `_vllm_session`): 64 tokens, the served model's vocabulary."""
    return make_tokenizer(WORDS + [f"w{i}" for i in range(64 - 6 - len(WORDS))])


def padded_teacher(tokenizer, rows: int):
    """A tiny teacher for `tokenizer` whose embedding and lm_head have `rows` rows (real checkpoints pad them)."""
    model = make_llama(4, 64, vocab_size=len(tokenizer), seed=1)
    model.resize_token_embeddings(rows, mean_resizing=False)
    return model


def lay_out(root: Path) -> dict[str, str]:
    """Tiny models, tokenizers and data files for the cases; returns their paths by name."""
    from test_export import make_bpe_tokenizer, make_student

    tok = make_tokenizer()
    other = make_tokenizer(words=list(reversed(WORDS)))  # same size, another token -> id map
    bpe = bpe_tokenizer()
    export_tok = make_bpe_tokenizer()
    models = {"student": (make_llama(2, 32), tok), "teacher": (make_llama(4, 64, seed=1), tok)}
    models["student_served"] = (make_llama(2, 32), served_tokenizer())  # the served model's 64 tokens
    models["other_tok_student"] = (make_llama(2, 32, vocab_size=len(other)), other)
    models["other_tok_teacher"] = (make_llama(4, 64, seed=1), other)
    models["t5"] = (make_t5(), tok)
    models["bpe_teacher_padded"] = (padded_teacher(bpe, 384), bpe)  # 330 tokens, 384 embedding rows
    models["bpe_teacher_short"] = (make_llama(4, 64, vocab_size=300, seed=1), bpe)  # 330 tokens, 300 rows
    models["draft_small_vocab"] = (make_llama(1, 32, vocab_size=40, seed=5), tok)  # 55 tokens, 40 rows
    draft_tok = make_tokenizer([*reversed(WORDS), "green", "tree"])
    models["draft_other_vocab"] = (make_llama(1, 32, vocab_size=len(draft_tok), seed=3), draft_tok)
    models["export_ok"] = (make_student(export_tok, tie=True), export_tok)
    models["export_narrow"] = (make_student(export_tok, tie=True, hidden=48, intermediate=96), export_tok)
    models["export_wordlevel"] = (make_student(tok, tie=True), tok)
    nan_teacher = make_llama(4, 64, seed=1)
    with torch.no_grad():
        nan_teacher.model.norm.weight.fill_(float("inf"))
    models["nan_teacher"] = (nan_teacher, tok)
    paths = {}
    for name, (model, tokenizer) in models.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    make_student(export_tok, tie=True).save_pretrained(root / "export_no_tok")  # weights only
    paths["export_no_tok"] = str(root / "export_no_tok")
    bpe.save_pretrained(root / "bpe_tok")
    bpe_tokenizer(290).save_pretrained(root / "bpe_tok_other")  # another BPE, smaller than the teacher's own
    tok.save_pretrained(root / "student_tok")
    served_tokenizer().save_pretrained(root / "served_tok")
    for name in ("bpe_tok", "bpe_tok_other", "student_tok", "served_tok"):
        paths[name] = str(root / name)

    def rows(**columns) -> str:
        return "\n".join(json.dumps(dict(zip(columns, values))) for values in zip(*columns.values()))

    files = {
        "data": rows(text=TEXTS),
        "long": "\n".join(json.dumps({"text": " ".join(["the cat sat on the mat"] * 30)}) for _ in range(4)),
        "empty": "",
        "blank": "\n\n \n",
        "malformed": rows(text=TEXTS[:4]) + '\n{"text": "oops"\n',
        "not_objects": '{"text": "a"}\n[1, 2]\n',
        "wrong_columns": rows(sentence=TEXTS),
        "pc": rows(prompt=[p for p, _ in PAIRS] * 2, completion=[c for _, c in PAIRS] * 2),
        "pc_long_prompts": rows(prompt=[" ".join(WORDS[:40])] * 4, completion=["cat"] * 4),
        "context": rows(
            prompt=[p for p, _ in PAIRS] * 2,
            completion=[c for _, c in PAIRS] * 2,
            context=["the answer is short"] * 8,
        ),
        "prompts": rows(prompt=["the cat", "a dog ran", "one plus two"]),
        "questions": rows(question=["the cat sat on", "one plus two", "a dog"]),
        "empty_list": "[]",
    }
    for name, text in files.items():
        suffix = "json" if name == "empty_list" else "jsonl"
        (root / f"{name}.{suffix}").write_text(text)
        paths[name] = str(root / f"{name}.{suffix}")
    (root / "system.txt").write_text("Answer in one word.\n")
    (root / "system_empty.txt").write_text("  \n")
    paths["system"], paths["system_empty"] = str(root / "system.txt"), str(root / "system_empty.txt")
    yamls = {
        "unknown_key": f"dataset_name: {paths['data']}\nkd_los: forward_kl\n",
        "temperature_list": f"dataset_name: {paths['data']}\ntemperature: [1, 2]\n",
        "kd_weight_string": f"dataset_name: {paths['data']}\nkd_weight: high\n",
        "syntax_error": f"dataset_name: {paths['data']}\ntemperature: [1, 2\nkd_weight: 1\n",
        "not_mapping": "- dataset_name\n- temperature\n",
        "yaml_false": f"dataset_name: {paths['data']}\nsave_strategy: no\n",  # YAML 1.1 reads `no` as false
        "mixture_negative": mixture(paths, -0.5, 0.5),
        "mixture_zero": mixture(paths, 0.0, 0.0),
        "mixture_nan": mixture(paths, ".nan", 0.5),
        "mixture_string": mixture(paths, "half", 0.5),
        "mixture_columns": mixture(paths, 0.5, 0.5, second="data"),
        "mixture_no_fraction": mixture(paths, None, 0.5),
        "chain_syntax": "output_dir: x\nstages:\n  - {name: a, student_num_layers: 1\n",
        "chain_missing_model": chain(paths, "/no/student2", paths["data"]),
        "chain_missing_data": chain(paths, paths["student"], "./no_stage2.jsonl"),
        "chain_unknown_key": chain(paths, paths["student"], paths["data"], extra="kd_wieght: 1.0"),
    }
    for name, text in yamls.items():
        (root / f"{name}.yaml").write_text(text)
        paths[f"{name}_yaml"] = str(root / f"{name}.yaml")
    imported_logits(root, paths)
    return paths


def mixture(p: dict[str, str], first, second_fraction, second: str = "pc") -> str:
    first_line = "" if first is None else f"    fraction: {first}\n"
    return f"datasets:\n  - path: {p['pc']}\n{first_line}  - path: {p[second]}\n    fraction: {second_fraction}\n"


def chain(p: dict[str, str], stage2_model: str, stage2_data: str, extra: str = "") -> str:
    defaults = '{max_steps: 1, report_to: none, use_cpu: true, per_device_train_batch_size: 2, save_strategy: "no"}'
    return (
        f"teacher_model_name_or_path: {p['teacher']}\ndefaults: {defaults}\nstages:\n"
        f"  - {{name: a, model_name_or_path: {p['student']}, dataset_name: {p['data']}}}\n"
        f"  - {{name: b, model_name_or_path: {stage2_model}, dataset_name: {stage2_data}}}\n"
        + (
            f"  - {{name: c, model_name_or_path: {p['student']}, dataset_name: {p['data']}, {extra}}}\n"
            if extra
            else ""
        )
    )


def imported_logits(root: Path, paths: dict[str, str]) -> None:
    """Axolotl and DistillKit top-k files (built with the tests' writers), good and broken."""
    import yaml
    from datasets import Dataset, load_from_disk
    from test_logit_import import LOSSLESS, axolotl_data, distillkit_file, set_entry

    tok = make_tokenizer()
    work = root / "logits"
    work.mkdir()
    axolotl_data(work, tok)  # writes work/axolotl
    paths["axolotl"] = str(work / "axolotl")
    data = load_from_disk(paths["axolotl"])
    bad = Dataset.from_list([set_entry("target_token_ids", 64)(dict(r)) if i == 2 else r for i, r in enumerate(data)])
    bad.save_to_disk(str(root / "axolotl_out_of_vocab"))
    data.remove_columns("target_logprobs").save_to_disk(str(root / "axolotl_no_logprobs"))
    paths["axolotl_out_of_vocab"], paths["axolotl_no_logprobs"] = (
        str(root / "axolotl_out_of_vocab"),
        str(root / "axolotl_no_logprobs"),
    )
    distillkit_file(work, tok, LOSSLESS)  # writes work/dk
    paths["distillkit"] = str(work / "dk")
    for name, config in {"dk_wrong_d": {**LOSSLESS, "d": 50}, "dk_no_config": None}.items():
        folder = root / name
        folder.mkdir()
        (folder / "data_0.parquet").write_bytes((work / "dk" / "data_0.parquet").read_bytes())
        if config is not None:
            (folder / "compression_config.yaml").write_text(yaml.safe_dump(config))
        paths[name] = str(folder)
    (root / "not_parquet").mkdir()
    (root / "not_parquet" / "data_0.parquet").write_text("not a parquet file")
    paths["not_parquet"] = str(root / "not_parquet")


# ----------------------------------------------------------------------------------------------- API stub
def _chat_reply(text) -> dict:
    return reply(text)


API_REPLIES = {  # mode (first URL path part) -> (status, body, headers)
    "ok": (200, _chat_reply("the cat"), {}),
    "null": (200, _chat_reply(None), {}),
    "empty": (200, reply("", finish_reason="length"), {}),
    "cut": (200, json.dumps(_chat_reply("ok")).encode()[:60], {}),
    "html": (200, b"<html><body><h1>502 Bad Gateway</h1></body></html>", {}),
    "nochoices": (200, {**_chat_reply("ok"), "choices": []}, {}),
    "e500": (500, {"error": {"message": "internal error"}}, {}),
    "e429": (429, {"error": {"message": "rate limited"}}, {"retry-after": "0"}),
    "e401": (401, {"error": {"message": "Incorrect API key provided: sk-se***"}}, {}),
    "e404": (404, {"error": {"message": "The model `m` does not exist.", "code": "model_not_found"}}, {}),
}


class APIStub:
    """A scripted OpenAI-compatible server (tests/openai_stub.py): `http://127.0.0.1:<port>/<mode>/v1` answers every
    request with `API_REPLIES[mode]`; mode `flaky` answers 500 to the first request of each prompt, then `ok`."""

    def __init__(self):
        self.calls = collections.Counter()
        self.server = ScriptedServer(self._answer)
        self.root = self.server.root

    def _answer(self, path: str, body: bytes, headers: dict):
        mode = path.strip("/").split("/")[0]
        self.calls[(mode, body)] += 1
        if mode == "flaky":
            mode = "e500" if self.calls[(mode, body)] == 1 else "ok"
        return API_REPLIES.get(mode, API_REPLIES["e404"])

    def base(self, mode: str) -> str:
        return f"{self.root}/{mode}/v1"

    def close(self) -> None:
        self.server.close()


def cases(p: dict[str, str], api: str) -> list[Case]:
    """Every case but the served (vLLM) ones; `api` is the API stub's root URL."""
    pair = ["--model_name_or_path", p["student"], "--teacher_model_name_or_path", p["teacher"]]
    train = ["train", *pair, *RUN]
    on_data = [*train, "--dataset_name", p["data"]]
    sft = [*train, "--dataset_name", p["pc"]]
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    found: list[Case] = []

    def add(cls: str, name: str, argv: list[str], expected: str, needle: str | None) -> None:
        found.append(Case(cls, name, argv, expected, needle))

    # ----------------------------------------------------------------------------------- numbers
    numbers = [  # (name, flags, needle)
        ("temperature nan", ["--temperature", "nan"], "`temperature` must be a finite number"),
        ("temperature inf", ["--temperature", "inf"], "`temperature` must be a finite number"),
        ("temperature <= 0", ["--temperature", "0"], "`temperature` must be > 0"),
        ("temperature not a number", ["--temperature", "hot"], "--temperature"),
        ("kd_weight nan", ["--kd_weight", "nan"], "`kd_weight` must be a finite number"),
        ("kd_weight inf", ["--kd_weight", "inf"], "`kd_weight` must be a finite number"),
        ("negative kd_weight", ["--kd_weight", "-1"], "`kd_weight` must be >= 0"),
        ("ce_weight inf", ["--ce_weight", "inf"], "`ce_weight` must be a finite number"),
        ("negative ce_weight", ["--ce_weight", "-0.5"], "`ce_weight` must be >= 0"),
        ("kd_weight and ce_weight 0", ["--kd_weight", "0", "--ce_weight", "0"], "both 0"),
        ("ab_alpha inf", ["--kd_loss", "ab_divergence", "--ab_alpha", "inf"], "`ab_alpha` must be a finite number"),
        (
            "ab_alpha, ab_beta 1e6",
            ["--kd_loss", "ab_divergence", "--ab_alpha", "1e6", "--ab_beta", "1e6"],
            "`ab_alpha` must be in [0, 5.0]",
        ),
        ("negative ab_beta", ["--kd_loss", "ab_divergence", "--ab_beta", "-1"], "`ab_beta` must be in"),
        ("beta > 1", ["--kd_loss", "jsd", "--beta", "1.5"], "`beta` must be in [0, 1]"),
        ("beta nan", ["--kd_loss", "jsd", "--beta", "nan"], "`beta` must be a finite number"),
        ("skew_alpha 1", ["--kd_loss", "skew_forward_kl", "--skew_alpha", "1"], "`skew_alpha` must be in [0, 1)"),
        ("taid_t_start 1.5", ["--kd_loss", "taid", "--taid_t_start", "1.5"], "`taid_t_start` must be in [0, 1)"),
        ("akl_mu 0", ["--kd_loss", "akl", "--akl_mu", "0"], "`akl_mu` must be in (0, 1]"),
        ("lmbda 2", ["--lmbda", "2"], "`lmbda` must be in [0, 1]"),
        ("lmbda nan", ["--lmbda", "nan"], "`lmbda` must be a finite number"),
        ("learning_rate nan", ["--learning_rate", "nan"], "`learning_rate` must be a finite number"),
        ("learning_rate inf", ["--learning_rate", "inf"], "`learning_rate` must be a finite number"),
        ("max_grad_norm nan", ["--max_grad_norm", "nan"], "`max_grad_norm` must be a finite number"),
        ("weight_decay inf", ["--weight_decay", "inf"], "`weight_decay` must be a finite number"),
        ("max_new_tokens 0", ["--lmbda", "0.5", "--max_new_tokens", "0"], "`max_new_tokens` must be >= 1"),
        ("max_new_tokens not an int", ["--lmbda", "0.5", "--max_new_tokens", "ten"], "--max_new_tokens"),
        (
            "generation_temperature -1",
            ["--lmbda", "0.5", "--generation_temperature", "-1"],
            "`generation_temperature` must be >= 0",
        ),
        ("hint_weight -1", ["--hint_layers", "uniform", "--hint_weight", "-1"], "`hint_weight` must be >= 0"),
        ("kd_chunk_size 0", ["--kd_chunk_size", "0"], "`kd_chunk_size` must be >= 1"),
        ("teacher_ema_decay 1.5", ["--teacher_ema_decay", "1.5"], "`teacher_ema_decay` must be in (0, 1)"),
        (
            "teacher_api_top_k 0",
            ["--teacher_api_top_k", "0", "--teacher_api_base", down],
            "`teacher_api_top_k` must be >= 1",
        ),
        (
            "cross_tokenizer_top_k 0",
            ["--cross_tokenizer_loss", "uld", "--cross_tokenizer_top_k", "0"],
            "`cross_tokenizer_top_k` must be >= 1",
        ),
        (
            "teacher_weights negative",
            ["--teacher_model_name_or_path", p["teacher"], p["teacher"], "--teacher_weights", "-1", "1"],
            "`teacher_weights` must be >= 0",
        ),
        ("vllm_sync_steps 0", ["--vllm_sync_steps", "0"], "`vllm_sync_steps` must be >= 1"),
    ]
    for name, flags, needle in numbers:
        add("numbers", name, [*on_data, *flags], "error", needle)
    add(
        "numbers",
        "temperature: [1, 2] in --config",
        ["train", "--config", p["temperature_list_yaml"], *pair, *RUN],
        "error",
        "`temperature` must be a number, got [1, 2]",
    )
    add(
        "numbers",
        "kd_weight: high in --config",
        ["train", "--config", p["kd_weight_string_yaml"], *pair, *RUN],
        "error",
        "kd_weight",
    )

    # ----------------------------------------------------------------------------------- ignored settings
    warned = [  # (name, flags, needle): set, but without what makes them apply
        ("beta without jsd", ["--beta", "0.2"], "`beta` (0.2) has no effect without kd_loss: jsd"),
        ("skew_alpha without skew loss", ["--skew_alpha", "0.3"], "`skew_alpha` (0.3) has no effect"),
        ("ab_alpha without ab_divergence", ["--ab_alpha", "0.5"], "`ab_alpha` (0.5) has no effect"),
        ("akl_mu without akl", ["--akl_mu", "0.7"], "`akl_mu` (0.7) has no effect"),
        ("taid_alpha without taid", ["--taid_alpha", "0.2"], "`taid_alpha` (0.2) has no effect"),
        (
            "hint_weight without hint_layers",
            ["--hint_weight", "3"],
            "`hint_weight` (3.0) has no effect without hint_layers",
        ),
        (
            "hint_projector without hint_layers",
            ["--hint_projector", "identity"],
            "`hint_projector` ('identity') has no effect",
        ),
        ("relation_weight without relation_loss", ["--relation_weight", "2"], "`relation_weight` (2.0) has no effect"),
        (
            "max_new_tokens without on-policy",
            ["--max_new_tokens", "8"],
            "`max_new_tokens` (8) has no effect without lmbda > 0",
        ),
        (
            "generation_temperature without on-policy",
            ["--generation_temperature", "0.5"],
            "`generation_temperature` (0.5) has no effect",
        ),
        (
            "teacher_api_top_k without a served teacher",
            ["--teacher_api_top_k", "5"],
            "`teacher_api_top_k` (5) has no effect",
        ),
        (
            "early_exit_weight without layers",
            ["--early_exit_weight", "0.5"],
            "`early_exit_weight` (0.5) has no effect",
        ),
    ]
    for name, flags, needle in warned:
        add("ignored settings", name, [*on_data, *flags], "warns", needle)
    refused = [
        (
            "group size without a quantization scheme",
            ["--student_quantization_group_size", "7"],
            "only applies to a quantized student",
        ),
        (
            "max_steps 0, num_train_epochs 0",
            ["--max_steps", "0", "--num_train_epochs", "0"],
            "Nothing would be trained",
        ),
        (
            "teacher_tokenizer without cross_tokenizer_loss",
            ["--teacher_tokenizer_name_or_path", p["bpe_tok"]],
            "only read for a teacher with another tokenizer",
        ),
        (
            "log_completions without on-policy",
            ["--log_completions", "true"],
            "`log_completions` writes the on-policy samples",
        ),
        (
            "teacher_weights, one teacher",
            ["--teacher_weights", "1.0"],
            "`teacher_weights` ([1.0]) weighs several teachers",
        ),
        (
            "context template without a context column",
            ["--teacher_context_template", "{prompt} {context}"],
            "never read",
        ),
    ]
    for name, flags, needle in refused:
        add("ignored settings", name, [*on_data, *flags], "error", needle)
    add(
        "ignored settings",
        "cache-teacher value_bits without compact",
        [
            "cache-teacher",
            "--teacher",
            p["teacher"],
            "--dataset",
            p["pc"],
            "--output_dir",
            OUT,
            "--value_bits",
            "3",
            "--use_cpu",
            "true",
        ],
        "error",
        "--compression compact",
    )

    # ----------------------------------------------------------------------------------- API teacher replies
    def api_case(mode: str, *extra: str) -> list[str]:
        argv = ["cache-teacher", "--teacher", "m", "--dataset", p["prompts"], "--output_dir", OUT]
        base = f"{api}/{mode}/v1" if mode in API_REPLIES or mode == "flaky" else mode  # else: a URL as it is
        return [
            *argv,
            "--teacher_api_base",
            base,
            "--generate",
            "--max_new_tokens",
            "4",
            "--teacher_api_max_retries",
            "1",
            *extra,
        ]

    add("API teacher", "healthy API teacher", api_case("ok"), "works", None)
    add("API teacher", "500 once, then healthy", api_case("flaky"), "works", None)
    for mode, what, needle in [
        ("null", "content null", "null"),
        ("empty", "empty content, cut at the length limit", "empty"),
        ("cut", "cut JSON", "not JSON"),
        ("html", "HTML page", "not JSON"),
        ("nochoices", "choices []", "no choices"),
        ("e500", "HTTP 500", "500"),
        ("e429", "HTTP 429", "429"),
        ("e401", "HTTP 401 (bad key)", "401"),
        ("e404", "HTTP 404 (unknown model)", "404"),
    ]:
        add("API teacher", what, api_case(mode), "error", needle)
    add("API teacher", "server refused", api_case(f"{down}/v1"), "error", down)
    add(
        "API teacher",
        "without --generate",
        [arg for arg in api_case("ok") if arg != "--generate"],
        "error",
        "Add --generate",
    )
    add("API teacher", "URL without http://", api_case("127.0.0.1:1/v1"), "error", "http")
    add(
        "API teacher",
        "key variable unset",
        api_case("ok", "--teacher_api_key_env", "NO_SUCH_KEY_VAR"),
        "error",
        "NO_SUCH_KEY_VAR",
    )
    add("API teacher", "max_concurrency 0", api_case("ok", "--max_concurrency", "0"), "error", "max_concurrency")

    # ----------------------------------------------------------------------------------- paths
    add(
        "paths",
        "dataset file missing",
        [*train, "--dataset_name", "/nonexistent/data.jsonl"],
        "error",
        "/nonexistent/data.jsonl",
    )
    add(
        "paths",
        "relative dataset file missing",
        [*train, "--dataset_name", "x.jsonl"],
        "error",
        "--dataset_name not found: x.jsonl",
    )
    add("paths", "eval dataset file missing", [*on_data, "--eval_dataset_name", "./eval.jsonl"], "error", "eval.jsonl")
    add(
        "paths",
        "student folder missing",
        [
            "train",
            "--model_name_or_path",
            "/no/student",
            "--teacher_model_name_or_path",
            p["teacher"],
            *RUN,
            "--dataset_name",
            p["data"],
        ],
        "error",
        "--model_name_or_path not found: /no/student",
    )
    add(
        "paths",
        "relative student folder missing",
        [
            "train",
            "--model_name_or_path",
            "./no_student",
            "--teacher_model_name_or_path",
            p["teacher"],
            *RUN,
            "--dataset_name",
            p["data"],
        ],
        "error",
        "--model_name_or_path not found: ./no_student",
    )
    add(
        "paths",
        "teacher folder missing",
        [*on_data, "--teacher_model_name_or_path", "/no/t"],
        "error",
        "--teacher_model_name_or_path not found: /no/t",
    )
    add("paths", "tokenizer folder missing", [*on_data, "--tokenizer_name_or_path", "/no/tok"], "error", "/no/tok")
    add(
        "paths",
        "teacher tokenizer folder missing",
        [
            *on_data,
            "--teacher_model_name_or_path",
            p["bpe_teacher_padded"],
            "--cross_tokenizer_loss",
            "uld",
            "--teacher_tokenizer_name_or_path",
            "/no/teacher_tok",
        ],
        "error",
        "/no/teacher_tok",
    )
    add(
        "paths",
        "teacher_cache folder missing",
        [
            "train",
            "--model_name_or_path",
            p["student"],
            *RUN,
            "--dataset_name",
            p["data"],
            "--teacher_cache",
            "/no/cache",
        ],
        "error",
        "/no/cache",
    )
    add(
        "paths",
        "resume from a missing checkpoint",
        [*on_data, "--resume_from_checkpoint", "/no/checkpoint-2"],
        "error",
        "/no/checkpoint-2",
    )
    add(
        "paths",
        "config file missing",
        ["train", "--config", "/nonexistent.yaml", *pair, *RUN],
        "error",
        "/nonexistent.yaml",
    )
    add(
        "paths",
        "chain config missing",
        ["chain", "--config", "/no/chain.yaml", "--output_dir", OUT],
        "error",
        "/no/chain.yaml",
    )
    add(
        "paths",
        "chain stage 2 student missing",
        ["chain", "--config", p["chain_missing_model_yaml"], "--output_dir", OUT],
        "error",
        "Chain stage 2 of 2",
    )
    add(
        "paths",
        "chain stage 2 dataset missing",
        ["chain", "--config", p["chain_missing_data_yaml"], "--output_dir", OUT],
        "error",
        "no_stage2.jsonl",
    )
    add(
        "paths",
        "export --model missing",
        ["export", "--model", "/no/model", "--output", f"{OUT}/m.gguf"],
        "error",
        "/no/model",
    )
    add(
        "paths",
        "cache-teacher --teacher missing",
        ["cache-teacher", "--teacher", "/no/teacher", "--dataset", p["pc"], "--output_dir", OUT],
        "error",
        "/no/teacher",
    )
    add(
        "paths",
        "cache-teacher dataset missing",
        ["cache-teacher", "--teacher", p["teacher"], "--dataset", "./missing.jsonl", "--output_dir", OUT],
        "error",
        "missing.jsonl",
    )
    add(
        "paths",
        "teacher_system_prompt file missing",
        [*train, "--dataset_name", p["pc"], "--teacher_system_prompt", "./prompts/system.txt"],
        "error",
        "./prompts/system.txt",
    )

    # ----------------------------------------------------------------------------------- cross-tokenizer
    cross = [*train, "--dataset_name", p["pc"], "--cross_tokenizer_loss"]
    add(
        "cross-tokenizer",
        "padded teacher embedding (384 rows, 330 tokens), uld",
        [*cross, "uld", "--teacher_model_name_or_path", p["bpe_teacher_padded"]],
        "works",
        None,
    )
    add(
        "cross-tokenizer",
        "padded teacher embedding, gold",
        [*cross, "gold", "--teacher_model_name_or_path", p["bpe_teacher_padded"]],
        "works",
        None,
    )
    add(
        "cross-tokenizer",
        "tokenizer longer than the teacher's embedding",
        [*cross, "uld", "--teacher_model_name_or_path", p["bpe_teacher_short"]],
        "error",
        "only 300 rows",
    )
    add(
        "cross-tokenizer",
        "teacher tokenizer not the teacher's own",
        [
            *cross,
            "uld",
            "--teacher_model_name_or_path",
            p["bpe_teacher_padded"],
            "--teacher_tokenizer_name_or_path",
            p["bpe_tok_other"],
        ],
        "error",
        "not the one saved with the teacher",
    )
    add(
        "cross-tokenizer",
        "other tokenizer without cross_tokenizer_loss",
        [*train, "--dataset_name", p["pc"], "--teacher_model_name_or_path", p["bpe_teacher_padded"]],
        "error",
        "tokenizers differ",
    )
    add(
        "cross-tokenizer",
        "gold with kd_loss taid",
        [*cross, "gold", "--kd_loss", "taid", "--teacher_model_name_or_path", p["bpe_teacher_padded"]],
        "error",
        "forward_kl, reverse_kl or jsd",
    )
    add(
        "cross-tokenizer",
        "cross_tokenizer_loss with on-policy",
        [*cross, "uld", "--lmbda", "0.5", "--teacher_model_name_or_path", p["bpe_teacher_padded"]],
        "error",
        "on-policy",
    )
    add(
        "cross-tokenizer",
        "cross_tokenizer_loss with hints",
        [*cross, "uld", "--hint_layers", "uniform", "--teacher_model_name_or_path", p["bpe_teacher_padded"]],
        "error",
        "output distributions only",
    )
    add(
        "cross-tokenizer",
        "cross_tokenizer_loss not a choice",
        [*cross, "dtw", "--teacher_model_name_or_path", p["bpe_teacher_padded"]],
        "error",
        "cross_tokenizer_loss",
    )

    # ----------------------------------------------------------------------------------- data
    add("data", "empty JSONL", [*train, "--dataset_name", p["empty"]], "error", "is empty")
    add("data", "blank-lines JSONL", [*train, "--dataset_name", p["blank"]], "error", "empty")
    add("data", "empty JSON list", [*train, "--dataset_name", p["empty_list"]], "error", "no rows")
    add("data", "malformed JSONL line", [*train, "--dataset_name", p["malformed"]], "error", "line 5: not valid JSON")
    add("data", "JSONL line not an object", [*train, "--dataset_name", p["not_objects"]], "error", "line 2")
    add("data", "dataset without text column", [*train, "--dataset_name", p["wrong_columns"]], "error", "columns")
    add(
        "data",
        "every prompt longer than max_length",
        [*train, "--dataset_name", p["pc_long_prompts"], "--max_length", "16"],
        "error",
        "rows were dropped",
    )
    add(
        "data",
        "rename_columns of a missing column",
        [*on_data, "--rename_columns", '{"nope": "text"}'],
        "error",
        "rename_columns",
    )
    add(
        "data",
        "rows beyond max_position_embeddings",
        [*train, "--dataset_name", p["long"], "--max_length", "4096"],
        "warns",
        "max_position_embeddings (128)",
    )
    add(
        "data",
        "YAML syntax error in --config",
        ["train", "--config", p["syntax_error_yaml"], *pair, *RUN],
        "error",
        "line 3",
    )
    add(
        "data",
        "--config not a mapping",
        ["train", "--config", p["not_mapping_yaml"], *pair, *RUN],
        "error",
        "not_mapping.yaml",
    )
    add(
        "data",
        "save_strategy: no (YAML false) in --config",
        ["train", "--config", p["yaml_false_yaml"], *pair, *RUN[:-6], "--logging_steps", "1"],
        "error",
        "please select one of ['no'",
    )
    add("data", "unknown YAML key", ["train", "--config", p["unknown_key_yaml"], *pair, *RUN], "error", "kd_los")
    add(
        "data",
        "YAML syntax error in chain --config",
        ["chain", "--config", p["chain_syntax_yaml"], "--output_dir", OUT],
        "error",
        "chain_syntax.yaml",
    )
    add(
        "data",
        "unknown key in chain stage 3",
        ["chain", "--config", p["chain_unknown_key_yaml"], "--output_dir", OUT],
        "error",
        "kd_wieght",
    )
    for name, needle in [
        ("negative", "fraction"),
        ("zero", "fraction"),
        ("nan", "fraction"),
        ("string", "fraction"),
        ("no_fraction", "`fraction` must be set for every dataset"),
        ("columns", "different columns"),
    ]:
        add(
            "data",
            f"mixture: {name.replace('_', ' ')} fraction" if name != "columns" else "mixture: other columns",
            ["train", "--config", p[f"mixture_{name}_yaml"], *pair, *RUN],
            "error",
            needle,
        )
    add(
        "data",
        "mixture and dataset_name together",
        ["train", "--config", p["mixture_zero_yaml"], *pair, *RUN, "--dataset_name", p["data"]],
        "error",
        "dataset_name",
    )

    # ----------------------------------------------------------------------------------- export
    gguf = ["--output", f"{OUT}/m.gguf"]
    add("export", "f16 export", ["export", "--model", p["export_ok"], *gguf], "works", None)
    add(
        "export",
        "q4_0 with a width 32 does not divide",
        ["export", "--model", p["export_narrow"], "--quant", "q4_0", *gguf],
        "error",
        "--allow_fallback",
    )
    add(
        "export",
        "q8_0 with a width 32 does not divide",
        ["export", "--model", p["export_narrow"], "--quant", "q8_0", *gguf],
        "error",
        "--allow_fallback",
    )
    add(
        "export",
        "q4_0 narrow with --allow_fallback",
        ["export", "--model", p["export_narrow"], "--quant", "q4_0", "--allow_fallback", *gguf],
        "warns",
        "--allow_fallback",
    )
    add(
        "export",
        "folder without tokenizer files",
        ["export", "--model", p["export_no_tok"], *gguf],
        "error",
        "No tokenizer in",
    )
    add(
        "export",
        "quant not a choice",
        ["export", "--model", p["export_ok"], "--quant", "q2_k", *gguf],
        "error",
        "invalid choice",
    )
    add("export", "T5 model", ["export", "--model", p["t5"], *gguf], "error", "LlamaForCausalLM")
    add(
        "export",
        "word-level tokenizer",
        ["export", "--model", p["export_wordlevel"], *gguf],
        "error",
        "byte-level BPE",
    )

    # ----------------------------------------------------------------------------------- bf16
    add(
        "bf16",
        "--dtype bfloat16 student",
        [*on_data, "--dtype", "bfloat16"],
        "warns",
        "trainable student weights are bfloat16",
    )
    add("bf16", "--bf16 true (fp32 master weights)", [*on_data, "--bf16", "true"], "works", None)
    add("bf16", "--dtype not a dtype", [*on_data, "--dtype", "float33"], "error", "float33")

    # ----------------------------------------------------------------------------------- draft evaluate
    draft = ["draft", "evaluate", "--target", p["student"], "--dataset", p["questions"], "--max_new_tokens", "4"]
    add(
        "draft evaluate",
        "draft evaluate",
        [*draft, "--draft", p["teacher"], "--prompt_column", "question", "--output", f"{OUT}/d.json"],
        "works",
        None,
    )
    add(
        "draft evaluate",
        "draft missing",
        [*draft, "--draft", "/no/draft", "--prompt_column", "question"],
        "error",
        "/no/draft",
    )
    add(
        "draft evaluate",
        "target missing",
        [
            "draft",
            "evaluate",
            "--target",
            "./no_target",
            "--draft",
            p["teacher"],
            "--dataset",
            p["questions"],
            "--prompt_column",
            "question",
        ],
        "error",
        "no_target",
    )
    add(
        "draft evaluate",
        "bad prompt column",
        [*draft, "--draft", p["teacher"], "--prompt_column", "prompt"],
        "error",
        "no column 'prompt'",
    )
    add(
        "draft evaluate",
        "no prompt column or template",
        [*draft, "--draft", p["teacher"]],
        "error",
        "name the prompt column (`prompt_column`, --prompt_column)",
    )
    add(
        "draft evaluate",
        "template naming a missing column",
        [*draft, "--draft", p["teacher"], "--prompt_template", "{premise}"],
        "error",
        "premise",
    )
    add(
        "draft evaluate",
        "draft with another vocabulary (universal assisted generation)",
        [*draft, "--draft", p["draft_other_vocab"], "--prompt_column", "question"],
        "works",
        None,
    )
    add(
        "draft evaluate",
        "draft embedding smaller than its tokenizer",
        [*draft, "--draft", p["draft_small_vocab"], "--prompt_column", "question"],
        "error",
        "only 40 rows",
    )
    add(
        "draft evaluate",
        "dataset missing",
        [
            "draft",
            "evaluate",
            "--target",
            p["student"],
            "--draft",
            p["teacher"],
            "--dataset",
            "./nope.jsonl",
            "--prompt_column",
            "question",
        ],
        "error",
        "nope.jsonl",
    )
    add(
        "draft evaluate",
        "max_new_tokens 0",
        [*draft[:-2], "--max_new_tokens", "0", "--draft", p["teacher"], "--prompt_column", "question"],
        "error",
        "max_new_tokens",
    )
    add(
        "draft evaluate",
        "num_assistant_tokens 0",
        [*draft, "--draft", p["teacher"], "--prompt_column", "question", "--num_assistant_tokens", "0"],
        "error",
        "num_assistant_tokens",
    )

    # ----------------------------------------------------------------------------------- context distillation
    self_ctx = ["train", "--model_name_or_path", p["student"], "--teacher_model_name_or_path", "self", *RUN]
    add(
        "context distillation",
        "self teacher with a system prompt file",
        [*self_ctx, "--dataset_name", p["pc"], "--teacher_system_prompt", p["system"]],
        "works",
        None,
    )
    add(
        "context distillation",
        "context column",
        [*sft[:-2], "--dataset_name", p["context"], "--teacher_context_column", "context"],
        "works",
        None,
    )
    add(
        "context distillation",
        "missing context column",
        [*sft, "--teacher_context_column", "demos"],
        "error",
        "'demos'",
    )
    add(
        "context distillation",
        "self teacher, kd_weight 0",
        [*self_ctx, "--dataset_name", p["pc"], "--teacher_system_prompt", p["system"], "--kd_weight", "0"],
        "error",
        "kd_weight",
    )
    add(
        "context distillation",
        "self teacher with a teacher_cache",
        [
            "train",
            "--model_name_or_path",
            p["student"],
            *RUN,
            "--dataset_name",
            p["pc"],
            "--teacher_model_name_or_path",
            "self",
            "--teacher_cache",
            p["teacher"],
        ],
        "error",
        "teacher_cache",
    )
    add(
        "context distillation",
        "self in a list of teachers",
        [*self_ctx[:4], "self", p["teacher"], *RUN, "--dataset_name", p["pc"]],
        "error",
        "not in a list",
    )
    add(
        "context distillation",
        "self with cross_tokenizer_loss",
        [*self_ctx, "--dataset_name", p["pc"], "--cross_tokenizer_loss", "uld"],
        "error",
        "cross_tokenizer_loss",
    )
    add(
        "context distillation",
        "empty system prompt file",
        [*sft, "--teacher_system_prompt", p["system_empty"]],
        "error",
        "is empty",
    )
    add(
        "context distillation",
        "template without {context}",
        [
            *sft[:-2],
            "--dataset_name",
            p["context"],
            "--teacher_context_column",
            "context",
            "--teacher_context_template",
            "{prompt}",
        ],
        "error",
        "exactly once",
    )
    add(
        "context distillation",
        "context with seq_kd",
        [*sft, "--teacher_system_prompt", p["system"], "--seq_kd", "true"],
        "error",
        "seq_kd",
    )
    add(
        "context distillation",
        "context with hints",
        [*sft, "--teacher_system_prompt", p["system"], "--hint_layers", "uniform"],
        "error",
        "hint_layers",
    )
    add(
        "context distillation",
        "system prompt without a teacher",
        [
            "train",
            "--model_name_or_path",
            p["student"],
            *RUN,
            "--dataset_name",
            p["pc"],
            "--teacher_system_prompt",
            p["system"],
        ],
        "error",
        "teacher",
    )

    # ----------------------------------------------------------------------------------- cache-teacher
    cache = ["cache-teacher", "--output_dir", OUT, "--use_cpu", "true"]
    local = [*cache, "--teacher", p["teacher"], "--dataset", p["pc"]]
    imp = [*cache, "--tokenizer", p["student_tok"], "--vocab_size", "64", "--import"]
    add("cache-teacher", "cache a teacher", [*local, "--k", "4"], "works", None)
    add("cache-teacher", "k 0", [*local, "--k", "0"], "error", "k")
    add("cache-teacher", "batch_size 0", [*local, "--batch_size", "0"], "error", "batch_size")
    add("cache-teacher", "rows_per_shard 0", [*local, "--rows_per_shard", "0"], "error", "rows_per_shard")
    add(
        "cache-teacher",
        "value_bits 17 with compact",
        [*local, "--compression", "compact", "--value_bits", "17"],
        "error",
        "`value_bits` must be between 1 and 16",
    )
    add("cache-teacher", "no teacher and no import", [*cache, "--dataset", p["pc"]], "error", "--teacher")
    add("cache-teacher", "import axolotl", [*imp, "axolotl", "--dataset", p["axolotl"]], "works", None)
    add(
        "cache-teacher",
        "import axolotl without --tokenizer",
        ["cache-teacher", "--import", "axolotl", "--dataset", p["axolotl"], "--output_dir", OUT],
        "error",
        "give --tokenizer",
    )
    add(
        "cache-teacher",
        "import axolotl, id outside the vocabulary",
        [*imp, "axolotl", "--dataset", p["axolotl_out_of_vocab"]],
        "error",
        "Row 2",
    )
    add(
        "cache-teacher",
        "import axolotl without target_logprobs",
        [*imp, "axolotl", "--dataset", p["axolotl_no_logprobs"]],
        "error",
        "target_logprobs",
    )
    add(
        "cache-teacher",
        "import axolotl, k above the file's",
        [*imp, "axolotl", "--dataset", p["axolotl"], "--k", "9"],
        "error",
        "stores 8 entries",
    )
    add("cache-teacher", "import distillkit", [*imp, "distillkit", "--dataset", p["distillkit"]], "works", None)
    add(
        "cache-teacher",
        "import distillkit without compression_config.yaml",
        [*imp, "distillkit", "--dataset", p["dk_no_config"]],
        "error",
        "No compression_config.yaml",
    )
    add(
        "cache-teacher",
        "import distillkit, another vocabulary",
        [*imp, "distillkit", "--dataset", p["dk_wrong_d"]],
        "error",
        "vocabulary of 50 ids",
    )
    add(
        "cache-teacher",
        "import distillkit, not parquet",
        [*imp, "distillkit", "--dataset", p["not_parquet"]],
        "error",
        "not_parquet",
    )
    add(
        "cache-teacher",
        "import of a missing folder",
        [*imp, "axolotl", "--dataset", "/no/axolotl"],
        "error",
        "/no/axolotl",
    )
    add(
        "cache-teacher",
        "import format not a choice",
        [*imp, "trl", "--dataset", p["axolotl"]],
        "error",
        "invalid choice",
    )

    # ----------------------------------------------------------------------------------- training faults
    add("training faults", "plain run", on_data, "works", None)
    add("training faults", "kd_loss not a choice", [*on_data, "--kd_loss", "kl"], "error", "invalid choice")
    add(
        "training faults",
        "T5 teacher, causal student",
        [*on_data, "--teacher_model_name_or_path", p["t5"]],
        "error",
        "holds a t5 model",
    )
    add(
        "training faults",
        "teacher with another tokenizer",
        [*on_data, "--teacher_model_name_or_path", p["other_tok_teacher"]],
        "error",
        "tokenizers differ",
    )
    add(
        "training faults",
        "hint layer out of range",
        [*on_data, "--hint_layers", '{"1": 9}'],
        "error",
        "teacher layers",
    )
    add(
        "training faults",
        "identity projector, unequal widths",
        [*on_data, "--hint_layers", "uniform", "--hint_projector", "identity"],
        "error",
        "widths",
    )
    add(
        "training faults",
        "relation loss with batch 1",
        [*on_data, "--relation_loss", "similarity_preserving", "--per_device_train_batch_size", "1"],
        "error",
        "batch size >= 2",
    )
    add(
        "training faults",
        "NaN teacher",
        [*on_data, "--teacher_model_name_or_path", p["nan_teacher"]],
        "error",
        "Non-finite teacher outputs",
    )
    add(
        "training faults",
        "NaN teacher, nonfinite_teacher=skip",
        [*on_data, "--teacher_model_name_or_path", p["nan_teacher"], "--nonfinite_teacher", "skip"],
        "warns",
        "Skipped a micro-batch",
    )
    add("training faults", "unknown subcommand", ["trian"], "error", "unknown command")
    return found


def served_cases(p: dict[str, str], url: str, model: str) -> list[Case]:
    """Cases against the real tiny vLLM server at `url` (serving `model`, --max-logprobs 20, no LoRA, no dev mode)."""
    down = f"http://127.0.0.1:{free_port()}"
    served = ["train", "--model_name_or_path", p["student_served"], *RUN, "--dataset_name", p["pc"]]
    api = ["--teacher_api_base", url, "--teacher_api_model", model]
    onpolicy = ["train", "--model_name_or_path", p["served"], "--teacher_model_name_or_path", p["served"], *RUN]
    onpolicy += ["--dataset_name", p["pc"], "--lmbda", "1", "--max_new_tokens", "4", "--use_vllm", "true"]
    return [
        Case("served teacher", "served teacher", [*served, *api, "--teacher_api_top_k", "8"], "works", None),
        Case(
            "served teacher",
            "served teacher with another tokenizer",
            ["train", "--model_name_or_path", p["other_tok_student"], *RUN, "--dataset_name", p["pc"], *api],
            "error",
            "tokenizes text differently",
        ),
        Case(
            "served teacher",
            "served teacher down",
            [*served, "--teacher_api_base", down, "--teacher_api_model", model, "--teacher_api_max_retries", "1"],
            "error",
            down.split("//")[1],
        ),
        Case(
            "served teacher",
            "teacher_api_top_k above the server's max-logprobs (20)",
            [*served, *api, "--teacher_api_top_k", "30"],
            "error",
            "greater than max allowed: 20",
        ),
        Case(
            "served teacher",
            "teacher_api_top_k above the vocabulary",
            [*served, *api, "--teacher_api_top_k", "100"],
            "error",
            "vocab_size=64",
        ),
        Case(
            "served teacher",
            "served teacher, unknown model name",
            [
                *served,
                "--teacher_api_base",
                url,
                "--teacher_api_model",
                "no-such-model",
                "--teacher_api_max_retries",
                "1",
            ],
            "error",
            "no-such-model",
        ),
        Case(
            "served teacher",
            "served teacher with hints",
            [*served, *api, "--hint_layers", "uniform"],
            "error",
            "hidden states",
        ),
        Case(
            "served teacher",
            "served teacher with kd_loss taid (sparse form)",
            [*served, *api, "--kd_loss", "taid"],
            "works",
            None,
        ),
        Case(
            "served teacher",
            "served teacher and a local teacher",
            [*served, *api, "--teacher_model_name_or_path", p["teacher"]],
            "error",
            "replaces",
        ),
        Case(
            "served teacher",
            "cache-teacher from the server",
            [
                "cache-teacher",
                "--teacher_api_base",
                url,
                "--teacher_api_model",
                model,
                "--tokenizer",
                p["served_tok"],
                "--dataset",
                p["pc"],
                "--output_dir",
                OUT,
                "--k",
                "4",
            ],
            "works",
            None,
        ),
        Case("vLLM on-policy", "vllm_mode colocate", [*onpolicy, "--vllm_mode", "colocate"], "error", "colocate"),
        Case(
            "vLLM on-policy",
            "vLLM server down",
            [*onpolicy, "--vllm_server_base_url", down, "--vllm_max_retries", "1"],
            "error",
            down.split("//")[1],
        ),
        Case(
            "vLLM on-policy",
            "use_vllm without lmbda",
            [*onpolicy, "--lmbda", "0", "--vllm_server_base_url", url],
            "error",
            "set `lmbda` > 0",
        ),
        Case("vLLM on-policy", "use_vllm without a server URL", onpolicy, "error", "vllm_server_base_url"),
        Case(
            "vLLM on-policy",
            "full-parameter student, server not in dev mode",
            [*onpolicy, "--vllm_server_base_url", url],
            "error",
            "VLLM_SERVER_DEV_MODE=1",
        ),
    ]


def run_cli(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = launcher_env()
    env.pop("HF_DISTILL_DEBUG", None)
    cmd = [sys.executable, "-m", "hf_distill.cli.main", *argv]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def finite_weights(folder: Path) -> bool | None:
    path = folder / "model.safetensors"
    return all(torch.isfinite(v).all() for v in load_file(path).values()) if path.exists() else None


def classify(proc: subprocess.CompletedProcess, expected: str, needle: str | None, out: Path) -> str:
    stderr = proc.stderr + proc.stdout
    if "Traceback (most recent call last)" in proc.stderr:
        return "RAW TRACEBACK"
    if proc.returncode != 0:
        if expected != "error":
            return "FAILED"
        return "clear error" if needle is None or needle in stderr else "error without the expected message"
    if expected == "error" or finite_weights(out) is False:
        return "SILENT WRONG"
    if expected == "warns":
        return "warns" if needle in stderr else "SILENT WRONG (no warning)"
    return "works"


def kill_and_resume(p: dict[str, str], root: Path, name: str, extra: list[str]) -> dict:
    """SIGKILL a 4-step run as soon as checkpoint-2 is complete, resume it, compare with the uninterrupted run."""
    args = ["train", "--model_name_or_path", p["student"], "--teacher_model_name_or_path", p["teacher"]]
    args += ["--dataset_name", p["data"], "--report_to", "none", "--use_cpu", "true", "--seed", "0"]
    args += ["--per_device_train_batch_size", "2", "--max_steps", "4", "--save_steps", "2", *extra]
    full, killed = root / f"{name}_full", root / f"{name}_killed"
    run_cli([*args, "--output_dir", str(full)], root).check_returncode()
    env = launcher_env()
    cmd = [sys.executable, "-m", "hf_distill.cli.main", *args, "--output_dir", str(killed)]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "checkpoint-2" / "trainer_state.json"  # written last in a checkpoint
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    was_running = proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = run_cli(
        [*args, "--output_dir", str(killed), "--resume_from_checkpoint", str(killed / "checkpoint-2")], root
    )
    a, b = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    exact = resumed.returncode == 0 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    max_diff = max((a[k] - b[k]).abs().max().item() for k in a) if a.keys() == b.keys() else float("inf")
    outcome = "exact resume" if exact else ("not killed mid-run" if not was_running else "RESUME DIFFERS")
    return {"case": f"kill + resume: {name}", "outcome": outcome, "max_weight_diff": max_diff}


def run_case(index: int, case: Case, root: Path) -> dict:
    out = root / f"out{index}"
    argv = [arg.replace(OUT, str(out)) for arg in case.argv]
    argv = [*argv, "--output_dir", str(out)] if argv[0] == "train" else argv
    start = time.time()
    try:
        proc = run_cli(argv, root)
    except subprocess.TimeoutExpired:
        outcome, code, last = "HUNG", None, "(no answer within the time limit)"
    else:
        outcome, code = classify(proc, case.expected, case.needle, out), proc.returncode
        lines = proc.stderr.strip().splitlines() or [""]
        line = next((line for line in lines if "hf-distill " in line and "error:" in line), None)
        if line is None and case.needle:  # a warning: the line that holds it
            line = next((line for line in (proc.stderr + proc.stdout).splitlines() if case.needle in line), None)
        line = lines[-1] if line is None else line
        last = line[line.find("hf-distill ") if "error:" in line else 0 :][:200]  # the message itself
    result = {"class": case.cls, "case": case.name, "expected": case.expected, "outcome": outcome, "exit": code}
    result.update(needle=case.needle, last_line=last, seconds=round(time.time() - start, 1))
    print(f"{case.cls[:20]:<20} {case.name[:44]:<44} {outcome:<24} {last[:100]}", flush=True)
    return result


def run_all(todo: list[Case], root: Path, jobs: int, first: int = 0) -> list[dict]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda item: run_case(first + item[0], item[1], root), enumerate(todo)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--only", default=None, help="Comma-separated classes to run (no kill + resume then).")
    parser.add_argument("--jobs", type=int, default=2, help="Cases run at once (each in its own process).")
    parser.add_argument(
        "--rerun_into",
        default=None,
        help="An earlier full fault_sweep.json: the --only classes run now replace its results of those classes "
        "(recorded under `reruns`); the merged report is written to --out.",
    )
    cli = parser.parse_args()
    only = None if cli.only is None else {c.strip() for c in cli.only.split(",")}
    out_dir = Path(cli.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    start = time.time()
    from vllm_server import VLLMServer, save_tiny_llama

    stub = APIStub()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = lay_out(root)
        paths["served"] = str(root / "served")
        served = [c for c in served_cases(paths, "http://x", "m") if only is None or c.cls in only]
        server = None
        try:
            if served:  # first, on an idle machine, one at a time (a CPU vLLM engine is fragile under load)
                save_tiny_llama(paths["served"], served_tokenizer())
                server = VLLMServer(
                    paths["served"], "tiny-llama", lora=False, max_logprobs=20, log_path=root / "vllm.log"
                )
                try:
                    server.start()
                except RuntimeError as err:
                    print(f"vLLM server failed to start: {err}", flush=True)
                    results += [{"class": c.cls, "case": c.name, "expected": c.expected, "outcome": "NOT RUN"}
                                for c in served]  # fmt: skip
                else:
                    print(f"vLLM server ready in {server.start_seconds:.0f} s", flush=True)
                    todo = served_cases(paths, server.url, server.model)
                    results += run_all([c for c in todo if only is None or c.cls in only], root, jobs=1)
                finally:
                    server.stop()
            todo = [c for c in cases(paths, stub.root) if only is None or c.cls in only]
            results += run_all(todo, root, cli.jobs, first=len(results))
        finally:
            if server is not None:
                server.stop()
            stub.close()
        if only is None or "kill + resume" in only:
            hints = ["--hint_layers", "uniform", "--hint_projector", "linear", "--attention_weight", "1.0"]
            hints += ["--relation_loss", "similarity_preserving"]
            for name, extra in (("plain", []), ("hints + attention + relations", hints)):
                result = {"class": "kill + resume", **kill_and_resume(paths, root, name.split()[0], extra)}
                results.append(result)
                print(
                    f"{result['case']:<64} {result['outcome']:<24} max |w_full - w_resumed| = "
                    f"{result['max_weight_diff']}",
                    flush=True,
                )
    seconds = round(time.time() - start, 1)
    report = {"summary": summarize(results, seconds), "results": results}
    if cli.rerun_into:  # the classes just run replace theirs in an earlier full report
        earlier = json.loads(Path(cli.rerun_into).read_text())
        classes = {r["class"] for r in results}
        merged = [r for r in earlier["results"] if r["class"] not in classes] + results
        order = {c: i for i, c in enumerate(dict.fromkeys(r["class"] for r in earlier["results"]))}
        merged.sort(key=lambda r: order.get(r["class"], len(order)))  # each class where it was (a stable sort)
        reruns = [*earlier["summary"].get("reruns", []), {"classes": sorted(classes), "date": time.strftime(
            "%Y-%m-%d"), "seconds": seconds}]  # fmt: skip
        summary = summarize(merged, earlier["summary"]["seconds"], date=earlier["summary"]["date"])
        report = {"summary": {**summary, "reruns": reruns}, "results": merged}
    print(json.dumps(report["summary"], indent=1))
    (out_dir / "fault_sweep.json").write_text(json.dumps(report, indent=1))


def summarize(results: list[dict], seconds: float, date: str | None = None) -> dict:
    """Counts over `results`: in all and per class; `bad` lists every case that is not a clear error, works, warns
    or an exact resume."""
    good = ("clear error", "works", "warns", "exact resume")
    per_class = {}
    for r in results:
        counts = per_class.setdefault(r["class"], {"cases": 0, **dict.fromkeys(good, 0), "bad": 0})
        counts["cases"] += 1
        counts[r["outcome"] if r["outcome"] in good else "bad"] += 1
    return {
        "date": date or time.strftime("%Y-%m-%d"),
        "cases": len(results),
        "clear_errors": sum(r["outcome"] == "clear error" for r in results),
        "works": sum(r["outcome"] == "works" for r in results),
        "warns": sum(r["outcome"] == "warns" for r in results),
        "exact_resumes": sum(r["outcome"] == "exact resume" for r in results),
        "raw_tracebacks": sum(r["outcome"] == "RAW TRACEBACK" for r in results),
        "silent_wrong": sum(r["outcome"].startswith("SILENT WRONG") for r in results),
        "bad": [f"{r['class']}: {r['case']} ({r['outcome']})" for r in results if r["outcome"] not in good],
        "per_class": per_class,
        "seconds": seconds,
    }


if __name__ == "__main__":
    main()
