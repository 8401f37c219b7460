"""What an integration reads from a training forward it measures: the batch's shape (for the rank
file header's sequence length) and the loss (for the step record)."""

from __future__ import annotations

from typing import Any

import torch


def batch_shape(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...] | None:
    """The shape of the forward's ``input_ids`` (else its first tensor argument), or None."""
    ids = kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        ids = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if not isinstance(ids, torch.Tensor):
        ids = next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
    return tuple(int(d) for d in ids.shape) if isinstance(ids, torch.Tensor) else None


def loss_of(out: Any) -> torch.Tensor | None:
    """The one-element loss tensor of a forward's output (HF ``ModelOutput.loss``, a dict's
    ``loss``, or the output itself), or None."""
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if loss is None and isinstance(out, torch.Tensor) and out.numel() == 1:
        loss = out
    return loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None
