"""End of a multi-process CLI run: every process meets at a barrier, then the process group is destroyed.

Why not leave the group to interpreter exit: gloo's worker threads can then free tensors after Python is gone and
abort the rank (pytorch/pytorch#179291). Why a time limit on the destroy: on rare runs it blocks inside the backend's
shutdown (pytorch/pytorch#75097; Ray Train bounds it the same way). By then every process has passed the barrier, so
the run's outputs are saved; a blocked destroy is abandoned with a warning and every thread's stack on stderr, the
`atexit` handlers run, and the process exits with status 0 instead of hanging its launcher.
"""

import atexit
import logging
import os
import sys
import threading
import traceback

import torch


logger = logging.getLogger(__name__)

TIMEOUT_ENV = "HF_DISTILL_DESTROY_TIMEOUT"
ABANDONED = "hf-distill: destroy_process_group did not return"


def finish_distributed(timeout: float | None = None) -> bool:
    """Barrier, then destroy the default process group, waiting at most `timeout` seconds for the destroy.

    Does nothing (returns True) when torch.distributed is not initialised. `timeout` defaults to the
    `HF_DISTILL_DESTROY_TIMEOUT` environment variable, else 120 s. Returns True when the group was destroyed; when the
    destroy is still blocked after `timeout`, prints a warning starting with `ABANDONED` plus all thread stacks to
    stderr and ends the process with `os._exit(0)` after running the `atexit` handlers (so it never returns False
    in practice; the return value exists for callers that patch `os._exit` in tests).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return True
    if timeout is None:
        timeout = float(os.environ.get(TIMEOUT_ENV, "120"))
    torch.distributed.barrier()
    worker = threading.Thread(target=torch.distributed.destroy_process_group, name="destroy_pg", daemon=True)
    worker.start()
    worker.join(timeout)
    if not worker.is_alive():
        return True
    rank = os.environ.get("RANK", "?")
    print(
        f"{ABANDONED} within {timeout:g} s on rank {rank}; every process passed the final barrier, so the outputs "
        "are saved. Exiting with status 0 without waiting for it. Thread stacks follow:",
        file=sys.stderr,
        flush=True,
    )
    for ident, frame in sys._current_frames().items():
        names = [t.name for t in threading.enumerate() if t.ident == ident]
        print(f"--- thread {names[0] if names else ident}", file=sys.stderr)
        traceback.print_stack(frame, file=sys.stderr)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
    return False
