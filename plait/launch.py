"""Start worker processes through torch's elastic launcher (torch.distributed.run).

One node: a standalone rendezvous on a free local port. Several nodes: the c10d rendezvous at
--rdzv-endpoint, exactly as `torchrun` takes it; `--max-restarts` lets the elastic agent restart
every worker when one dies.
"""

from __future__ import annotations

import sys

from plait.errors import ConfigError


def torchrun_args(worker_args: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0,
                  rdzv_backend: str = "c10d", rdzv_endpoint: str = "", rdzv_id: str = "plait",
                  max_restarts: int = 0) -> list[str]:
    args = [f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}"]
    if nnodes == 1 and not rdzv_endpoint:
        args.append("--standalone")
    else:
        if not rdzv_endpoint:
            raise ConfigError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (the same on "
                              "every node)")
        args += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--rdzv-backend={rdzv_backend}",
                 f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
    return args + ["-m", "plait"] + worker_args


def launch(worker_args: list[str], nproc: int, **kw) -> int:
    import os

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # one thread pool per worker sized to its share of the cores (torchrun would force 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if kw.get("max_restarts"):
        # restarted workers must not find the previous attempt's addresses in the rendezvous store
        # the agent shares with them (pytorch/pytorch#135712): each attempt gets a store of its own
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    args = get_args_parser().parse_args(torchrun_args(worker_args, nproc, **kw))
    try:
        run(args)
    except ChildFailedError as e:
        failures = e.failures  # global rank -> ProcessFailure
        first = min(failures)
        f = failures[first]
        print(f"plait: {len(failures)} worker(s) failed; first: rank {first} exit code "
              f"{f.exitcode} (see its output above)", file=sys.stderr)
        return f.exitcode if isinstance(f.exitcode, int) and f.exitcode > 0 else 1
    return 0
