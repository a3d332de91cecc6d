"""Merging LoRA deltas into weights: float, quantized (fresh scales) and at load time.

All deltas are computed in fp32: ``W[rows] += strength * scale * up @ down`` (a convolution's
``up [out, r, 1, 1]`` and ``down [r, in, kh, kw]`` flatten to the same product), then the sum
is cast back to the storage dtype once.

A quantized layer (anything with ``dequantize`` and ``state_from_float``, i.e. ``QLinear``
under int8, w8a8 or fp8) is dequantized, merged and requantized through its own
``state_from_float``, which computes FRESH scales from the merged weight. Reusing the old
scales would clip rows the delta pushes past the old absmax; even fresh scales round away
the parts of a delta below half a quantization step, because the dequantized weight already
sits on the grid (see ``pascaline.lora.apply`` for when the runtime branch is used instead).

``merged_tensors`` merges while a model loads, before quantize-on-load: the one place where
a fixed LoRA on a quantized model costs nothing at run time and loses nothing to the grid.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from pascaline.errors import LoraError
from pascaline.lora.files import LoraFile
from pascaline.lora.keys import LoraEntry, LoraTargets, resolve


def add_deltas_(weight: torch.Tensor, items: Iterable[tuple[float, LoraEntry]]) -> torch.Tensor:
    """Add ``strength * scale * up @ down`` of each ``(strength, entry)`` to an fp32 ``weight`` in place."""
    for strength, entry in items:
        s = strength * entry.scale
        if s == 0.0:
            continue
        up = entry.up.to(weight.device, torch.float32).flatten(1)  # [rows, r]
        down = entry.down.to(weight.device, torch.float32).flatten(1)  # [r, in * kh * kw]
        rows = weight if entry.rows is None else weight[entry.rows[0] : entry.rows[1]]
        rows.view(rows.shape[0], -1).add_(up @ down, alpha=s)
    return weight


def fp32_copy(t: torch.Tensor) -> torch.Tensor:
    """A new contiguous fp32 tensor with ``t``'s values (never ``t`` itself, whatever its dtype)."""
    return torch.empty(t.shape, dtype=torch.float32, device=t.device).copy_(t.detach())


def is_float_weighted(module: nn.Module) -> bool:
    """A module whose ``weight`` is a plain float tensor (``nn.Linear``, ``nn.Conv2d``)."""
    weight = module._parameters.get("weight", module._buffers.get("weight"))
    return isinstance(weight, torch.Tensor) and weight.is_floating_point()


def is_requantizable(module: nn.Module) -> bool:
    """A quantized layer that can give its float weight and take a new one (``QLinear``)."""
    return all(callable(getattr(module, name, None)) for name in ("dequantize", "state_from_float"))


@torch.no_grad()
def merge_into_(module: nn.Module, items: Sequence[tuple[float, LoraEntry]]) -> None:
    """Add the deltas to the module's weights: new tensors, the old ones are left untouched."""
    if is_float_weighted(module):
        weight = module.weight
        merged = add_deltas_(fp32_copy(weight), items)
        weight.data = merged.to(weight.dtype)
        return
    merged = add_deltas_(module.dequantize(torch.float32), items)  # [N, K] fp32
    for name, tensor in module.state_from_float("weight", merged).items():
        module._buffers[name] = tensor.to(module._buffers[name].device)


def own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's own parameters' and buffers' tensors (not its children's), on the host."""
    own = {**module._parameters, **module._buffers}
    return {name: t.detach().to("cpu") for name, t in own.items() if t is not None}


@torch.no_grad()
def restore_(module: nn.Module, originals: dict[str, torch.Tensor]) -> None:
    """Put back tensors saved by ``own_tensors`` (on the module's current device)."""
    for name, saved in originals.items():
        if name in module._parameters:
            param = module._parameters[name]
            param.data = saved.to(param.device)
        else:
            module._buffers[name] = saved.to(module._buffers[name].device)


def merged_tensors(
    tensors: Iterable[tuple[str, torch.Tensor]], loras: Sequence[tuple[LoraFile, float]], targets: LoraTargets
) -> Iterator[tuple[str, torch.Tensor]]:
    """Merge LoRAs into a loader's ``(canonical key, tensor)`` stream, before any cast or quantization.

    ``targets`` is the family's key map over the model being loaded (it may be on ``meta``).
    Merged weights come out in fp32 (the loader casts or quantizes them as it would the
    file's). The model then holds plain weights: the LoRA cannot be removed or re-weighted
    without reloading. Raises ``LoraError`` when a target weight never came as a float
    tensor (a pre-quantized file: apply the LoRA to the loaded model instead).
    """
    by_weight: dict[str, list[tuple[float, LoraEntry]]] = {}
    for lora, strength in loras:
        for entry in resolve(lora, targets):
            by_weight.setdefault(entry.module + ".weight", []).append((float(strength), entry))
    for key, tensor in tensors:
        items = by_weight.pop(key, None)
        if items is not None and tensor.is_floating_point():
            tensor = add_deltas_(fp32_copy(tensor), items)
        elif items is not None:
            by_weight[key] = items
        yield key, tensor
    if by_weight:
        missing = ", ".join(sorted(by_weight)[:3])
        raise LoraError(
            f"the weights file has no float tensor for {missing}, so a LoRA cannot be merged "
            "while loading (a pre-quantized file?); load the model, then apply the LoRA to it."
        )
