"""The CLI's end-of-run teardown: barrier + destroy of the process group, bounded in time."""

import threading

import pytest
import torch
import torch.distributed as dist

from hf_distill.cli import shutdown
from hf_distill.cli.shutdown import ABANDONED, finish_distributed


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_noop_without_process_group():
    assert not dist.is_initialized()
    assert finish_distributed(timeout=1) is True


def test_destroys_the_group(world_of_one):
    dist.all_reduce(torch.ones(2))  # the group has done work before the end of the run
    assert finish_distributed(timeout=30) is True
    assert not dist.is_initialized()


def test_blocked_destroy_is_abandoned_with_stacks(world_of_one, monkeypatch, capsys):
    release = threading.Event()
    exits, handlers = [], []
    monkeypatch.setattr(dist, "destroy_process_group", lambda: release.wait(30))
    monkeypatch.setattr(shutdown.os, "_exit", exits.append)
    monkeypatch.setattr(shutdown.atexit, "_run_exitfuncs", lambda: handlers.append(True))
    monkeypatch.setenv(shutdown.TIMEOUT_ENV, "0.2")
    try:
        assert finish_distributed() is False
    finally:
        release.set()
    err = capsys.readouterr().err
    assert err.startswith(ABANDONED) and "within 0.2 s" in err
    assert "--- thread destroy_pg" in err and "release.wait(30)" in err  # the blocked thread's stack is printed
    assert exits == [0] and handlers == [True]
