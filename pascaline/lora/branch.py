"""The runtime low-rank branch: ``y = base(x) + strength * scale * up(down(x))`` on any linear.

``LoraBranch`` is a child module named ``lora_branch`` of the linear it adapts (an
``nn.Linear``, a ``QLinear`` of any scheme, any module with ``in_features``/``out_features``),
and a forward hook on that linear adds its output. Its tensors are plain NON-persistent
buffers, so:

- they live inside the owning block's module tree: ``BlockStreamer`` packs and streams them
  with their block and ``offload.plan.unit_sizes`` counts their bytes;
- the model's ``state_dict`` is unchanged, so strict loading of the base weights, saving a
  quantized file and ``QLinear``'s buffers are untouched;
- strengths are plain Python floats: changing one touches no tensor.

The downs of one LoRA's entries on a weight are concatenated (the q, k and v pieces of a
split-qkv LoRA on a fused ``qkv``: one GEMM for ``down``, then each ``up`` writes its rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pascaline.lora.keys import LoraEntry

BRANCH_NAME = "lora_branch"


@dataclass(frozen=True)
class _Piece:
    """One entry inside a group: its slice of the group's rank and the output rows it writes."""

    up: str  # buffer name
    ranks: tuple[int, int]
    rows: tuple[int, int] | None
    scale: float


@dataclass(frozen=True)
class _Group:
    """The entries of one LoRA on this weight, sharing one concatenated ``down``."""

    lora: int  # index of the LoRA (its strength is ``strengths[lora]``)
    down: str  # buffer name
    pieces: tuple[_Piece, ...]


class LoraBranch(nn.Module):
    """Low-rank deltas of one linear, applied at run time (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.groups: list[_Group] = []
        self.strengths: dict[int, float] = {}

    def set_entries_(
        self, items: list[tuple[int, LoraEntry]], dtype: torch.dtype | None, device: torch.device
    ) -> None:
        """Rebuild the buffers from ``(lora index, entry)`` pairs (``dtype`` None: the file's)."""
        for name in list(self._buffers):
            del self._buffers[name]
        self.groups = []
        by_lora: dict[int, list[LoraEntry]] = {}
        for lora, entry in items:
            by_lora.setdefault(lora, []).append(entry)
        for j, (lora, entries) in enumerate(by_lora.items()):
            down = torch.cat([e.down for e in entries])  # [sum r, in]
            self.register_buffer(f"down{j}", down.to(device, dtype or down.dtype), persistent=False)
            pieces, start = [], 0
            for k, e in enumerate(entries):
                self.register_buffer(
                    f"up{j}_{k}", e.up.to(device=device, dtype=dtype or e.up.dtype), persistent=False
                )  # [rows, r]
                pieces.append(_Piece(f"up{j}_{k}", (start, start + e.rank), e.rows, e.scale))
                start += e.rank
            self.groups.append(_Group(lora, f"down{j}", tuple(pieces)))
            self.strengths.setdefault(lora, 1.0)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # x: [..., in]; out: [..., out] the base layer's output, added to in place (its backward
        # does not read it); addmm_ writes each piece's rows without a temporary of the output
        out = out if out.is_contiguous() else out.contiguous()
        x2, o2 = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])  # [T, in], [T, out]
        for group in self.groups:
            strength = self.strengths[group.lora]
            if strength == 0.0:
                continue
            h = (x2 @ self._buffers[group.down].to(x.dtype).t()).to(out.dtype)  # [T, sum r]
            for p in group.pieces:
                up = self._buffers[p.up].to(out.dtype)  # [rows, r]
                rows = o2 if p.rows is None else o2[:, p.rows[0] : p.rows[1]]
                rows.addmm_(h[:, p.ranks[0] : p.ranks[1]], up.t(), alpha=strength * p.scale)
        return out

    def extra_repr(self) -> str:
        ranks = [sum(p.ranks[1] - p.ranks[0] for p in g.pieces) for g in self.groups]
        return f"loras={len(self.groups)}, ranks={ranks}"


def _add_branch(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return module.get_submodule(BRANCH_NAME)(args[0], output)


def attach_branch_(module: nn.Module) -> LoraBranch:
    """The module's ``LoraBranch``, created (with its forward hook) on first use."""
    branch = module._modules.get(BRANCH_NAME)
    if branch is None:
        branch = LoraBranch()
        module.add_module(BRANCH_NAME, branch)
        branch._hook = module.register_forward_hook(_add_branch)
    return branch


def detach_branch_(module: nn.Module) -> None:
    """Remove the module's branch and its hook (no-op without one)."""
    branch = module._modules.pop(BRANCH_NAME, None)
    if branch is not None:
        branch._hook.remove()
