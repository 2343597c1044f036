"""The pipeline: ``compress`` (prepare → run the stages → finalize → publish, in
``pipeline.compress``), the stages on a model in memory (``pipeline.run``: baseline, stage 1
in ``pipeline.stage1``, stage 2 in ``pipeline.stage2``, final fine-tune), the state they share
(``pipeline.context``), resumable checkpoints (``pipeline.checkpoint``) and the preflight that
answers before any training what a compression would meet (``pipeline.preflight``)."""

from flow_compress.pipeline.compress import compress
from flow_compress.pipeline.run import CompressionResult, make_context, run_pipeline

__all__ = ["CompressionResult", "compress", "make_context", "run_pipeline"]
