"""plait's multi-process harness: run a function on N gloo ranks and collect every rank's result.

    results = run_ranks(fn, world_size=4, args=(...), timeout=120)

Each rank is a fresh spawned process with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set (a
free port), the default process group initialized over gloo, and `torch.set_num_threads(threads)`.
`fn(*args)` runs on every rank; its return value (picklable) comes back in rank order. If any rank
raises, the others are stopped and `RankFailure` carries every failing rank's traceback; if the
ranks are still running after `timeout` seconds they are killed and the error says which were.
"""

from __future__ import annotations

import datetime
import io
import os
import queue
import socket
import time
import traceback

import torch.multiprocessing as mp


class RankFailure(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args, out, threads: int, init: bool, env: dict,
            pg_timeout: float):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    os.environ.update(env)
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        if init and world > 1:
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=pg_timeout))
        result = fn(*args)
        # plain bytes: tensors must not travel as shared memory of a process that exits
        buf = io.BytesIO()
        torch.save(result, buf)
        out.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        out.put((rank, False, traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def run_ranks(fn, world_size: int, args: tuple = (), timeout: float = 120.0, threads: int = 1,
              init_process_group: bool = True, env: dict | None = None,
              pg_timeout: float = 300.0) -> list:
    # The free port is probed, then released before rank 0 binds it: another process can take it in
    # between. Only that failure (the rendezvous cannot listen) is retried, on a fresh port.
    for attempt in range(3):
        try:
            return _run_ranks_once(fn, world_size, args, timeout, threads, init_process_group, env,
                                   pg_timeout)
        except RankFailure as e:
            if "EADDRINUSE" not in str(e) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _run_ranks_once(fn, world_size, args, timeout, threads, init_process_group, env,
                    pg_timeout) -> list:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(r, world_size, port, fn, args, out, threads, init_process_group,
                               env or {}, pg_timeout))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(failures) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - results.keys() - failures.keys())
                failures.update(
                    {r: f"rank {r}: still running after {timeout:.0f} s (hang?)" for r in missing})
                break
            try:
                rank, ok, payload = out.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if not p.is_alive() and r not in results and r not in failures]
                if dead:
                    time.sleep(0.5)  # let a dying rank's message arrive
                    try:
                        while True:
                            rank, ok, payload = out.get_nowait()
                            (results if ok else failures)[rank] = payload
                    except queue.Empty:
                        pass
                    for r in dead:
                        if r not in results and r not in failures:
                            failures[r] = (f"rank {r}: process exited with code "
                                           f"{procs[r].exitcode} and no result")
                continue
            (results if ok else failures)[rank] = payload
            if failures:  # one rank failed: give the others a moment to report, then stop them
                grace = time.monotonic() + 5.0
                while len(results) + len(failures) < world_size and time.monotonic() < grace:
                    try:
                        rank, ok, payload = out.get(timeout=0.5)
                        (results if ok else failures)[rank] = payload
                    except queue.Empty:
                        pass
                break
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=5)
    if failures:
        msg = "\n".join(f"---- rank {r} ----\n{tb}" for r, tb in sorted(failures.items()))
        raise RankFailure(f"{len(failures)} of {world_size} ranks failed:\n{msg}")
    import torch

    return [torch.load(io.BytesIO(results[r]), weights_only=False) for r in range(world_size)]
