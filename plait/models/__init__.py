"""Reference models. No distributed code lives here."""

from plait.models.gpt import GPT, PRESETS, GPTConfig, build_config, count_params, flops_per_token, lm_loss

__all__ = ["GPT", "GPTConfig", "PRESETS", "build_config", "count_params", "flops_per_token", "lm_loss"]
