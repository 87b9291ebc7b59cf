"""Seeded train/validation/test node splits (no global RNG)."""
from __future__ import annotations

import torch
from torch import Tensor


def _mask(num_nodes: int, index: Tensor) -> Tensor:
    mask = torch.zeros(num_nodes, dtype=torch.bool)
    mask[index] = True
    return mask


def _per_class_permutations(y: Tensor, generator: torch.Generator) -> list[Tensor]:
    """One random permutation of the node ids of each class, classes in order."""
    classes = torch.unique(y)
    return [(y == c).nonzero().view(-1)[torch.randperm(int((y == c).sum()), generator=generator)]
            for c in classes]


def planetoid_split(y: Tensor, train_per_class: int, num_val: int, num_test: int,
                    seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Planetoid-style split: ``train_per_class`` nodes of each class, then ``num_val``
    validation and ``num_test`` test nodes drawn from the remaining nodes.

    Args:
        y: node labels, shape ``[N]`` (long).
    Returns:
        ``(train_mask, val_mask, test_mask)``, each bool of shape ``[N]``, disjoint.
    """
    g = torch.Generator().manual_seed(seed)
    train = torch.cat([perm[:train_per_class] for perm in _per_class_permutations(y, g)])
    rest = _mask(y.numel(), train).logical_not().nonzero().view(-1)
    rest = rest[torch.randperm(rest.numel(), generator=g)]
    val, test = rest[:num_val], rest[num_val:num_val + num_test]
    return _mask(y.numel(), train), _mask(y.numel(), val), _mask(y.numel(), test)


def per_class_split(y: Tensor, train_per_class: int = 20, val_per_class: int = 30,
                    seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Shchur et al. (2018) split: per class ``train_per_class`` training and
    ``val_per_class`` validation nodes at random; every other node is a test node.

    Args:
        y: node labels, shape ``[N]`` (long).
    Returns:
        ``(train_mask, val_mask, test_mask)``, each bool of shape ``[N]``, disjoint, covering
        all nodes.
    """
    g = torch.Generator().manual_seed(seed)
    perms = _per_class_permutations(y, g)
    train = torch.cat([p[:train_per_class] for p in perms])
    val = torch.cat([p[train_per_class:train_per_class + val_per_class] for p in perms])
    test = torch.cat([p[train_per_class + val_per_class:] for p in perms])
    return _mask(y.numel(), train), _mask(y.numel(), val), _mask(y.numel(), test)
