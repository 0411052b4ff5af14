"""The machines a plan is for: a TOML file, a shipped profile, or `local` (this machine, measured).

Keys (one `[cluster]` table):

    nodes, gpus_per_node          the device grid; ranks fill node 0 first (plait's rank order);
                                  nodes = 0: as many nodes as the world needs (a node type)
    gpu_memory_gb                 memory per device, GiB
    peak_tflops                   dense peak per device at the training dtype (bf16 tensor cores)
    intra_node_gbps               per-device bandwidth inside a node, one direction, Gbit/s
    inter_node_gbps               per-device share of the network between nodes (NIC rate), Gbit/s
    intra_node_latency_us, inter_node_latency_us    α of one message / one ring step
    matmul_efficiency             fraction of peak a large matrix multiply reaches (the calibration)
    attention_efficiency          the same for flash attention (0, the default: matmul_efficiency)
    memory_bandwidth_gbs          device memory bandwidth, GB/s (element-wise ops, optimizer step)
    comm_overlap                  true when communication runs beside compute (GPUs: copy engines,
                                  NCCL streams); false on CPUs, where gloo's threads take the cores
    memory_reserve_gb             per device, what the runtime keeps (CUDA context, allocator)
    reduce_scatter_as_allreduce   true where the backend runs reduce-scatter as an all-reduce (gloo)

`local` adds what `plait plan --calibrate` measured: `cores`, and a [matmul] table of achieved
FLOP/s by GEMM shape and thread count, per-element / per-tensor AdamW cost, per-block framework
overhead. It lives in ~/.cache/plait/local_cluster.toml (XDG_CACHE_HOME respected).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from plait.errors import ConfigError

PROFILES_DIR = Path(__file__).parent / "clusters"
KEYS_REQUIRED = (
    "nodes",
    "gpus_per_node",
    "gpu_memory_gb",
    "peak_tflops",
    "intra_node_gbps",
    "inter_node_gbps",
    "intra_node_latency_us",
    "inter_node_latency_us",
)


def local_profile_path() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "plait"
    return base / "local_cluster.toml"


@dataclass(frozen=True)
class Cluster:
    name: str
    nodes: int
    gpus_per_node: int
    gpu_memory_gb: float
    peak_tflops: float
    intra_node_gbps: float
    inter_node_gbps: float
    intra_node_latency_us: float
    inter_node_latency_us: float
    matmul_efficiency: float = 0.75
    memory_bandwidth_gbs: float = 2000.0
    comm_overlap: bool = True
    memory_reserve_gb: float = 1.0
    # gloo emulates reduce-scatter with a whole all-reduce (REFERENCE.md): it then takes that long
    reduce_scatter_as_allreduce: bool = False
    # measured on CPUs by --calibrate (empty on GPU profiles)
    cores: int = 0
    matmul_table: tuple = field(default=(), repr=False)  # ((threads, m, n, k, flop_per_s), ...)
    attention_table: tuple = field(
        default=(), repr=False
    )  # ((threads, seq, head_dim, flop_per_s), ...)
    attention_efficiency: float = (
        0.0  # GPUs: flash attention's fraction of peak; 0: matmul_efficiency
    )
    adam_s_per_elem: float = 0.0
    adam_s_per_tensor: float = 0.0
    block_overhead_s: float = 0.0  # framework time of one block's forward + backward with no work
    elementwise_gbs: float = 0.0  # CPU: measured bytes/s of element-wise ops on one thread
    source: str = ""

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def peak_flops(self) -> float:
        return self.peak_tflops * 1e12

    @property
    def is_cpu(self) -> bool:
        return bool(self.matmul_table)

    def link(self, inter: bool) -> tuple[float, float]:
        """(bytes/s, latency s) of the slowest link a group crossing nodes (inter) or not uses."""
        gbps, lat = (
            (self.inter_node_gbps, self.inter_node_latency_us)
            if inter
            else (self.intra_node_gbps, self.intra_node_latency_us)
        )
        return gbps * 1e9 / 8, lat * 1e-6

    def for_world(self, world: int) -> Cluster:
        """This cluster sized for `world` ranks; ConfigError when it has fewer devices."""
        need = -(-world // self.gpus_per_node)
        if self.nodes == 0:
            return replace(self, nodes=need)
        if world > self.world:
            raise ConfigError(
                f"--world {world}: cluster {self.name!r} has {self.world} devices "
                f"({self.nodes} nodes "
                f"× {self.gpus_per_node}); lower --world or give a larger cluster"
            )
        return self

    def usable_memory(self) -> float:
        return (self.gpu_memory_gb - self.memory_reserve_gb) * 2**30


def from_dict(d: dict, name: str = "custom") -> Cluster:
    body = d.get("cluster", d)
    missing = [k for k in KEYS_REQUIRED if k not in body]
    if missing:
        raise ConfigError(
            f"cluster {name!r}: missing keys {', '.join(missing)}; a cluster file needs "
            f"{', '.join(KEYS_REQUIRED)}"
        )
    known = {f.name for f in fields(Cluster)}
    unknown = [k for k in body if k not in known]
    if unknown:
        raise ConfigError(
            f"cluster {name!r}: unknown keys {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))}"
        )
    kw = {
        k: v
        for k, v in body.items()
        if k in known and k not in ("name", "matmul_table", "attention_table")
    }
    table = d.get("matmul", {}).get("rows", ())
    attn = d.get("attention", {}).get("rows", ())
    c = Cluster(
        name=body.get("name", name),
        matmul_table=tuple(tuple(r) for r in table),
        attention_table=tuple(tuple(r) for r in attn),
        **kw,
    )
    if int(c.gpus_per_node) < 1 or int(c.nodes) < 0:
        raise ConfigError(
            f"cluster {name!r}: gpus_per_node = {c.gpus_per_node} must be positive and nodes = "
            f"{c.nodes} at least 0 (0: as many as the world needs)"
        )
    for k in ("gpu_memory_gb", "peak_tflops", "intra_node_gbps", "inter_node_gbps"):
        if getattr(c, k) <= 0:
            raise ConfigError(f"cluster {name!r}: {k} = {getattr(c, k)} must be positive")
    return c


def shipped_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml")) + ["local"]


def load_cluster(spec: str | Cluster | None = "local") -> Cluster:
    """A Cluster from a path to a TOML file, a shipped profile name, or `local`."""
    if isinstance(spec, Cluster):
        return spec
    spec = spec or "local"
    path = Path(spec)
    if spec == "local":
        path = local_profile_path()
        if not path.is_file():
            raise ConfigError(
                f"the local cluster is not calibrated yet ({path} does not exist): run "
                f"`plait plan --calibrate` once (about a minute), or name another cluster "
                f"({', '.join(shipped_profiles())}, or a TOML file)"
            )
    elif not path.suffix and (PROFILES_DIR / f"{spec}.toml").is_file():
        path = PROFILES_DIR / f"{spec}.toml"
    if not path.is_file():
        raise ConfigError(
            f"--cluster {spec!r}: neither a TOML file nor a profile; profiles: "
            f"{', '.join(shipped_profiles())}"
        )
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"cluster file {str(path)!r} is not valid TOML: {e}") from e
    return from_dict(doc, name=spec if spec != "local" else "local")


def to_toml(c: Cluster) -> str:
    """The file form of a Cluster (what --calibrate writes)."""

    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace('"', "'") + '"'
        return repr(v)

    lines = ["[cluster]"]
    for f in fields(Cluster):
        if f.name not in ("matmul_table", "attention_table"):
            lines.append(f"{f.name} = {val(getattr(c, f.name))}")
    if c.matmul_table:
        lines += ["", "[matmul]  # threads, m, n, k, achieved FLOP/s", "rows = ["]
        lines += [f"  [{t}, {m}, {n}, {k}, {r:.6g}]," for t, m, n, k, r in c.matmul_table]
        lines.append("]")
    if c.attention_table:
        lines += [
            "",
            "[attention]  # threads, seq, head_dim, FLOP/s (12·s²·E per head counted)",
            "rows = [",
        ]
        lines += [f"  [{t}, {s}, {e}, {r:.6g}]," for t, s, e, r in c.attention_table]
        lines.append("]")
    return "\n".join(lines) + "\n"
