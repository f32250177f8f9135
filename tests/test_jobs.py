"""The resumable-job helper shared by the offline jobs: settings record, kill-safe writes, resume (jobs killed in a
subprocess, between and in the middle of writes, then resumed, give the uninterrupted output), two processes."""

import importlib.util
import json
import multiprocessing
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, launcher_env, run_processes

from hf_distill.jobs import (
    AppendLog,
    ResumableJob,
    ShardWriter,
    atomic_path,
    check_or_record_settings,
    fingerprint,
    read_appended_records,
    read_shard_records,
    shard_paths,
    write_json_atomic,
)


def test_settings_are_recorded_then_checked(tmp_path):
    path = str(tmp_path / "settings.json")
    check_or_record_settings(path, {"k": 64, "model": "m"}, "caches")
    assert json.loads((tmp_path / "settings.json").read_text()) == {"k": 64, "model": "m"}
    assert not (tmp_path / "settings.json.tmp").exists()  # written atomically
    check_or_record_settings(path, {"k": 64, "model": "m"}, "caches")  # same settings: resume
    with pytest.raises(ValueError, match=r"holds caches made with other settings \(\{'k': \(64, 16\)\}"):
        check_or_record_settings(path, {"k": 16, "model": "m"}, "caches")


def test_appended_records_skip_cut_and_rejected_lines(tmp_path, caplog):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"index": 0}\n{"index": 1}\n[1, 2]\n{"index": "x"}\n{"ind')  # a list, a bad value, a cut line
    with caplog.at_level("WARNING", logger="hf_distill.jobs"):
        rows = list(read_appended_records(str(path), lambda r: int(r["index"])))
    assert rows == [(1, 0), (2, 1)]
    assert caplog.text.count("Skipping unreadable line") == 3 and "line 5 of" in caplog.text
    assert list(read_appended_records(str(tmp_path / "missing.jsonl"), dict)) == []


# ----------------------------------------------------------------------------------------------- ResumableJob
SCRIPT = REPO / "tests" / "distributed" / "resumable_job.py"
_spec = importlib.util.spec_from_file_location("resumable_job", SCRIPT)
toy_job = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy_job)


def toy(out, *options: str, wait: bool = True) -> multiprocessing.Process:
    """Run the toy job (tests/distributed/resumable_job.py) in a forked process; a killed job ends it with
    `os._exit(3)` (no cleanup, no flush: as a kill)."""
    proc = multiprocessing.get_context("fork").Process(target=toy_job.main, args=([str(out), *options],))
    proc.start()
    if wait:
        proc.join(300)
    return proc


def result(out) -> list[dict]:
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    """An uninterrupted run of 20 items."""
    out = tmp_path_factory.mktemp("reference")
    assert toy(out).exitcode == 0
    records = result(out)
    assert [r["id"] for r in records] == list(range(20)) and len({r["value"] for r in records}) == 20
    return records


@pytest.mark.parametrize("mode", ["shards", "log"])
@pytest.mark.parametrize("torn", [False, True], ids=["between-writes", "mid-write"])
def test_killed_job_resumes_to_the_uninterrupted_output(tmp_path, reference, mode, torn):
    out = tmp_path / "run"
    assert toy(out, "--mode", mode, "--die-after", "2", *(["--torn"] if torn else [])).exitcode == 3
    assert not (out / "result.json").exists()
    if mode == "shards":
        assert len(list((out / "shards").glob("*.jsonl"))) == 2  # 2 whole shards of 3 items, nothing torn
        assert len(list((out / "shards").glob(".*.tmp"))) == int(torn)  # the killed write's temporary file
        assert json.loads((out / "settings.json").read_text())["status"] == "running"
    else:
        lines = (out / "log.jsonl").read_text().split("\n")
        assert len(lines) == 3 and (lines[-1] != "") == torn  # 2 records, then a cut line or nothing
    assert toy(out, "--mode", mode).exitcode == 0
    assert result(out) == reference  # each item once, the same values
    if mode == "shards":
        ids = [r["id"] for r in read_shard_records(out / "shards")]
        assert sorted(ids) == list(range(20))  # no item done twice
        assert json.loads((out / "settings.json").read_text())["status"] == "complete"
    else:
        ids = [i for _, i in read_appended_records(out / "log.jsonl", lambda r: r["id"])]
        assert sorted(ids) == list(range(20))  # the torn line is skipped, its item redone once


