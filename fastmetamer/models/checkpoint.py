"""Saving and loading zoo models as ``{"config": dict, "state_dict": dict}`` files."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .zoo import ZooModel, build_model


def save_checkpoint(model: ZooModel, path: str | os.PathLike) -> None:
    """Write ``{"config": model.config, "state_dict": model.state_dict()}`` to ``path``.

    Args:
        model: a zoo model (anything with a ``config`` dict accepted by ``build_model``).
        path: destination file.
    """
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or not isinstance(config, dict) or "name" not in config:
        raise TypeError("save_checkpoint needs a fastmetamer zoo model (an nn.Module with a config dict)")
    torch.save({"config": dict(config), "state_dict": model.state_dict()}, path)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> ZooModel:
    """Rebuild a model from a file written by :func:`save_checkpoint`.

    Args:
        path: checkpoint file.
        map_location: passed to ``torch.load`` (default ``"cpu"``).

    Returns:
        The model with its saved weights, in eval mode.
    """
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict) or not {"config", "state_dict"} <= set(checkpoint):
        raise ValueError(f"{path} is not a fastmetamer checkpoint (needs 'config' and 'state_dict')")
    model = build_model(**checkpoint["config"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()
