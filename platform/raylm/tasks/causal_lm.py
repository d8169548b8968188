"""Causal language modelling: next-token cross-entropy over blocks of `seq_len + 1` tokens; validated by the mean
loss over every token of the split and its perplexity; lower loss is better."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PERPLEXITY_CAP = 50.0
"""exp() of a loss above this overflows nothing, but says nothing either: an untrained model's perplexity is capped."""


def perplexity(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, PERPLEXITY_CAP))


def lm_loss(model, blocks: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of blocks of `seq_len + 1` tokens (inputs are all but the last token)."""
    logits = model(input_ids=blocks[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), blocks[:, 1:].reshape(-1), reduction=reduction)


class CausalLM:
    name = "causal_lm"
    metric = "val_loss"
    """What sweeps rank trials by and the eval gate compares versions by."""
    mode = "min"
    routes = frozenset({"completions", "chat"})
    """The serving routes whose outputs this task's models produce (the routes themselves live in `serving/`)."""

    def loss(self, model, batch: torch.Tensor) -> torch.Tensor:
        """The training loss of one micro batch (what backward runs on)."""
        return lm_loss(model, batch)

    def eval_sums(self, model, batch: torch.Tensor) -> torch.Tensor:
        """What validation adds up over the split, per batch: (loss summed over tokens, tokens)."""
        loss = lm_loss(model, batch, reduction="sum").detach().double()
        return torch.stack([loss, torch.tensor(batch[:, 1:].numel(), dtype=torch.float64, device=loss.device)])

    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        """The split's metrics from the sums of every batch on every rank."""
        loss = (sums[0] / sums[1].clamp(min=1)).item()
        return {"val_loss": loss, "val_ppl": perplexity(loss), "val_tokens": int(sums[1].item())}

    def better(self, value: float, than: float) -> bool:
        return value < than if self.mode == "min" else value > than
