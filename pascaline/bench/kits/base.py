"""``BenchKit``: everything ``pascaline bench`` needs of one family's diffusion model.

The family declaration (``pascaline.families``) says what a model is; the kit says how to
benchmark it without weights: a config at a reduced and at full depth, the groups of
blocks timed apart and how many of each the full model has (the extrapolation), a
random-weight build per scheme, the forward inputs and the call, the diffusers twin and
its call, counted FLOPs and weight bytes for the projections, and the synthetic stage
models. The runner, the baseline, the stage run and the projections ask the kit and never
the family's name.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import torch
from torch import nn

from pascaline.bench.counters import ForwardFlops


class BenchKit:
    """Base of every family's kit (``bench/kits/<family name>.py`` defines ``KIT``)."""

    family_name: str = ""
    config_type: type = object  # the diffusion model's config class: how a config finds its kit
    model_label: str = "DiT"  # the table's name for the model
    cond_name: str = "caption"  # "<n> caption tokens" in the table
    diffusers_class: str = ""  # the diffusers twin, for the baseline's note
    has_encoder: bool = False  # whether the stage run has a synthetic encoder stage

    @cached_property
    def family(self):
        from pascaline.families import get_family

        return get_family(self.family_name)

    # --- configs and block groups ---------------------------------------------------------------

    def config(self, full, depth: int | str, dim: int | None = None):
        """``full`` (a variant's published config) at ``depth`` (``"full"``: as it is); ``dim``: a test width.

        ValueError for a depth below ``min_depth(full)``."""
        raise NotImplementedError

    def width(self, cfg) -> int:
        """The model's hidden width (the table's and the report's ``dim``)."""
        raise NotImplementedError

    def min_depth(self, full) -> int:
        """The least ``--depth`` that times a block of every group (1 unless a family needs more)."""
        return 1

    def depths(self, cfg) -> dict[str, int]:
        """Blocks per group in ``cfg``: the measured and the full counts of the extrapolation."""
        raise NotImplementedError

    def block_groups(self, model: nn.Module) -> dict[str, list[nn.Module]]:
        """Our model's blocks per group (the same keys as ``depths``)."""
        raise NotImplementedError

    def diffusers_block_groups(self, ref: nn.Module, cfg) -> dict[str, list[nn.Module]]:
        """The diffusers twin's blocks per group."""
        raise NotImplementedError

    def describe_blocks(self, measured: dict[str, int], full: dict[str, int]) -> str:
        """The table's account of the depth: ``"1 main + 1 + 1 refiner blocks (full: 30 + 2 + 2)"``."""
        raise NotImplementedError

    # --- build and run --------------------------------------------------------------------------

    def build(self, cfg, *, dtype: torch.dtype, quant: str | None = None, seed: int = 0,
              device: torch.device | str = "cpu") -> nn.Module:
        """A random-weight model in ``dtype`` (and ``quant`` scheme name, if any) on ``device``."""
        raise NotImplementedError

    def inputs(self, cfg, resolution: int, *, batch: int, cond_tokens: int, dtype: torch.dtype,
               device: torch.device | str, seed: int = 0, cond=None) -> tuple:
        """Seeded inputs of one forward; ``cond``: the encoder stage's output in place of random text."""
        raise NotImplementedError

    def forward(self, model: nn.Module, inputs: tuple) -> torch.Tensor:
        """Our forward: the raw output ``[B, C, h, w]``."""
        raise NotImplementedError

    def diffusers_twin(self, model: nn.Module) -> nn.Module:
        """The same (float) weights in the diffusers model, views where diffusers does not split them."""
        raise NotImplementedError

    def diffusers_forward(self, ref: nn.Module, inputs: tuple) -> torch.Tensor:
        """The twin's forward on the same inputs, as ``[B, C, h, w]``."""
        raise NotImplementedError

    # --- counted work for the projections -------------------------------------------------------

    def forward_flops(self, cfg, resolution: int, cond_tokens: int, batch: int) -> ForwardFlops:
        raise NotImplementedError

    def unit_bytes(self, cfg, storage: str, keep: str) -> list[tuple[str, int]]:
        """``(unit name, bytes)`` of every streamable block in execution order, stored as ``storage``."""
        raise NotImplementedError

    def other_bytes(self, cfg, keep: str) -> int:
        """Device bytes of everything outside the blocks (host-resident tables excepted)."""
        raise NotImplementedError

    def weight_bytes(self, cfg, storage: str, keep: str) -> int:
        """Device bytes of the whole model's weights: what one forward reads from VRAM."""
        return sum(b for _, b in self.unit_bytes(cfg, storage, keep)) + self.other_bytes(cfg, keep)

    # --- the synthetic stage models ------------------------------------------------------------

    def build_encoder(self, ctx) -> nn.Module:
        """The encoder stage's real-width random model (when ``has_encoder``)."""
        raise NotImplementedError

    def encode(self, encoder: nn.Module, ctx):
        """The conditioning ``inputs(cond=...)`` takes, from one encoder forward."""
        raise NotImplementedError

    def build_vae_decoder(self, ctx) -> nn.Module:
        """The FLUX.1-architecture decoder (Z-Image's and SD3's AE): real width, ``tiny`` at a test width."""
        from pascaline.bench.synthetic import build_vae_decoder

        variant = "flux" if ctx.real_width else "tiny"
        return build_vae_decoder(dtype=ctx.vae_dtype, device=ctx.device, variant=variant)


def grouped(blocks: Sequence[nn.Module], kinds: Sequence[str]) -> dict[str, list[nn.Module]]:
    """``blocks`` gathered by the kind of each (``kinds[i]`` is that of ``blocks[i]``)."""
    out: dict[str, list[nn.Module]] = {}
    for block, kind in zip(blocks, kinds, strict=True):
        out.setdefault(kind, []).append(block)
    return out
