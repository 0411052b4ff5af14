"""Config loading, overrides and the clear errors for bad input."""

import pytest

from plait.config import Config, load, to_toml, validate_layout
from plait.errors import ConfigError


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[train]\nsteps = 7\n[model]\npreset = "tiny"\n')
    cfg = load(f, ["parallel.dp=2", "optim.lr=0.5", "parallel.sequence_parallel=true",
                   "model.preset=124m"])
    assert cfg.train.steps == 7 and cfg.parallel.dp == 2 and cfg.optim.lr == 0.5
    assert cfg.parallel.sequence_parallel is True
    assert cfg.model.preset == "124m"  # overrides win over the file
    assert isinstance(cfg.optim.lr, float)


def test_frozen():
    cfg = Config()
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 3  # type: ignore[misc]


def test_round_trip_toml(tmp_path):
    cfg = load(None, ["train.steps=3", "data.cache_dir=/x y", "parallel.bucket_mb=0.5"])
    f = tmp_path / "r.toml"
    f.write_text(to_toml(cfg))
    assert load(f) == cfg


@pytest.mark.parametrize("override,fragment", [
    ("train.stpes=2", "did you mean 'steps'"),
    ("paralel.dp=2", "did you mean 'parallel'"),
    ("train.steps=0", "train.steps = 0: must be positive"),
    ("train.micro_batch=-1", "train.micro_batch = -1: must be positive"),
    ("parallel.tp=0", "parallel.tp = 0: must be positive"),
    ("train.steps=abc", "expected an integer"),
    ("train.global_batch=10", "not divisible by train.micro_batch"),
    ("model.preset=huge", "choose one of"),
    ("optim.name=adamw2", "did you mean 'adamw'"),
    ("data.path=/no/such/file", "data.path = '/no/such/file' does not exist"),
    ("parallel.zero=4", "choose 0, 1, 2 or 3"),
    ("compression.sign_chunk=100", "compression.sign_chunk = 100: must be a multiple of 8"),
    ("compression.sign_chunk=-8", "compression.sign_chunk = -8: must not be negative"),
    ("train.loss_scale_min=0", "train.loss_scale_min = 0.0: must be positive"),
    ("steps=3", "keys are section.name"),
    ("train.steps", "not key=value"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=None) as e:
        load(None, [override])
    assert fragment in str(e.value), str(e.value)


def test_layout_errors():
    cfg = load(None, ["parallel.dp=2", "parallel.tp=2"])
    with pytest.raises(ConfigError, match="= 4 ranks, but the world has 2 processes"):
        validate_layout(cfg, 2)
    cfg = load(None, ["train.global_batch=16", "train.micro_batch=8"])
    with pytest.raises(ConfigError, match="not divisible by train.micro_batch × dp"):
        validate_layout(cfg, 4)
    assert validate_layout(cfg, 2) == 2
    with pytest.raises(ConfigError, match="parallel.dp = 0"):
        validate_layout(load(None, ["parallel.tp=2"]), 3)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load("/nope.toml")


def test_unknown_section_in_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[trian]\nsteps = 3\n")
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        load(f)


def test_a_bare_word_is_the_string_it_spells_for_string_keys():
    # TOML reads nan and inf as floats; for a string-typed key the word itself is meant
    assert load(None, ["train.fault=nan"]).train.fault == "nan"
    assert load(None, ['train.fault="nan"']).train.fault == "nan"
    with pytest.raises(ConfigError, match="expected a number"):
        load(None, ["optim.lr=fast"])
