"""Evaluate a layout (time, memory) and search every layout that fits, best first.

Pruning rules (each one plait enforces, or a statement of what is never faster):
- dp·tp·pp = world (plait.mesh.check_layout);
- tp divides model.n_heads and the ffn width, and divides n_kv_heads or is a multiple of it
  (plait.models.gpt_spec.check_tp: above it kv heads are replicated, their weights counted on
  every rank holding one), and stays inside a node (tp divides gpus_per_node: its collectives
  are not overlapped);
- pp·virtual_stages ≤ n_layers (plait.pipeline.partition: every stage holds a block); tied
  embeddings under a pipeline keep a copy of the embedding on the last stage (its memory is
  counted there) and add an all-reduce of its gradient between the first and the last stage;
- train.global_batch divisible by dp·micro_batch (config checks); with a pipeline m = global_batch /
  (dp·micro_batch) ≥ pp, and interleaved 1F1B needs m divisible by pp and has 2 ≤ v ≤ 8;
- ZeRO 1-3 only with dp > 1 (at dp = 1 they are plain training); ZeRO-3 not with zb_h1
  (plait.data_parallel.zero.check_zero); sequence parallelism only with tp > 1;
- memory: the largest rank's predicted peak within the device's usable memory; model state is
  checked first (it does not depend on micro-batch, schedule or checkpointing), and activation
  memory grows with the micro-batch, so larger micro-batches are not tried once one does not fit;
- branch and bound: every surviving layout gets a lower bound on its step time (for each rank,
  its compute plus the forward chain before its first stage and, for the schedules whose backward
  is atomic, the backward chain after it; plus what follows the pipeline); layouts are simulated
  in order of that bound and the search stops once the bound exceeds the K-th best simulated time.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from plait.errors import ConfigError
from plait.planner.cluster import Cluster
from plait.planner.compute import Rates
from plait.planner.layout import AC_MODES, Layout
from plait.planner.lowcomm import Settings, extra_state_bytes, variants
from plait.planner.memory import combine, rank_activations, rank_parts, rank_state
from plait.planner.pipesim import peak_in_flight, simulate
from plait.planner.shape import ModelShape
from plait.planner.timing import StepTime, group_crosses

MAX_VIRTUAL = 8


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class Job:
    """What is trained: the model, the batch, the dtype, plait's bucket size."""

    shape: ModelShape
    seq_len: int
    global_batch: int
    dtype: str = "bf16"
    bucket_mb: float = 25.0
    threads: int = 0  # train.threads (CPU ranks); 0: the cores split over the ranks
    compression: str = "none"  # the config's compression.name: every layout uses it
    sync: str = "every_step"  # the config's sync.strategy
    settings: Settings = Settings()  # their parameters (rank, fraction, every, quantize)
    # with pp > 1, the dp exchange starts from each chunk's last backward (plait); False: after
    # the pipeline flush (DeepSpeed's PipelineEngine: ReduceGrads after the last step)
    dp_overlap_under_pp: bool = True

    @property
    def tokens(self) -> int:
        return self.global_batch * self.seq_len


def job_from_config(cfg, shape: ModelShape | None = None) -> Job:
    from plait.planner.shape import shape_from_config

    t = cfg.train
    return Job(
        shape or shape_from_config(cfg),
        t.seq_len,
        t.global_batch,
        t.dtype,
        cfg.parallel.bucket_mb,
        t.threads,
        cfg.compression.name,
        cfg.sync.strategy,
        Settings.from_config(cfg),
    )


