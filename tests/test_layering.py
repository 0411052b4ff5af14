"""The generic layers name no model: nothing under them imports plait.models (DESIGN §2).

Model knowledge reaches them through plait.parallel_spec (a model's ParallelSpec); a direct import
of plait.models from comm / tensor_parallel / pipeline / ... would bring a model back into them.
"""

from pathlib import Path

from import_graph import graph, module_imports

PLAIT = Path(__file__).resolve().parent.parent / "plait"
GENERIC = ("comm", "tensor_parallel", "pipeline", "data_parallel", "compression", "sync", "optim",
           "checkpoint")


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def model_imports(imports: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(generic module, the plait.models name it imports), sorted."""
    return sorted((mod, imp) for mod, names in imports.items()
                  if any(_under(mod, f"plait.{g}") for g in GENERIC)
                  for imp in names if _under(imp, "plait.models"))


def test_generic_layers_import_no_model():
    g = graph(PLAIT)
    assert {"plait.pipeline.partition", "plait.tensor_parallel.plan"} <= set(g)  # found them
    assert model_imports(g) == []


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_the_check_flags_each_way_of_importing_a_model(tmp_path):
    _write(tmp_path, {
        "plait/__init__.py": "",
        "plait/models/__init__.py": "",
        "plait/models/gpt.py": "",
        "plait/pipeline/__init__.py": "from . import fine\n",
        "plait/pipeline/fine.py": "import torch\nfrom plait.errors import ConfigError\n",
        "plait/pipeline/absolute.py": "import plait.models.gpt as gpt\n",
        "plait/pipeline/relative.py": "def f():\n    from ..models.gpt import Block\n",
        "plait/pipeline/sub/__init__.py": "",
        "plait/pipeline/sub/parent.py": "from ... import models\n",
        "plait/sync/__init__.py": "",
        "plait/sync/typing_only.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                      "    from plait.models import GPT\n"),
        "plait/trainer.py": "from plait.models import GPT\n",  # not a generic layer: allowed
    })
    g = graph(tmp_path / "plait")
    assert g["plait.pipeline"] == {"plait.pipeline", "plait.pipeline.fine"}
    assert module_imports(tmp_path / "plait/pipeline/sub/parent.py") == {"plait", "plait.models"}
    assert model_imports(g) == [
        ("plait.pipeline.absolute", "plait.models.gpt"),
        ("plait.pipeline.relative", "plait.models.gpt"),
        ("plait.pipeline.sub.parent", "plait.models"),
        ("plait.sync.typing_only", "plait.models"),
    ]


# -- the model's side: what the transforms read from a ParallelSpec --------------------------------
def test_transforms_read_the_models_spec():
    import pytest
    import torch.nn as nn

    from plait.activation_checkpointing import apply_activation_checkpointing
    from plait.errors import ConfigError
    from plait.models import GPT, GPT_SPEC, build_config
    from plait.parallel_spec import ParallelSpec, blocks_of, spec_of
    from plait.pipeline.partition import PipelineStage, partition, pipeline_spec
    from plait.tensor_parallel import plan_for

    class Net(nn.Module):  # a user's module describing itself
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))

        def parallel_spec(self):
            plan = (("body.0", "column"), ("body.1", "row"))
            return ParallelSpec(tp_plan=plan, block_types=(nn.Linear,))

    net = Net()
    assert plan_for(net) == (("body.0", "column"), ("body.1", "row"))
    assert apply_activation_checkpointing(net, "full") == 2
    with pytest.raises(ConfigError, match="attention core"):
        apply_activation_checkpointing(net, "selective")
    with pytest.raises(ConfigError, match="no tensor-parallel plan"):
        plan_for(nn.Sequential(nn.Linear(2, 2)))  # nothing described: an explicit plan is needed

    gpt = GPT(build_config("tiny", vocab_size=64, n_layers=2))
    assert spec_of(gpt) is GPT_SPEC  # registered beside the model, found by class
    spec = pipeline_spec(gpt)
    last = partition(spec, 2)[1]
    stage = PipelineStage([last], spec.shared, 1, 2, model_spec=spec_of(gpt))
    assert blocks_of(stage) == [gpt.blocks[1]]  # a stage answers with its model's spec
    assert blocks_of(PipelineStage([last], spec.shared, 1, 2)) == []
