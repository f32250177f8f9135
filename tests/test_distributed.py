"""Multi-process runs on CPU (gloo) and the launch recipes.

Tests marked `distributed` start 2 CPU processes with `torchrun --nproc_per_node 2` or `accelerate launch` (scripts in
tests/distributed/); the others check that every recipes/accelerate/*.yaml goes through accelerate's config loader and
launcher argument handling (a dry run: nothing is launched), and that the documented commands name real files.
"""

import itertools
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env, prepare_simple_launcher_cmd_env
from conftest import make_llama, make_tokenizer, run_processes
from safetensors.torch import load_file

from hf_distill.cli.train import make_parser
from hf_distill.sanity import mixed_precision_mismatch


ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "distributed"
ACCELERATE_CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
TRAIN_RECIPES = sorted((ROOT / "recipes").glob("[kc][de]/*.yaml"))
DOCS = [ROOT / "docs" / "multi_gpu.md", ROOT / "README.md"]
KEYS = ("loss", "kd_loss", "ce_loss", "grad_norm")


# ------------------------------------------------------------------------------------------------ launch recipes
EXPECTED = {  # config -> (launcher, processes, mixed precision, launcher env that must be exported)
    "cpu_2proc.yaml": ("multi_gpu", 2, "no", {}),
    "single_gpu.yaml": ("simple", 1, "bf16", {"ACCELERATE_USE_CPU": "False"}),
    "ddp.yaml": ("multi_gpu", 2, "bf16", {}),
    "fsdp2.yaml": (
        "multi_gpu",
        2,
        "bf16",
        {
            "ACCELERATE_USE_FSDP": "true",
            "FSDP_VERSION": "2",
            "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
        },
    ),
    "zero2.yaml": (
        "deepspeed",
        2,
        "bf16",
        {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
    ),
    "zero3.yaml": (
        "deepspeed",
        2,
        "bf16",
        {
            "ACCELERATE_USE_DEEPSPEED": "true",
            "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
            "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true",
        },
    ),
}


def launcher_env(config: Path) -> tuple[str, object, dict[str, str]]:
    """What `accelerate launch --config_file config -m hf_distill.cli.main train ...` would run, without running it."""
    argv = ["--config_file", str(config), "-m", "hf_distill.cli.main", "train", "--config", "recipe.yaml"]
    args, defaults, mp_from_config = _validate_launch_command(launch_command_parser().parse_args(argv))
    if args.use_deepspeed:  # as accelerate's launch_command does before deepspeed_launcher
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        return "deepspeed", args, prepare_deepspeed_cmd_env(args)[1]
    if args.use_fsdp or args.multi_gpu:
        return "multi_gpu", args, prepare_multi_gpu_env(args)
    return "simple", args, prepare_simple_launcher_cmd_env(args)[1]


def test_all_accelerate_configs_present():
    assert sorted(p.name for p in ACCELERATE_CONFIGS) == sorted(EXPECTED)


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_dry_run(config):
    loaded = load_config_from_file(str(config))  # accelerate's loader: unknown keys raise
    launcher, processes, precision, env_expected = EXPECTED[config.name]
    assert loaded.num_processes == processes and loaded.mixed_precision == precision
    kind, args, env = launcher_env(config)
    assert kind == launcher and args.num_processes == processes
    assert env["ACCELERATE_MIXED_PRECISION"] == precision
    assert env_expected.items() <= env.items()


def test_fsdp2_config_builds_accelerates_plugin(monkeypatch):
    _, _, env = launcher_env(ROOT / "recipes/accelerate/fsdp2.yaml")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.cpu_ram_efficient_loading
    plugin.set_auto_wrap_policy(make_llama(2, 32))  # finds LlamaDecoderLayer through `_no_split_modules`
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]


@pytest.mark.parametrize("name, stage", [("zero2.yaml", 2), ("zero3.yaml", 3)])
def test_deepspeed_config_builds_accelerates_plugin(monkeypatch, name, stage):
    _, _, env = launcher_env(ROOT / "recipes/accelerate" / name)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision(env["ACCELERATE_MIXED_PRECISION"])
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == stage
    assert plugin.deepspeed_config["bf16"]["enabled"] is True
    assert plugin.zero3_init_flag is False  # `student_num_layers` needs the teacher's unpartitioned weights


