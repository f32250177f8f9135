"""`prepare_teacher`'s FSDP2 branch on 2 CPU processes (gloo), used by tests/test_distributed.py.

    CUDA_VISIBLE_DEVICES= torchrun --nproc_per_node 2 tests/distributed/fsdp2_teacher.py OUT

accelerate only selects FSDP on GPU-type devices, so the Trainer never shards on CPU; this script gives a MULTI_CPU
accelerator an FSDP2 plugin and calls the branch directly. Rank 1's teacher starts from other weights (as under
`cpu_ram_efficient_loading`, where only rank 0 loads them): after preparation both ranks must compute rank 0's logits.
Writes OUT/rank<r>.json.
"""

import json
import sys
import types
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (conftest helpers)

import torch
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin
from conftest import make_llama
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from hf_distill.cli.shutdown import end_distributed_run
from hf_distill.models import prepare_teacher


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(cpu=True)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        cpu_ram_efficient_loading=True,
        reshard_after_forward=True,
    )
    accelerator.state.fsdp_plugin = plugin
    policy_before = (plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap)

    input_ids = torch.randint(6, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = make_llama(4, 64, seed=1)(input_ids=input_ids).logits
    teacher = make_llama(4, 64, seed=1 if accelerator.is_main_process else 7)
    n_params = sum(p.numel() for p in teacher.parameters())
    trainer = types.SimpleNamespace(
        accelerator=accelerator, model=make_llama(2, 32), is_deepspeed_enabled=False, is_fsdp_enabled=True
    )
    prepared = prepare_teacher(teacher, trainer)

    params = list(prepared.parameters())  # read before the forward: units that keep their gathered weights after it
    result = {
        "distributed_type": str(accelerator.distributed_type),
        "num_processes": accelerator.num_processes,
        "fsdp_units": sorted({type(m).__name__ for m in prepared.modules() if isinstance(m, FSDPModule)}),
        "n_decoder_units": sum(isinstance(m, FSDPModule) for m in prepared.model.layers),
        "all_dtensor": all(isinstance(p, DTensor) for p in params),
        "local_fraction": sum(p.to_local().numel() for p in params) / n_params,
        "eval_and_frozen": not prepared.training and not any(p.requires_grad for p in params),
        "policy_restored": (plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap) == policy_before,
        "registered": any(m is prepared for m in accelerator._models),
    }
    with torch.no_grad():
        logits = prepared(input_ids=input_ids).logits
    result["max_abs_diff"] = (logits.float() - reference).abs().max().item()
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
    end_distributed_run()  # barrier + bounded destroy, as the CLI ends: gloo aborts ranks left to interpreter exit
