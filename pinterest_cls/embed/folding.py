"""Batch norm folded into the convolution before it, for inference on the eager PyTorch runtime.

In eval mode a batch norm is a per-channel affine map, so where it reads a convolution's output, and nothing else
does, ``w' = w * g / sqrt(v + eps)`` and ``b' = (b - m) * g / sqrt(v + eps) + beta`` give the same function in one
pass over the activations instead of two. OpenVINO folds them itself when it converts a model; eager PyTorch
does not, and in efficientnet_lite0 its batch norms take about a quarter of a CPU forward pass.

The pairs are found on the model's own forward pass, not by module names: a convolution module's output that is
the input of a batch norm module, is used by no other operation, is not an output of the model, and whose two
modules run once each. Any other batch norm is left as it is. The features change by floating-point rounding only
(row cosine 1 to within 1e-6), but not bit for bit, so the store records it (``extract.fold_bn``) and a store made
before it is resumed and embedded without folding.
"""

from __future__ import annotations

import collections
import copy

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


class _Uses(TorchFunctionMode):
    """Counts, per tensor (by identity), the operations that take it and give a tensor back."""

    def __init__(self):
        super().__init__()
        self.uses: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) or (isinstance(out, (tuple, list)) and any(
                isinstance(o, torch.Tensor) for o in out)):
            for a in (*args, *(kwargs or {}).values()):
                for t in (a if isinstance(a, (tuple, list)) else (a,)):
                    if isinstance(t, torch.Tensor):
                        self.uses[id(t)] += 1
        return out


def _replacement(bn: nn.Module) -> nn.Module | None:
    """What stays of a batch norm once folded: nothing, or the activation (and drop) of timm's ``BatchNormAct2d``;
    None for a batch norm of another kind, whose forward is not known."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if type(bn).__name__ == "BatchNormAct2d" and hasattr(bn, "act") and hasattr(bn, "drop"):
        return nn.Sequential(bn.drop, bn.act)
    return None


def _pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(convolution, batch norm) module names that can be folded, found on a forward pass of ``example``."""
    if model.training:
        raise ValueError("batch norm is folded for inference only: put the model in eval mode first")
    names = {m: n for n, m in model.named_modules()}
    produced, consumed, calls, keep = {}, {}, collections.Counter(), []
    counter = _Uses()

    def after_conv(module, inputs, output):
        calls[module] += 1
        produced[id(output)] = module
        counter.uses[id(output)] = 0  # counted from here: a tensor freed earlier may have had this identity
        keep.append(output)  # alive until the pass ends, so that no other tensor takes its identity

    def before_bn(module, inputs):
        calls[module] += 1
        consumed[module] = id(inputs[0]) if inputs and isinstance(inputs[0], torch.Tensor) else None

    hooks = [m.register_forward_hook(after_conv) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_pre_hook(before_bn) for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        with torch.inference_mode(), counter:
            out = model(example)
    finally:
        for h in hooks:
            h.remove()
    outputs = {id(t) for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)}
    pairs = []
    for bn, tid in consumed.items():
        conv = produced.get(tid)
        if (conv is None or tid in outputs or counter.uses[tid] != 1 or calls[conv] != 1 or calls[bn] != 1
                or bn.training or bn.running_mean is None or bn.running_var is None or _replacement(bn) is None
                or conv.out_channels != bn.num_features):
            continue
        pairs.append((names[conv], names[bn]))
    return pairs


def folded(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """``model`` itself where it has no batch norm to fold, else a copy of it with them folded (``example``: an
    input batch for the forward pass that finds them); the model given is left as it is."""
    pairs = _pairs(model, example)
    if not pairs:
        return model
    model = copy.deepcopy(model)
    _fold(model, pairs)
    return model


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> int:
    """Fold, in place, each batch norm of eval-mode ``model`` that only reads a convolution's output into that
    convolution (``example``: an input batch, for the forward pass that finds them); returns how many."""
    pairs = _pairs(model, example)
    _fold(model, pairs)
    return len(pairs)


@torch.no_grad()
def _fold(model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        shift = -bn.running_mean.double() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.double()
        bias = conv.bias.double() * scale + shift if conv.bias is not None else shift
        w = conv.weight
        conv.weight = nn.Parameter((w.double() * scale.view(-1, *[1] * (w.ndim - 1))).to(w.dtype),
                                   requires_grad=False)
        conv.bias = nn.Parameter(bias.to(w.dtype), requires_grad=False)
        parent_name, _, child = bn_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, _replacement(bn))
