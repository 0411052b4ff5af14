"""Loading and writing the configuration: defaults <- TOML file <- `section.key=value` overrides.

Every invalid key or value raises ConfigError naming the key and the fix (plait.config.checks),
before any process group or file is touched.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, get_type_hints

from plait.config.checks import validate
from plait.config.schema import Config, suggest
from plait.errors import ConfigError


# -- loading -------------------------------------------------------------------------------
def _sections() -> dict[str, type]:
    return {f.name: get_type_hints(Config)[f.name] for f in fields(Config)}


def _coerce(key: str, value: Any, typ: type) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} = {value!r}: expected true or false")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} = {value!r}: expected an integer")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} = {value!r}: expected a number")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} = {value!r}: expected a string (quote it in TOML)")
    raise ConfigError(f"{key}: unsupported type {typ}")


ALIASES = {"checkpoint.async": "checkpoint.async_save"}  # names that are Python keywords


def _apply(cfg: Config, key: str, value: Any, raw: str | None = None) -> Config:
    key = ALIASES.get(key, key)
    parts = key.split(".")
    sections = _sections()
    if len(parts) != 2:
        raise ConfigError(f"{key!r}: keys are section.name, e.g. parallel.dp=2; sections: "
                          f"{', '.join(sections)}")
    sec, name = parts
    if sec not in sections:
        raise ConfigError(f"unknown config section {sec!r} in {key!r}{suggest(sec, sections)}; "
                          f"sections: {', '.join(sections)}")
    sec_type = sections[sec]
    hints = get_type_hints(sec_type)
    if name not in hints:
        raise ConfigError(f"unknown config key {key!r}{suggest(name, hints)}; "
                          f"keys of [{sec}]: {', '.join(hints)}")
    if hints[name] is str and not isinstance(value, str) and raw is not None:
        value = raw  # a bare word TOML reads otherwise (nan, inf, true) is the string it spells
    v = _coerce(key, value, hints[name])
    return replace(cfg, **{sec: replace(getattr(cfg, sec), **{name: v})})


def parse_override(text: str) -> tuple[str, Any]:
    """'parallel.dp=2' -> ('parallel.dp', 2). Values are TOML literals; bare words are strings."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. parallel.dp=2)")
    key, raw = text.split("=", 1)
    key, raw = key.strip(), raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def split_args(items: list[str]) -> tuple[str | None, list[str]]:
    """A command line's [CONFIG] [key=value ...] -> (config file or None, overrides)."""
    config, overrides = None, []
    for it in items:
        if "=" in it:
            overrides.append(it)
        elif config is None:
            config = it
        else:
            raise ConfigError(f"unexpected argument {it!r}: give at most one config file, then "
                              "key=value overrides")
    return config, overrides


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- TOML file <- overrides, then validated."""
    cfg = Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"config file {str(p)!r} does not exist: give the path of a TOML file")
        try:
            doc = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from e
        for sec, body in doc.items():
            if not isinstance(body, dict):
                raise ConfigError(f"{p}: top-level key {sec!r} must be a "
                                  f"[section]{suggest(sec, _sections())}")
            for name, value in body.items():
                cfg = _apply(cfg, f"{sec}.{name}", value)
    for text in overrides:
        key, value = parse_override(text)
        cfg = _apply(cfg, key, value, raw=text.split("=", 1)[1].strip())
    validate(cfg)
    return cfg


def from_dict(d: dict[str, dict[str, Any]]) -> Config:
    cfg = Config()
    for sec, body in d.items():
        for name, value in body.items():
            cfg = _apply(cfg, f"{sec}.{name}", value)
    validate(cfg)
    return cfg


# -- output --------------------------------------------------------------------------------
def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_toml(cfg: Config) -> str:
    out = []
    for sec, body in to_dict(cfg).items():
        out.append(f"[{sec}]")
        out += [f"{k} = {_toml_value(v)}" for k, v in body.items()]
        out.append("")
    return "\n".join(out)


