"""The pipeline: ``compress`` (prepare → run the stages → finalize → publish, in
``pipeline.compress``), the stages on a model in memory (``pipeline.run``: baseline, stage 1
in ``pipeline.stage1``, stage 2 in ``pipeline.stage2``, final fine-tune), the state they share
(``pipeline.context``) and resumable checkpoints (``pipeline.checkpoint``)."""

from flow_compress.pipeline.compress import compress
from flow_compress.pipeline.run import CompressionResult, make_context, run_pipeline

__all__ = ["CompressionResult", "compress", "make_context", "run_pipeline"]
