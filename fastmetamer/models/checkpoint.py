"""Saving and loading zoo models as ``{"config": dict, "state_dict": dict}`` files."""

from __future__ import annotations

import os

import torch
from torch import nn

from .zoo import ZooModel, build_model


def save_checkpoint(model: ZooModel, path: str | os.PathLike) -> None:
    """Write ``{"config": model.config, "state_dict": model.state_dict()}`` to ``path``, the
    weights on the CPU (a checkpoint from a GPU loads on any machine).

    Args:
        model: a zoo model (anything with a ``config`` dict accepted by ``build_model``).
        path: destination file.
    """
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or not isinstance(config, dict) or "name" not in config:
        raise TypeError("save_checkpoint needs a fastmetamer zoo model (an nn.Module with a config dict)")
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    torch.save({"config": dict(config), "state_dict": state}, path)


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> ZooModel:
    """Rebuild a model from a file written by :func:`save_checkpoint`.

    Args:
        path: checkpoint file.
        device: where the model is placed (default ``"cpu"``).

    Returns:
        The model with its saved weights, in eval mode.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or not {"config", "state_dict"} <= set(checkpoint):
        raise ValueError(f"{path} is not a fastmetamer checkpoint (needs 'config' and 'state_dict')")
    model = build_model(**checkpoint["config"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval()
