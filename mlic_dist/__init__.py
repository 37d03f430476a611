"""mlic_dist: distributed training for multi-label image classification.

Data flow: `shard` (datasets -> WebDataset shards) -> `data` (DALI / torch loaders) -> `train`
(`train(cfg)` on Accelerate DDP, tracked by `tracking`) -> run directories (`rundir`) ->
`evaluate`, `predict`, `ensemble`, `report`, `export`; `sweep` runs grids of trainings on Ray
Tune, `demo` the paper in miniature. The layers and their import rules: docs/contracts.md
"Layout" (tests/test_layout.py).
"""
