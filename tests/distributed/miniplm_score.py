"""Run under `torchrun --nproc_per_node 2` (CPU, gloo): MiniPLM scoring with each process on a disjoint shard.

    torchrun --nproc_per_node 2 tests/distributed/miniplm_score.py --teacher T --reference R --dataset D.jsonl \
        --output_dir OUT --counts_dir COUNTS

Each process writes `COUNTS/rank<r>.json` with the number of sequences its teacher and reference scored, so the test
can check that the shards are disjoint and cover the corpus once.
"""

import argparse
import json
import os
from pathlib import Path

from accelerate import PartialState

from hf_distill.cli.shutdown import end_distributed_run
from hf_distill.data.miniplm import score
from hf_distill.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for name in ("--teacher", "--reference", "--dataset", "--output_dir", "--counts_dir"):
        parser.add_argument(name, required=True)
    parser.add_argument("--max_length", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=3)
    args = parser.parse_args()

    state = PartialState(cpu=True)
    assert state.num_processes == int(os.environ.get("WORLD_SIZE", "1")), "launch with torchrun"
    seen = {"teacher": 0, "reference": 0}

    def counter(role: str):
        def hook(module, inputs, output):
            seen[role] += output.logits.shape[0]

        return hook

    models = {role: load_model(getattr(args, role)) for role in seen}
    for role, model in models.items():
        model.register_forward_hook(counter(role))
    scores = score(
        models["teacher"], models["reference"], args.dataset, args.teacher, output_dir=args.output_dir,
        max_length=args.max_length, batch_size=args.batch_size, flush_every=1, use_cpu=True,
    )  # fmt: skip
    counts = {"rank": state.process_index, "world": state.num_processes, "n_scores": len(scores), **seen}
    Path(args.counts_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.counts_dir) / f"rank{state.process_index}.json").write_text(json.dumps(counts))


if __name__ == "__main__":
    main()
    end_distributed_run()  # barrier + bounded destroy, as the CLI ends: gloo aborts ranks left to interpreter exit
