"""The plain PyG/autograd way of writing the metamer loop: the baseline every benchmark compares to.

It does the same work as ``fastmetamer.generate`` for binary features: straight-through top-rho
selection (``torch.topk``), the margin term, the relative activation-matching loss through the
unmodified PyG model, and ``torch.optim.Adam``. Node metamers loop over k-hop subgraphs (with
one extra hop, so the subgraph reproduces the target's activation exactly).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.utils import k_hop_subgraph


def feature_metamer(model: nn.Module, x: Tensor, edge_index: Tensor, targets: Tensor | None,
                    steps: int, lr: float = 0.1, slope: float = 1.0, margin: float = 0.05,
                    margin_weight: float = 0.1, seed: int = 0) -> list[float]:
    """Optimise all rows of binary ``x`` [n, d] so ``model``'s output at ``targets`` (None: all)
    matches the reference; returns the per-step loss."""
    rows = slice(None) if targets is None else targets
    with torch.no_grad():
        target = model(x, edge_index)[rows]
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=gen).to(x.device)
    theta = (x.mean(0) + x.std(0, unbiased=False) * noise).requires_grad_()
    k = int(x.sum())
    opt = torch.optim.Adam([theta], lr=lr)
    history = []
    for _ in range(steps):
        prob = torch.sigmoid(slope * theta)
        top = torch.topk(prob.detach().flatten(), min(k + 1, prob.numel()))
        hard = torch.zeros(prob.numel(), device=x.device).index_fill_(0, top.indices[:k], 1.0).view_as(prob)
        threshold = 0.5 * (top.values[k - 1] + top.values[-1])
        x_metamer = prob + (hard - prob).detach()
        out = model(x_metamer, edge_index)[rows]
        loss = (out - target).pow(2).sum() / target.pow(2).sum()
        penalty = margin_weight * torch.relu(margin - (prob - threshold).abs()).mean()
        opt.zero_grad()
        (loss + penalty).backward()
        opt.step()
        history.append(loss.detach())  # no host read per step (on a GPU it would wait for the step)
    return torch.stack(history).tolist()


def node_metamers(model: nn.Module, x: Tensor, edge_index: Tensor, nodes: list[int], hops: int,
                  steps: int, **kwargs) -> list[list[float]]:
    """One feature metamer per node, each on its own (hops+1)-hop subgraph, in a Python loop."""
    histories = []
    for node in nodes:
        subset, sub_edges, mapping, _ = k_hop_subgraph(node, hops + 1, edge_index, relabel_nodes=True,
                                                       num_nodes=x.shape[0])
        histories.append(feature_metamer(model, x[subset], sub_edges, mapping, steps, **kwargs))
    return histories