@pytest.mark.parametrize("recipe", TRAIN_RECIPES, ids=lambda p: p.name)
def test_train_recipes_parse_with_launch_flags(recipe):
    # the flags the multi-GPU docs add to a recipe
    argv = ["--config", str(recipe), "--output_dir", "/tmp/x", "--bf16", "true", "--use_cpu", "true"]
    _, args, _ = make_parser().parse_args_and_config(argv)
    assert args.bf16 and args.kd_loss
    assert mixed_precision_mismatch(args, launcher_precision="bf16") is None
    assert "fp16" in mixed_precision_mismatch(args, launcher_precision="fp16")


def documented_commands(doc: Path) -> list[str]:
    lines = re.sub(r"\\\n\s*", " ", doc.read_text()).splitlines()  # join backslash-continued lines
    return [line.strip() for line in lines if line.strip().startswith("accelerate launch ")]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_documented_commands_parse(doc):
    """Each `accelerate launch ... -m hf_distill.cli.main train ...` line of the docs: real files, launcher flags
    accepted by accelerate's launch parser, training flags accepted by `hf-distill train`'s parser."""
    if not doc.exists():
        pytest.skip(f"{doc.name} not written")
    commands = documented_commands(doc)
    assert commands
    for command in commands:
        tokens = shlex.split(command)[2:]
        module = tokens.index("-m")
        assert tokens[module + 1 : module + 3] == ["hf_distill.cli.main", "train"], command
        launch, train = tokens[:module], tokens[module + 3 :]
        for flag, path in itertools.pairwise(tokens):
            if flag in ("--config_file", "--config"):
                assert (ROOT / path).exists(), f"{command}: {path} does not exist"
        args = launch_command_parser().parse_args([*launch, "-m", "hf_distill.cli.main", "train"])
        _validate_launch_command(args)
        # on this CPU machine: --use_cpu so that bf16 parses without a GPU
        make_parser().parse_args_and_config([*train, "--use_cpu", "true", "--output_dir", "/tmp/x"])


# ------------------------------------------------------------------------------------------------ 2 CPU processes
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


def assert_same_run(one: list[dict], two: list[dict], weights_one: Path, weights_two: Path) -> None:
    assert [e["step"] for e in one] == [e["step"] for e in two] and len(one) >= 3
    for a, b in zip(one, two):
        for key in KEYS:
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
    assert len({round(e["loss"], 4) for e in one}) > 1  # the trajectory moves
    w1, w2 = load_file(weights_one), load_file(weights_two)
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], atol=1e-5, rtol=0, msg=key)


