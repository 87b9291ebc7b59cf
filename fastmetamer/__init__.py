"""fastmetamer: model metamers of graph neural networks.

Generate graphs whose node features and edges differ wildly from a reference graph while a
trained GNN represents them identically, and measure what GNNs are blind to.

    import fastmetamer as fm
    graph = fm.datasets.load("synthetic")
    model = fm.models.GCN(graph.num_features, int(graph.y.max()) + 1)
    fm.models.train(model, graph)
    res = fm.generate(model, graph, node=0)
"""
from . import datasets, metrics, models, study
from .analysis.dimension import DimensionResult, metamer_dimension
from .metamers import MetamerResult, generate

__version__ = "0.1.0"
__all__ = ["generate", "MetamerResult", "metamer_dimension", "DimensionResult", "datasets", "metrics",
           "models", "study", "__version__"]
