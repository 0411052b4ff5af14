"""Pipeline parallelism: the model split into stages over `mesh.pp`, micro-batches flowing through.

- `partition`: the layer protocol (a model's own pipeline cut, nn.Sequential, or
  `pipeline_layers()`), the balanced split into p·v stages, and `PipelineStage`, the module a
  rank keeps;
- `schedules`: GPipe, 1F1B, interleaved 1F1B and ZB-H1 as pure instruction generators;
  `simulate` checks them with no processes;
- `runtime`: `PipelineRunner`, the executor of one rank's program over batched p2p;
- `timeline`: the Chrome trace and Gantt chart of what each rank did when;
- `build`: `build_pipeline`, what `parallelize()` calls for pp > 1.

Import from the submodules: this package imports nothing, so the pure schedules can be read
without the runtime (plait.config checks a layout with `schedules.check`).
"""
