"""Optional int8 quantization for CPU serving (`serve.quantize: int8`), with torchao's `quantize_` (the maintained
successor of `torch.ao.quantization.quantize_dynamic`): int8 weights, activations quantized per token on the fly.

GPT-2's blocks hold their projections in HF `Conv1D` (`x @ W + b`, weight stored in x out), not `nn.Linear`, and
torchao quantizes only `nn.Linear`: each `Conv1D` is first replaced by the `nn.Linear` that computes the same thing,
so what is really there gets quantized. Embeddings (and the output head tied to them) stay in full precision.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from raylm.errors import RunError


class QuantizeError(RunError):
    """Quantization was asked for and cannot be done here."""


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace every HF `Conv1D` by an equal `nn.Linear`; returns how many were replaced."""
    from transformers.pytorch_utils import Conv1D

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                fan_in, fan_out = child.weight.shape
                linear = nn.Linear(fan_in, fan_out, bias=child.bias is not None, dtype=child.weight.dtype)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                setattr(parent, name, linear)
                replaced += 1
    return replaced


def quantize_int8(model: nn.Module) -> float:
    """Quantize the model's linear layers in place; returns the fraction of its weights now stored in int8."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        except ImportError:
            raise QuantizeError("serve.quantize=int8 needs torchao: pip install 'raylm[quantize]'") from None

        conv1d_to_linear(model)
        head = model.get_output_embeddings()
        # The output head is the (tied) embedding matrix: quantizing it would quantize the embeddings too.
        quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, _: _is_body_linear(m, head))
    return int8_fraction(model)


def _is_body_linear(module: nn.Module, head: nn.Module | None) -> bool:
    return isinstance(module, nn.Linear) and module is not head


def int8_fraction(model: nn.Module) -> float:
    """Weights held in int8, as a fraction of all weight elements (tied ones counted once)."""
    seen, total, quantized = set(), 0, 0
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
        if "int8" in type(parameter.data).__name__.lower() or getattr(parameter, "dtype", None) == torch.int8:
            quantized += parameter.numel()
    return quantized / total if total else 0.0