@pytest.mark.distributed
def test_two_processes_equal_one_process(tmp_path):
    """torchrun 2 x batch 2 (DDP over gloo) == 1 x batch 4: loss trajectory, final weights; checkpoints once."""
    run_processes([sys.executable, str(SCRIPTS / "kd_equivalence.py"), str(tmp_path / "one"), "--batch_size", "4"])
    run_processes(TORCHRUN + [str(SCRIPTS / "kd_equivalence.py"), str(tmp_path / "two"), "--batch_size", "2"])
    one = json.loads((tmp_path / "one/result.json").read_text())
    two = json.loads((tmp_path / "two/result.json").read_text())
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    assert two["distributed_type"] == "DistributedType.MULTI_CPU" and two["backend"] == "gloo"
    assert two["student_wrapper"] == "DistributedDataParallel"
    assert two["teacher_type"] == "LlamaForCausalLM"  # replicated, not DDP-wrapped
    for result in (one, two):
        assert result["teacher_frozen"]
        assert not result["teacher_registered_at_init"] and not result["teacher_registered_after_train"]
    assert_same_run(
        one["log_history"],
        two["log_history"],
        tmp_path / "one/final/model.safetensors",
        tmp_path / "two/final/model.safetensors",
    )

    # checkpoints: written by the main process only, once each, student only
    assert json.loads((tmp_path / "two/saves_rank0.json").read_text()) == ["checkpoint-2", "checkpoint-4", "final"]
    assert json.loads((tmp_path / "two/saves_rank1.json").read_text()) == []
    assert sorted(p.name for p in (tmp_path / "two/run").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    files = sorted(p.name for p in (tmp_path / "two/run/checkpoint-4").iterdir())
    assert files == sorted(
        [
            "chat_template.jinja",
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "optimizer.pt",
            "rng_state_0.pth",
            "rng_state_1.pth",
            "scheduler.pt",
            "tokenizer.json",
            "tokenizer_config.json",
            "trainer_state.json",
            "training_args.bin",
        ]
    )
    assert set(load_file(tmp_path / "two/run/checkpoint-4/model.safetensors")) == set(make_llama(2, 32).state_dict())


@pytest.mark.distributed
@pytest.mark.parametrize("dense", [False, True], ids=["fused", "dense"])
def test_ema_teacher_two_processes_equal_one_process(tmp_path, dense):
    """EMA self-distillation (no teacher, `teacher_ema_decay`) under torchrun 2 x batch 2 (DDP over gloo): the EMA
    teacher is bit-identical on both ranks and in the checkpoint, and the student and EMA equal 1 x batch 4's."""
    script, flags = SCRIPTS / "ema_equivalence.py", ["--dense"] if dense else []
    run_processes([sys.executable, str(script), str(tmp_path / "one"), "--batch_size", "4", *flags])
    run_processes(TORCHRUN + [str(script), str(tmp_path / "two"), "--batch_size", "2", *flags])
    one, two = (json.loads((tmp_path / n / "result.json").read_text()) for n in ("one", "two"))
    assert (one["num_processes"], two["num_processes"], two["wrapper"]) == (1, 2, "DistributedDataParallel")
    assert one["source"] == two["source"] == ("ema" if dense else "ema-fused")
    ema0, ema1 = (load_file(tmp_path / "two" / f"ema_rank{r}.safetensors") for r in (0, 1))
    saved = load_file(tmp_path / "two/run/checkpoint-3/ema_teacher.safetensors")
    assert ema0.keys() == ema1.keys() == saved.keys()
    for key in ema0:
        assert torch.equal(ema0[key], ema1[key]) and torch.equal(ema0[key], saved[key]), key
    assert [e["step"] for e in one["log_history"]] == [e["step"] for e in two["log_history"]] == [1, 2, 3]
    for a, b in zip(one["log_history"], two["log_history"]):
        for key in ("loss", "kd_loss", "ce_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
    assert one["log_history"][0]["kd_loss"] == 0 < one["log_history"][-1]["kd_loss"]  # the EMA starts as the student
    student_one, student_two = (load_file(tmp_path / n / "final/model.safetensors") for n in ("one", "two"))
    ema_one = load_file(tmp_path / "one/ema_rank0.safetensors")
    start = make_llama(2, 32).state_dict()
    for key in ema0:
        torch.testing.assert_close(ema_one[key], ema0[key], atol=1e-5, rtol=0, msg=key)
        torch.testing.assert_close(student_one[key], student_two[key], atol=1e-5, rtol=0, msg=key)
    w = "model.layers.1.mlp.down_proj.weight"  # the EMA moved, and lags the student
    assert not torch.equal(ema0[w], start[w]) and (ema0[w] - student_two[w]).abs().max() > 1e-4


@pytest.mark.distributed
@pytest.mark.parametrize("loss", ["gold", "uld", "alm"])
def test_cross_tokenizer_two_processes_equal_one_process(tmp_path, loss):
    """A teacher with another tokenizer (`cross_tokenizer_loss`): torchrun 2 x batch 2 == 1 x batch 4 (issue 18)."""
    script = str(SCRIPTS / "cross_tokenizer_equivalence.py")
    run_processes([sys.executable, script, str(tmp_path / "one"), "--batch_size", "4", "--loss", loss])
    run_processes(TORCHRUN + [script, str(tmp_path / "two"), "--batch_size", "2", "--loss", loss])
    one = json.loads((tmp_path / "one/result.json").read_text())
    two = json.loads((tmp_path / "two/result.json").read_text())
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    assert two["distributed_type"] == "DistributedType.MULTI_CPU"
    assert one["source"] == two["source"] == "cross-tokenizer"
    assert all(e["kd_loss"] > 0 for e in one["log_history"])
    assert_same_run(
        one["log_history"],
        two["log_history"],
        tmp_path / "one/final/model.safetensors",
        tmp_path / "two/final/model.safetensors",
    )


@pytest.mark.distributed
def test_accelerate_launch_cli_with_cpu_2proc_config(tmp_path):
    """The documented `accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml -m hf_distill.cli.main
    train` command: 2 processes x batch 2 == `hf-distill train` on 1 process x batch 4."""
    sys.path.insert(0, str(SCRIPTS))
    from kd_equivalence import TEXTS

    tok = make_tokenizer()
    for name, model in {"teacher": make_llama(4, 64, seed=1), "student": make_llama(2, 32)}.items():
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    recipe = {
        "model_name_or_path": str(tmp_path / "student"),
        "teacher_model_name_or_path": str(tmp_path / "teacher"),
        "dataset_name": str(tmp_path / "data.jsonl"),
        "max_length": 32,
        "train_sampling_strategy": "sequential",
        "optim": "sgd",
        "learning_rate": 0.5,
        "lr_scheduler_type": "constant",
        "max_steps": 3,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 3,
        "report_to": "none",
        "seed": 0,
        "kd_weight": 0.6,
        "ce_weight": 0.4,
        "temperature": 2.0,
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    train = ["-m", "hf_distill.cli.main", "train", "--config", str(tmp_path / "recipe.yaml"), "--use_cpu", "true"]
    run_processes(
        [sys.executable] + train + ["--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "one")]
    )
    run_processes(
        ACCELERATE
        + ["--config_file", str(ROOT / "recipes/accelerate/cpu_2proc.yaml")]
        + train
        + ["--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / "two")]
    )

    assert (tmp_path / "two/checkpoint-3/rng_state_1.pth").exists()  # a second process really ran
    assert not (tmp_path / "one/checkpoint-3/rng_state_1.pth").exists()
    histories = [
        json.loads((tmp_path / run_ / "checkpoint-3/trainer_state.json").read_text())["log_history"]
        for run_ in ("one", "two")
    ]
    one, two = ([e for e in h if "loss" in e] for h in histories)
    assert_same_run(one, two, tmp_path / "one/model.safetensors", tmp_path / "two/model.safetensors")


@pytest.mark.distributed
def test_fsdp2_teacher_sharded_on_cpu(tmp_path):
    """prepare_teacher's FSDP2 branch: one unit per decoder layer + embeddings + tail, half the weights per rank,
    rank 0's weights broadcast (cpu_ram_efficient_loading), logits unchanged, plugin untouched, not registered."""
    run_processes(TORCHRUN + [str(SCRIPTS / "fsdp2_teacher.py"), str(tmp_path)])
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["num_processes"] == 2
        assert result["n_decoder_units"] == 4
        assert {"FSDPEmbedding", "FSDPLlamaDecoderLayer", "FSDPLlamaForCausalLM"} <= set(result["fsdp_units"])
        assert result["all_dtensor"] and result["local_fraction"] == pytest.approx(0.5, abs=0.02)
        assert result["eval_and_frozen"] and result["policy_restored"] and not result["registered"]
        assert result["max_abs_diff"] < 1e-5, rank  # rank 1 started from other weights


@pytest.mark.gpu
def test_fsdp_trainer_on_gpu(tmp_path):
    """The whole Trainer under FSDP2 on every visible GPU (global batch 4) == one process without FSDP.

    GPU only: accelerate enables FSDP for GPU-type distributed modes, never MULTI_CPU, so on CPU it would silently
    run DDP. The FSDP2 teacher sharding itself is covered on CPU by test_fsdp2_teacher_sharded_on_cpu.
    """
    n = torch.cuda.device_count()
    assert n >= 1 and 4 % n == 0, f"needs 1, 2 or 4 visible CUDA devices, found {n}"
    env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, range(n)))}
    script = str(SCRIPTS / "kd_equivalence.py")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n)]
    run_processes(launch + [script, str(tmp_path / "fsdp"), "--batch_size", str(4 // n), "--fsdp", "--gpu"], env=env)
    result = json.loads((tmp_path / "fsdp/result.json").read_text())
    assert result["distributed_type"] == "DistributedType.FSDP", result
    run_processes([sys.executable, script, str(tmp_path / "one"), "--batch_size", "4", "--gpu"], env=env)
    one = json.loads((tmp_path / "one/result.json").read_text())
    assert_same_run(
        one["log_history"],
        result["log_history"],
        tmp_path / "one/final/model.safetensors",
        tmp_path / "fsdp/final/model.safetensors",
    )
