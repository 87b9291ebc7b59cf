"""Model zoo with exact edge-weight semantics, training and checkpoints (``fm.models``).

Models: :class:`GCN`, :class:`GraphSAGE`, :class:`GIN`, :class:`GAT`,
:class:`GATv2`, :class:`SGC`, :class:`APPNP`, :class:`MLP`, all called as
``model(x, edge_index, edge_weight=None, batch=None)``; see :mod:`.zoo` for the
shared layout (``layers``, ``metamer_layers``, ``config``) and :mod:`.convs` for
the edge-weight semantics.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .training import PGDConfig, TrainResult, train
from .zoo import (
    ACTIVATIONS,
    APPNP,
    GAT,
    GCN,
    GIN,
    MLP,
    MODEL_NAMES,
    SGC,
    Block,
    GATv2,
    GraphSAGE,
    Readout,
    ZooModel,
    build_model,
)

__all__ = [
    "ACTIVATIONS",
    "APPNP",
    "GAT",
    "GATv2",
    "GCN",
    "GIN",
    "GraphSAGE",
    "MLP",
    "MODEL_NAMES",
    "SGC",
    "Block",
    "PGDConfig",
    "Readout",
    "TrainResult",
    "ZooModel",
    "build_model",
    "load_checkpoint",
    "save_checkpoint",
    "train",
]