def test_sigkilled_job_resumes(tmp_path, reference):
    out = tmp_path / "run"
    proc = toy(out, "--mode", "log", "--sleep", "0.2", wait=False)
    log = out / "log.jsonl"
    try:
        for _ in range(3000):  # up to 5 minutes on a loaded machine
            if log.exists() and log.read_text().count("\n") >= 3:
                break
            time.sleep(0.1)
    finally:
        proc.kill()  # SIGKILL
        proc.join()
    assert proc.exitcode == -signal.SIGKILL
    assert 3 <= log.read_text().count("\n") < 20, "the run must be killed part-way"
    assert toy(out, "--mode", "log").exitcode == 0
    assert result(out) == reference


def test_changed_settings_name_the_keys_and_the_fix(tmp_path):
    assert toy(tmp_path, "--die-after", "1").exitcode == 3
    with pytest.raises(ValueError) as info:
        toy_job.main([str(tmp_path), "--salt", "1"])
    assert "holds toy results made with other settings ({'salt': (0, 1)}, as (before, now))" in str(info.value)
    assert "a different salt (0, now 1)" in str(info.value) and "use a new output folder" in str(info.value)


def test_job_checks_keys_with_defaults_and_warnings(tmp_path, caplog):
    settings = {"k": 8, "model": "a", "status": "running"}
    first = ResumableJob(tmp_path, dict(settings), what="caches", keys=["k", "model"], warn_keys=["model"])
    first.check_settings()
    first.record_settings(status="complete")
    assert json.loads((tmp_path / "settings.json").read_text()) == {**settings, "status": "complete"}
    # a key the earlier run did not record takes its default; the status is not compared; a warn key only warns
    again = {"k": 8, "model": "b", "status": "running", "compression": "none"}
    job = ResumableJob(tmp_path, again, what="caches", keys=["k", "model", "compression"],
                       defaults={"compression": "none"}, warn_keys=["model"])  # fmt: skip
    with caplog.at_level("WARNING", logger="hf_distill.jobs"):
        job.check_settings()
    assert "Resuming caches with model 'b'; the finished part used 'a'" in caplog.text
    assert job.fingerprint == fingerprint({"k": 8, "model": "b", "compression": "none"})
    with pytest.raises(ValueError, match=r"a different compression \('none', now 'compact'\)"):
        ResumableJob(tmp_path, {**again, "compression": "compact"}, what="caches", keys=["compression"],
                     defaults={"compression": "none"}).check_settings()  # fmt: skip
    assert ResumableJob.todo(range(6), {1, 4}) == [0, 2, 3, 5]
    with job.split([0, 1, 2]) as mine:  # no PartialState: this process takes everything
        assert mine == [0, 1, 2]


def test_atomic_path_leaves_no_torn_file(tmp_path):
    path = tmp_path / "out.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("{half")
        raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"a": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    shards = ShardWriter(tmp_path / "s", ".jsonl", process_index=1)
    (tmp_path / "s").mkdir()
    first = shards.write_records([{"id": 0}, {"id": 1}])
    assert first.name.endswith("-rank00001-000000.jsonl") and shards.count == 1
    assert list(read_shard_records(tmp_path / "s")) == [{"id": 0}, {"id": 1}]
    assert shard_paths(tmp_path / "s", ".jsonl") == [first]


def test_append_log_ends_a_cut_line_before_appending(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"id": 0}\n{"id"')
    with AppendLog(path) as log:
        log.append([{"id": 1}])
    assert path.read_text() == '{"id": 0}\n{"id"\n{"id": 1}\n'
    assert [r for _, r in read_appended_records(path, lambda r: r["id"])] == [0, 1]


@pytest.mark.distributed
def test_two_processes_killed_then_resumed_match_one(tmp_path, reference):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(SCRIPT)]
    cmd = [*torchrun, str(tmp_path), "--die-after", "1"]
    killed = subprocess.run(
        cmd, check=False, env=launcher_env(), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert killed.returncode != 0 and not (tmp_path / "result.json").exists()
    assert 1 <= len(list((tmp_path / "shards").glob("*.jsonl"))) <= 2
    run_processes([*torchrun, str(tmp_path)], timeout=300)
    assert result(tmp_path) == reference
    ranks = {int(p.name.split("-rank")[1][:5]) for p in (tmp_path / "shards").glob("*.jsonl")}
    assert ranks == {0, 1}
