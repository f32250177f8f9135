"""End of a multi-process CLI run: every process meets at a barrier, destroys the process group, and exits.

Why not leave the group to interpreter exit: gloo's worker threads can then free tensors after Python is gone and
abort the rank (pytorch/pytorch#179291). Why a time limit on the destroy: on rare runs it blocks inside the backend's
shutdown (pytorch/pytorch#75097; Ray Train bounds it the same way). Why exit with `os._exit` after the `atexit`
handlers: process groups and DDP-wrapped models still referenced at interpreter finalization are torn down by C++
destructors that may wait on those same threads. By the time any of this runs, every process has passed the barrier,
so the command's outputs are saved and exit status 0 is the truth.
"""

import atexit
import os
import sys
import threading
import traceback

import torch


TIMEOUT_ENV = "HF_DISTILL_DESTROY_TIMEOUT"
ABANDONED = "hf-distill: destroy_process_group did not return"


def end_distributed_run(timeout: float | None = None) -> None:
    """After a successful multi-process command: barrier, destroy the process group (bounded), exit with status 0.

    Returns at once when torch.distributed is not initialised (single-process runs and in-process callers). Otherwise
    it does not return: after the barrier, `destroy_process_group` runs in a helper thread for at most `timeout`
    seconds (default: the `HF_DISTILL_DESTROY_TIMEOUT` environment variable, else 120); if it is still blocked, a
    warning starting with `ABANDONED` and every thread's stack go to stderr. Then the `atexit` handlers run (trackers,
    logging, temporary files), stdout/stderr are flushed and the process ends with `os._exit(0)`, skipping an
    interpreter finalization that could abort or block on the backend's threads.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if timeout is None:
        timeout = float(os.environ.get(TIMEOUT_ENV, "120"))
    torch.distributed.barrier()
    worker = threading.Thread(target=torch.distributed.destroy_process_group, name="destroy_pg", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        print(
            f"{ABANDONED} within {timeout:g} s on rank {os.environ.get('RANK', '?')}; every process passed the final "
            "barrier, so the outputs are saved. Exiting with status 0 without waiting for it. Thread stacks follow:",
            file=sys.stderr,
        )
        for ident, frame in sys._current_frames().items():
            names = [t.name for t in threading.enumerate() if t.ident == ident]
            print(f"--- thread {names[0] if names else ident}", file=sys.stderr)
            traceback.print_stack(frame, file=sys.stderr)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
