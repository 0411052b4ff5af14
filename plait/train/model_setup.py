"""What a run settles before it trains: the model (plait's GPT from [model], or the transformers
causal LM of model.hf) and its shape, and the layout checks that need the model (run by the
launcher before any worker starts, and by every rank)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from plait.config import Config, ConfigError, ModelConfig
from plait.models import GPT, GPTConfig, build_config, hf
from plait.parallel_spec import spec_of
from plait.pipeline.partition import partition, pipeline_spec


def model_config(m: ModelConfig, vocab_size: int, seq_len: int):
    over = {k: getattr(m, k) or None
            for k in ("n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_hidden")}
    cfg = build_config(m.preset, vocab_size=m.vocab_size or vocab_size,
                       tie_embeddings=m.tie_embeddings, **over)
    if seq_len > cfg.max_seq_len:
        cfg = build_config(m.preset, vocab_size=cfg.vocab_size, tie_embeddings=m.tie_embeddings,
                           max_seq_len=seq_len, **over)
    if cfg.d_model % cfg.n_heads:
        raise ConfigError(f"model.d_model = {cfg.d_model} is not divisible by model.n_heads = "
                          f"{cfg.n_heads}")
    if cfg.n_heads % cfg.kv_heads:
        raise ConfigError(f"model.n_heads = {cfg.n_heads} is not divisible by model.n_kv_heads = "
                          f"{cfg.kv_heads}")
    if cfg.head_dim % 2:
        raise ConfigError(f"head dimension d_model/n_heads = {cfg.head_dim} must be even (rotary "
                          "embeddings)")
    return cfg


def build_model(cfg: Config, vocab_size: int) -> tuple[nn.Module, GPTConfig, Callable | None]:
    """(model, its shape, init_weights for parallelize or None) for the run: the transformers
    model of model.hf (with weights: on the meta device, each rank reading its slices once the
    model is split; else a random initialization from train.seed), else plait's GPT from the
    current RNG state."""
    t = cfg.train
    if cfg.model.hf:
        config = hf.read_config(cfg.model.hf)
        hf.check_data(config, cfg.model.hf, vocab_size, t.seq_len)
        model, init_weights = hf.build_for_training(cfg.model.hf, t.seed)
        return model, hf.shape_of(config), init_weights
    shape = model_config(cfg.model, vocab_size, t.seq_len)
    return GPT(shape), shape, None


def _meta_model(cfg: Config) -> nn.Module:
    """The run's model on the meta device: nothing allocated or initialized."""
    with torch.device("meta"):
        if cfg.model.hf:
            return hf.CausalLM(hf.build_causal_lm(hf.read_config(cfg.model.hf)))
        return GPT(model_config(cfg.model, cfg.model.vocab_size or 256, cfg.train.seq_len))


def preflight(cfg: Config) -> None:
    """The layout checks that need the model (tp divides its heads, pp · virtual stages fit its
    blocks), run by the launcher before any worker starts and by every rank before any collective.
    The model is built on the meta device: nothing is allocated or initialized."""
    p = cfg.parallel
    if p.tp == 1 and p.pp == 1:
        return
    model = _meta_model(cfg)
    spec = spec_of(model)
    if p.tp > 1 and p.sequence_parallel and spec.no_sequence_parallel:
        raise ConfigError(f"parallel.sequence_parallel = true: {spec.no_sequence_parallel}; set "
                          "parallel.sequence_parallel=false")
    if p.tp > 1 and spec.check_tp is not None:
        spec.check_tp(model, p.tp)
    if p.pp > 1:
        partition(pipeline_spec(model), p.pp, p.virtual_stages)


def advice(cfg: Config) -> list[str]:
    """Settings that are valid but rarely what is meant, said before the run starts."""
    o = cfg.optim
    out = []
    if o.name == "lars" and o.lr < 0.1:
        out.append(f"optim.name = lars with optim.lr = {o.lr:g}: LARS scales each layer's step by "
                   "its trust ratio (0.001 × ‖w‖/‖g‖), so it wants a rate of order 1 (e.g. "
                   f"optim.lr=1.0); at {o.lr:g} the weights barely move")
    return out