class Planner(StepTime):
    """Rules, memory, time and search for one job on `world` ranks of a cluster."""

    def __init__(self, job: Job, cluster: Cluster, world: int, low_comm: bool = False):
        self.job, self.world = job, world
        self.low_comm = low_comm  # also try compressors and sync strategies on a dp group that
        # crosses nodes (plait.planner.lowcomm)
        self.cluster = cluster.for_world(world)
        self.rates = Rates(self.cluster, world, job.threads)
        self.shape = job.shape
        self._state_cache: dict = {}
        self._act_cache: dict = {}
        self._cost_cache: dict = {}
        self._after_cache: dict = {}
        self._rep_cache: dict = {}

    # -- rules ---------------------------------------------------------------------------------
    def violations(self, L: Layout) -> list[str]:
        """Why a layout is refused (empty: allowed)."""
        sh, j, g = self.shape, self.job, self.cluster.gpus_per_node
        out = []
        if L.world != self.world:
            out.append(f"dp×tp×pp = {L.world} is not the world size {self.world}")
        if not sh.tp_ok(L.tp):
            out.append(
                f"tp = {L.tp} does not divide n_heads {sh.n_heads} and ffn {sh.ffn}, or neither "
                f"divides nor is a multiple of n_kv_heads {sh.kv_heads}"
            )
        if g % L.tp:
            out.append(f"tp = {L.tp} does not fit inside a node of {g} devices")
        if L.pp * L.virtual_stages > sh.n_layers:
            out.append(
                f"pp × virtual_stages = {L.pp * L.virtual_stages} exceeds the {sh.n_layers} layers"
            )
        if j.global_batch % (L.dp * L.micro_batch):
            out.append(
                f"global batch {j.global_batch} is not divisible by dp × micro_batch = "
                f"{L.dp * L.micro_batch}"
            )
            return out
        m = j.global_batch // (L.dp * L.micro_batch)
        if L.pp > 1 and m < L.pp:
            out.append(f"{m} micro-batches for {L.pp} pipeline stages (needs m ≥ pp)")
        if L.virtual_stages > 1 and L.schedule != "interleaved_1f1b":
            out.append("virtual stages need the interleaved_1f1b schedule")
        if L.schedule == "interleaved_1f1b" and L.pp > 1 and m % L.pp:
            out.append(f"interleaved 1F1B needs m = {m} divisible by pp = {L.pp}")
        if L.zero and L.dp == 1:
            out.append("ZeRO needs dp > 1")
        if L.zero == 3 and L.pp > 1 and L.schedule == "zb_h1":
            out.append("ZeRO-3 does not combine with zb_h1")
        if L.sequence_parallel and L.tp == 1:
            out.append("sequence parallelism needs tp > 1")
        if (L.compression != "none" or L.sync != "every_step") and L.zero:
            out.append("compression and sync strategies are planned with ZeRO 0 only")
        if L.compression != "none" and L.sync != "every_step":
            out.append(f"compression {L.compression} with sync {L.sync}: compression applies to "
                       "the every_step exchange only")
        return out

    def check(self, L: Layout) -> None:
        bad = self.violations(L)
        if bad:
            raise ConfigError(f"layout {L.text()}: " + "; ".join(bad))

    # -- memory --------------------------------------------------------------------------------
    def memory(self, L: Layout) -> dict[int, dict]:
        """Breakdown of the ranks that can hold the most: {pp rank: breakdown}, tp and dp rank 0.

        Ranks holding the same layers (middle stages) differ only in the micro-batches in flight,
        which never grow with the rank in plait's schedules (1F1B: p − r; interleaved: 2(p−r−1) +
        (v−1)p + 1 chunks; GPipe, ZB-H1: the same on every rank; tests check it on the programs), so
        the first rank of each group of equal layers stands for the group."""
        ranks = self._representatives(L)
        states, acts = self._states(L, ranks), self._acts(L, ranks)
        out = {r: combine(states[r], acts[r]) for r in ranks}
        m = self.job.global_batch // (L.dp * L.micro_batch)
        if (
            L.zero == 3 and m > 1 and L.dp > 1
        ):  # FSDP2 accumulates unsharded gradients until each unit's last backward of the step
            for mem in out.values():
                mem["transient"] += 4 * mem["psi"]
                mem["total"] += 4 * mem["psi"]
        if L.dp > 1 and (L.compression != "none" or L.sync != "every_step"):
            for mem in out.values():  # residuals, outer copies (not checked against measurement)
                mem["low_comm_state"] = extra_state_bytes(L.compression, L.sync, mem["psi"], L.dp)
                mem["total"] += mem["low_comm_state"]
        return out

    def peak_memory(self, L: Layout) -> float:
        return max(x["total"] for x in self.memory(L).values())

    def _representatives(self, L: Layout) -> tuple[int, ...]:
        key = (L.tp, L.pp, L.virtual_stages)
        if key not in self._rep_cache:
            seen, reps = set(), []
            for r in range(L.pp):
                sig = tuple(rank_parts(self.shape, L.tp, L.pp, L.virtual_stages, r))
                if sig not in seen:
                    seen.add(sig)
                    reps.append(r)
            self._rep_cache[key] = tuple(reps)
        return self._rep_cache[key]

    def _states(self, L: Layout, ranks) -> dict[int, dict]:
        key = (L.tp, L.pp, L.virtual_stages, L.zero, L.dp)
        if key not in self._state_cache:
            self._state_cache[key] = {
                r: rank_state(self.shape, L, self.job.bucket_mb, r) for r in ranks
            }
        return self._state_cache[key]

    def _acts(self, L: Layout, ranks) -> dict[int, tuple[int, int]]:
        m = self.job.global_batch // (L.dp * L.micro_batch)
        key = (
            L.tp,
            L.pp,
            L.virtual_stages,
            L.schedule,
            L.micro_batch,
            L.activation_checkpointing,
            L.sequence_parallel,
            m,
        )
        if key not in self._act_cache:

            def peak(rank, per_chunk):
                return peak_in_flight(L.schedule, L.pp, m, L.virtual_stages, rank, tuple(per_chunk))

            self._act_cache[key] = {
                r: rank_activations(self.shape, L, self.job.seq_len, self.job.dtype, r, peak)
                for r in ranks
            }
        return self._act_cache[key]

    # -- time ----------------------------------------------------------------------------------
    def evaluate(self, L: Layout, timeline_path=None) -> dict:
        """Predicted step time, throughput, MFU and memory of one layout."""
        self.check(L)
        j = self.job
        m = j.global_batch // (L.dp * L.micro_batch)
        costs = self._stage_costs(L)
        p2p = self._p2p(L)
        if L.pp > 1:
            sim = simulate(L.schedule, L.pp, m, L.virtual_stages, costs, p2p)
            pipe, bubble = sim.makespan, sum(sim.bubbles) / L.pp
        else:
            pipe, bubble = m * (costs[0][0] + costs[1][0] + costs[2][0]), 0.0
        after, parts = self._after(L, costs)
        step = pipe + after
        mem = self.memory(L)
        top = max(mem, key=lambda r: mem[r]["total"])
        tps = j.tokens / step
        mfu = self.shape.flops_per_token(j.seq_len) * tps / (self.world * self.peak_per_rank())
        out = {
            **L.as_dict(),
            "micro_batches": m,
            "step_s": step,
            "tokens_per_s": tps,
            "mfu": mfu,
            "memory_bytes": mem[top]["total"],
            "memory": mem[top],
            "memory_rank0": mem[0],
            "fits": mem[top]["total"] <= self.cluster.usable_memory(),
            # a compressor or sync strategy: the loss per step differs from dense training
            "changes_optimization": L.compression != "none" or L.sync != "every_step",
            "time": {
                "pipeline_s": pipe,
                "bubble": bubble,
                "p2p_s": p2p,
                "forward_s": max(costs[0]),
                "backward_s": max(costs[1]),
                "weight_grad_s": max(costs[2]),
                **parts,
            },
        }
        if timeline_path is not None and L.pp > 1:
            from plait.planner.pipesim import gantt

            out["gantt"] = gantt(L.schedule, L.pp, m, L.virtual_stages, costs, p2p, timeline_path)
        return out

    # -- search --------------------------------------------------------------------------------
    def candidates(self):
        """Every layout the rules allow whose memory fits, as (layout, memory_bytes)."""
        sh, j, g = self.shape, self.job, self.cluster.gpus_per_node
        cap = self.cluster.usable_memory()
        for tp in divisors(self.world):
            if g % tp or not sh.tp_ok(tp):
                continue
            for pp in divisors(self.world // tp):
                dp = self.world // (tp * pp)
                if pp > sh.n_layers or j.global_batch % dp:
                    continue
                scheds = (
                    [("1f1b", 1)]
                    if pp == 1
                    else [(s, 1) for s in ("gpipe", "1f1b", "zb_h1")]
                    + [
                        ("interleaved_1f1b", v)
                        for v in range(2, MAX_VIRTUAL + 1)
                        if pp * v <= sh.n_layers
                    ]
                )
                for zero in (0, 1, 2, 3) if dp > 1 else (0,):
                    for sched, v in scheds:
                        if zero == 3 and pp > 1 and sched == "zb_h1":
                            continue
                        for comp, sync in self._exchanges(dp, tp, pp, zero):
                            base = Layout(dp, tp, pp, zero, 1, sched, v, compression=comp,
                                          sync=sync)
                            yield from self._fitting(base, cap)

    def _exchanges(self, dp: int, tp: int, pp: int, zero: int) -> list[tuple[str, str]]:
        """The config's (compression, sync), plus with --low-comm every variant where the dp group
        crosses nodes (ZeRO 0 only)."""
        own = (self.job.compression, self.job.sync)
        if own != ("none", "every_step") and zero:
            return []
        crosses = group_crosses(dp, tp, pp, self.cluster.gpus_per_node)[0]
        if not (self.low_comm and dp > 1 and crosses and zero == 0):
            return [own]
        return [own] + [x for x in variants() if x != own]

    def _fitting(self, base: Layout, cap: float):
        per_dp = self.job.global_batch // base.dp
        for ac in AC_MODES:
            for sp in (False, True) if base.tp > 1 else (False,):
                for mb in divisors(per_dp):
                    L = replace(
                        base, micro_batch=mb, activation_checkpointing=ac, sequence_parallel=sp
                    )
                    m = per_dp // mb
                    if L.pp > 1 and (m < L.pp or (L.schedule == "interleaved_1f1b" and m % L.pp)):
                        continue
                    total = self.peak_memory(L)
                    if total > cap:
                        break  # a larger micro-batch needs more
                    yield L, total

    def search(self, top: int = 10) -> dict:
        """The `top` fastest layouts that fit, best first, with counts of what was considered."""
        cands = [(self.lower_bound(L), L, mem) for L, mem in self.candidates()]
        cands.sort(key=lambda x: (x[0], x[1]))
        best: list[dict] = []
        simulated = 0
        for lb, L, _ in cands:
            if len(best) >= top and lb >= best[-1]["step_s"]:
                break
            best.append(self.evaluate(L))
            simulated += 1
            best.sort(key=lambda d: d["step_s"])
            del best[top:]
        return {"layouts": best, "fitting": len(cands), "simulated": simulated}
