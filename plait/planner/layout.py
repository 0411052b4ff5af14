"""One point of the search: how the ranks are split and how a step runs on them.

    dp × tp × pp = world; zero 0-3; micro_batch sequences per forward; schedule and virtual
    stages (pp > 1); activation checkpointing none | selective | full; sequence parallelism (tp > 1)

`parse("dp=2,tp=2,pp=1,zero=1,micro_batch=4,schedule=1f1b,virtual_stages=1,ac=none,sp=false",
world)` reads the `--layout` form (keys may be left out: dp defaults to what is left of the world,
the rest to plait's defaults); `apply(cfg)` writes a layout into a plait.config.Config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from plait.errors import ConfigError

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1")
AC_MODES = ("none", "selective", "full")
ALIASES = {
    "ac": "activation_checkpointing",
    "sp": "sequence_parallel",
    "v": "virtual_stages",
    "mb": "micro_batch",
    "micro_batch_size": "micro_batch",
}


@dataclass(frozen=True, order=True)
class Layout:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 0
    micro_batch: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1
    activation_checkpointing: str = "none"
    sequence_parallel: bool = False
    compression: str = "none"  # of the dp exchange (plait plan --low-comm only)
    sync: str = "every_step"  # sync strategy of the dp group (plait plan --low-comm only)

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    def normalized(self) -> Layout:
        """Without a pipeline the schedule is moot: store it as plait's default."""
        if self.pp == 1:
            return replace(self, schedule="1f1b", virtual_stages=1)
        return self

    def as_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        d = self.as_dict()
        d["ac"], d["sp"] = (
            d.pop("activation_checkpointing"),
            str(d.pop("sequence_parallel")).lower(),
        )
        return ",".join(f"{k}={v}" for k, v in d.items())

    def short(self) -> str:
        s = f"dp{self.dp} tp{self.tp} pp{self.pp} z{self.zero} mb{self.micro_batch}"
        if self.pp > 1:
            s += f" {self.schedule}" + (
                f"×{self.virtual_stages}" if self.virtual_stages > 1 else ""
            )
        if self.activation_checkpointing != "none":
            s += f" ac={self.activation_checkpointing}"
        s += " sp" if self.sequence_parallel else ""
        s += f" {self.compression}" if self.compression != "none" else ""
        return s + (f" {self.sync}" if self.sync != "every_step" else "")


def _value(key: str, raw: str):
    if key in ("schedule", "activation_checkpointing", "compression", "sync"):
        return raw
    if key == "sequence_parallel":
        if raw.lower() in ("true", "1", "yes", "on"):
            return True
        if raw.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"--layout sp={raw!r}: expected true or false")
    try:
        return int(raw)
    except ValueError as e:
        raise ConfigError(f"--layout {key}={raw!r}: expected an integer") from e


def parse(text: str, world: int | None = None, micro_batch: int | None = None) -> Layout:
    """The --layout string as a Layout (checked for form only; `search.check` checks it fully)."""
    known = set(Layout.__dataclass_fields__)
    kw: dict = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        if "=" not in item:
            raise ConfigError(f"--layout item {item!r} is not key=value (e.g. dp=2,tp=2)")
        k, raw = (x.strip() for x in item.split("=", 1))
        k = ALIASES.get(k, k)
        if k not in known:
            raise ConfigError(
                f"--layout key {k!r}: choose from {', '.join(sorted(known | set(ALIASES)))}"
            )
        kw[k] = _value(k, raw)
    if "micro_batch" not in kw and micro_batch:
        kw["micro_batch"] = micro_batch
    if "dp" not in kw:
        if world is None:
            raise ConfigError("--layout without dp= needs --world")
        rest = kw.get("tp", 1) * kw.get("pp", 1)
        if world % rest:
            raise ConfigError(f"--layout: tp × pp = {rest} does not divide --world {world}")
        kw["dp"] = world // rest
    lay = Layout(**kw)
    if lay.schedule not in SCHEDULES:
        raise ConfigError(
            f"--layout schedule={lay.schedule!r}: choose one of {', '.join(SCHEDULES)}"
        )
    from plait.planner.lowcomm import COMPRESSORS, STRATEGIES

    if lay.compression not in ("none", *COMPRESSORS):
        raise ConfigError(f"--layout compression={lay.compression!r}: choose one of none, "
                          f"{', '.join(COMPRESSORS)}")
    if lay.sync not in ("every_step", *STRATEGIES):
        raise ConfigError(f"--layout sync={lay.sync!r}: choose one of every_step, "
                          f"{', '.join(STRATEGIES)}")
    if lay.activation_checkpointing not in AC_MODES:
        raise ConfigError(
            f"--layout ac={lay.activation_checkpointing!r}: choose one of {', '.join(AC_MODES)}"
        )
    if world is not None and lay.world != world:
        raise ConfigError(
            f"--layout dp×tp×pp = {lay.dp}×{lay.tp}×{lay.pp} = {lay.world}, but --world is {world}"
        )
    return lay.normalized()


def apply(cfg, layout: Layout):
    """`cfg` (a plait.config.Config) with the layout's parallel and train keys set."""
    par = replace(
        cfg.parallel,
        dp=layout.dp,
        tp=layout.tp,
        pp=layout.pp,
        zero=layout.zero,
        schedule=layout.schedule,
        virtual_stages=layout.virtual_stages,
        microbatches=0,
        sequence_parallel=layout.sequence_parallel,
    )
    train = replace(
        cfg.train,
        micro_batch=layout.micro_batch,
        activation_checkpointing=layout.activation_checkpointing,
    )
    return replace(cfg, parallel=par, train=train,
                   compression=replace(cfg.compression, name=layout.compression),
                   sync=replace(cfg.sync, strategy=layout.sync))
