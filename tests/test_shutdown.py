"""The CLI's end of a multi-process run: barrier, bounded destroy of the process group, exit 0."""

import sys
import threading
import types

import pytest
import torch
import torch.distributed as dist

from hf_distill.cli import shutdown
from hf_distill.cli.main import COMMANDS, main
from hf_distill.cli.shutdown import ABANDONED, end_distributed_run


@pytest.fixture
def exits(monkeypatch):
    """Record os._exit and the atexit run instead of ending the test process."""
    calls = []
    monkeypatch.setattr(shutdown.os, "_exit", lambda status: calls.append(("exit", status)))
    monkeypatch.setattr(shutdown.atexit, "_run_exitfuncs", lambda: calls.append(("atexit", None)))
    return calls


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_returns_without_process_group(exits, capsys):
    assert not dist.is_initialized()
    end_distributed_run(timeout=1)
    assert exits == [] and "destroy" not in capsys.readouterr().err


def test_cli_entry_ends_every_command_with_it(monkeypatch):
    calls = []
    command = types.ModuleType("fake_command")
    command.run = lambda argv, prog: calls.append(("run", argv, prog))
    monkeypatch.setitem(sys.modules, "fake_command", command)
    monkeypatch.setitem(COMMANDS, "fake", ("fake_command", "a test command"))
    monkeypatch.setattr(shutdown, "end_distributed_run", lambda: calls.append(("end",)))
    main(["fake", "--x", "1"])
    assert calls == [("run", ["--x", "1"], "hf-distill fake"), ("end",)]


def test_destroys_the_group_then_exits_0(world_of_one, exits, capsys):
    dist.all_reduce(torch.ones(2))  # the group has done work before the end of the run
    end_distributed_run(timeout=30)
    assert not dist.is_initialized()
    assert exits == [("atexit", None), ("exit", 0)]  # atexit handlers (trackers, logging) run before the exit
    assert ABANDONED not in capsys.readouterr().err


def test_blocked_destroy_is_abandoned_with_stacks(world_of_one, exits, monkeypatch, capsys):
    release = threading.Event()
    monkeypatch.setattr(dist, "destroy_process_group", lambda: release.wait(30))
    monkeypatch.setenv(shutdown.TIMEOUT_ENV, "0.2")
    try:
        end_distributed_run()
    finally:
        release.set()
    err = capsys.readouterr().err
    assert err.startswith(ABANDONED) and "within 0.2 s" in err
    assert "--- thread destroy_pg" in err and "release.wait(30)" in err  # the blocked thread's stack is printed
    assert exits == [("atexit", None), ("exit", 0)]
