"""Reference models. No distributed code lives here.

`gpt.py` is the model; `gpt_spec.py` is how plait's parallel transforms split it (its
ParallelSpec, registered for the GPT class when this package is imported). `hf.py` builds
transformers causal LMs from a local directory and registers the finder of their spec
(`hf_spec.py`); transformers itself is imported only when such a model is built.
"""

from plait.models import hf
from plait.models.gpt import (
    GPT,
    PRESETS,
    GPTConfig,
    build_config,
    count_params,
    flops_per_token,
    lm_loss,
)
from plait.models.gpt_spec import GPT_PLAN, GPT_SPEC

__all__ = ["GPT", "GPTConfig", "GPT_PLAN", "GPT_SPEC", "PRESETS", "build_config", "count_params",
           "flops_per_token", "hf", "lm_loss"]
