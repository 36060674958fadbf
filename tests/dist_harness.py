"""Run a function in a world of gloo processes on this machine (SyncBatchNorm's
and recalibrate_batchnorm's distributed tests)."""

from __future__ import annotations

import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

JOIN_TIMEOUT = 90  # seconds for a whole world; a test takes a few


def _entry(rank, world, store, out_dir, target, args, timeout_s):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout_s))
    try:
        result = target(rank, world, *args)
    except BaseException as error:  # the test reads it
        result = {"raised": type(error).__name__, "message": str(error),
                  "traceback": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def run_world(world, target, *args, tmp, timeout_s=30):
    """Run ``target(rank, world, *args)`` in ``world`` new processes; their results.

    A rank that exits without a result gives ``None``. Processes still alive
    after :data:`JOIN_TIMEOUT` are killed and the test fails.
    """
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    # Workers fork from a server that has imported torch once (spawning
    # imports it in every worker: several seconds each on a small machine).
    # The server exits with this process.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch"])
    procs = [ctx.Process(target=_entry, args=(r, world, str(tmp / "store"), str(tmp), target,
                                              args, timeout_s), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_TIMEOUT
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(10)
    assert not hung, f"ranks {hung} still running after {JOIN_TIMEOUT} s (killed)"
    codes = [p.exitcode for p in procs]
    assert all(c == 0 for c in codes), f"exit codes {codes}"
    return [torch.load(tmp / f"rank{r}.pt") if (tmp / f"rank{r}.pt").exists() else None
            for r in range(world)]
