"""Metrics for scoring metamers against references (SPEC §4).

Activation distances, feature distances, structure distances, consistency scores and
cross-architecture recognisability. Functions take torch tensors and return Python floats,
dicts of floats, or float64 tensors for per-target variants.
"""
from .activation import (activation_distances, activation_loss, activation_loss_per_row, cosine,
                         cosine_per_row, pearson, snr_db, spearman)
from .consistency import consistency_scores, relevant_share
from .features import feature_cosine, feature_distances, hamming, jaccard, marginal_distance, relative_l2
from .recognisability import PairPredictions, bootstrap_ci, pivot_matrix, recognisability_matrix
from .structure import (degree_distance, edge_jaccard, spectral_distance, structure_distances,
                        wl_similarity)

__all__ = [
    "activation_loss", "activation_loss_per_row", "snr_db", "pearson", "spearman", "cosine",
    "cosine_per_row", "activation_distances",
    "feature_cosine", "relative_l2", "jaccard", "hamming", "marginal_distance", "feature_distances",
    "wl_similarity", "edge_jaccard", "degree_distance", "spectral_distance", "structure_distances",
    "consistency_scores", "relevant_share",
    "PairPredictions", "bootstrap_ci", "recognisability_matrix", "pivot_matrix",
]
