"""A toy job on `hf_distill.jobs.ResumableJob`, for the helper's kill-and-resume tests (tests/test_jobs.py).

    python tests/distributed/resumable_job.py OUT --items 20 [--mode shards|log] [--die-after K [--torn]] [--sleep S]
    torchrun --nproc_per_node 2 tests/distributed/resumable_job.py OUT --items 20

Item `i` becomes the record `{"id": i, "value": work(i)}`. `shards` mode: every process writes its part of the
unfinished items, 3 per JSON-lines shard, then the main process gathers all shards into `OUT/result.json`.
`log` mode (one process): records are appended to `OUT/log.jsonl` one at a time. `--die-after K` ends the process
with `os._exit(3)` (no cleanup, as a kill) once it has written K shards / records; with `--torn` it dies half-way
through writing the next one. `--sleep` pauses after each write (for a test that sends SIGKILL).
"""

import argparse
import json
import os
import time
from pathlib import Path

from accelerate import PartialState

from hf_distill.cli.shutdown import end_distributed_run
from hf_distill.jobs import ResumableJob, read_appended_records, read_shard_records, write_json_atomic


def work(i: int, salt: int) -> int:
    return (i * 7919 + salt) % 1009


def die(args: argparse.Namespace, written: int) -> None:
    if args.die_after is not None and written >= args.die_after:
        os._exit(3)


def run_shards(args: argparse.Namespace, out: Path) -> None:
    state = PartialState(cpu=True)
    job = ResumableJob(out, {"items": args.items, "salt": args.salt}, what="toy results", state=state)
    job.check_settings()
    shard_dir = out / "shards"
    if job.is_main_process:
        shard_dir.mkdir(exist_ok=True)
    job.wait()
    done = {record["id"] for record in read_shard_records(shard_dir)}
    todo = job.todo(range(args.items), done)
    job.wait()  # every process has read the same finished set before anyone writes
    job.record_settings(status="running")
    with job.split(todo) as mine:
        shards = job.shard_writer(shard_dir, ".jsonl")
        for start in range(0, len(mine), 3):
            records = [{"id": i, "value": work(i, args.salt)} for i in mine[start : start + 3]]
            if args.torn and args.die_after is not None and shards.count >= args.die_after:
                text = "".join(json.dumps(r) + "\n" for r in records)
                shards.write(lambda tmp, text=text: (tmp.write_text(text[: len(text) // 2]), os._exit(3)))
            die(args, shards.count)
            shards.write_records(records)
            time.sleep(args.sleep)
    job.wait()
    if job.is_main_process:
        records = sorted(read_shard_records(shard_dir), key=lambda r: r["id"])
        write_json_atomic(out / "result.json", records)
        job.record_settings(status="complete")


def run_log(args: argparse.Namespace, out: Path) -> None:
    job = ResumableJob(out, {"items": args.items, "salt": args.salt}, what="toy records")
    job.check_or_record_settings()
    path = out / "log.jsonl"
    done = dict(record for _, record in read_appended_records(path, lambda r: (int(r["id"]), r)))
    with job.append_log(path) as log:
        for written, i in enumerate(job.todo(range(args.items), done)):
            record = {"id": i, "value": work(i, args.salt)}
            if args.torn and args.die_after is not None and written >= args.die_after:
                log._file.write(json.dumps(record)[:7])  # a kill in the middle of a line
                log._file.flush()
                os._exit(3)
            die(args, written)
            log.append([record])
            done[i] = record
            time.sleep(args.sleep)
    write_json_atomic(out / "result.json", [done[i] for i in range(args.items)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output_dir")
    parser.add_argument("--items", type=int, default=20)
    parser.add_argument("--salt", type=int, default=0)
    parser.add_argument("--mode", choices=["shards", "log"], default="shards")
    parser.add_argument("--die-after", type=int, default=None)
    parser.add_argument("--torn", action="store_true")
    parser.add_argument("--sleep", type=float, default=0.0)
    args = parser.parse_args(argv)
    (run_shards if args.mode == "shards" else run_log)(args, Path(args.output_dir))


if __name__ == "__main__":
    main()
    end_distributed_run()  # barrier + bounded destroy, as the CLI ends
