"""Benchmarks of flow-compress, each runnable as ``python -m bench.<name> [--quick|--full]``.

- ``bench.quality``: IDAP++ against torch-pruning's L1, Taylor and random criteria at equal
  MACs targets and an identical optimisation budget, on real data.
- ``bench.latency``: measured speed-up of pruned models (eager, TorchScript, ONNX Runtime;
  CPU, and CUDA where present) next to their MACs ratio, with and without ``round_to``.
- ``bench.cost``: wall time per pipeline stage of one compression.
- ``bench.service``: sustained load against ``flow-compress serve`` on loopback.

Each writes ``results.json``, ``RESULTS.md`` and PNG plots into ``bench/results/<name>/``
(``--out`` moves them). Base models are trained once by the library's ``train`` and cached in
``bench/results/cache/``.
"""
