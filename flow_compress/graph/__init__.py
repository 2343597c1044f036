"""The structural view of a model: prunable groups (DepGraph, through torch-pruning), their
costs, removal and replay, and MACs counting. ``graph.adapter`` is the only module of the
library that imports torch-pruning."""

from flow_compress.graph.adapter import (
    LeftAlone,
    Member,
    PrunableGroup,
    PruningGraph,
    TapSpec,
    count_macs_params,
    replay_prune,
)
from flow_compress.graph.support import check_supported

__all__ = [
    "LeftAlone",
    "Member",
    "PrunableGroup",
    "PruningGraph",
    "TapSpec",
    "check_supported",
    "count_macs_params",
    "replay_prune",
]
