"""Tiled VAE decode within a memory budget.

At 1024² the FLUX decoder's full-resolution activations (256 channels at 1024×1024) are
the largest tensors of the whole pipeline: about 2.5 GiB in fp32, the most common
out-of-memory point on an 8 GB card. Decoding overlapping latent tiles bounds that peak
by the tile's area; the overlaps are blended with cosine ramps so no seam shows.

- ``estimate_decode_peak_bytes`` walks the decoder level by level and counts the bytes
  alive at each step of ``models.flux_vae`` forwards (they free eagerly and activate in
  place); ``plan_decode_tiles`` picks the largest tile whose estimate fits a budget.
  Both are pure functions of sizes.
- ``decode_tiled`` runs a plan with any ``decode_fn`` (raw latent -> pixels). When a
  decode runs out of device memory it retries with smaller tiles; the decode function is
  an argument, so tests inject a fake out-of-memory error on the CPU.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from pascaline.errors import BudgetError, InvalidArgumentError
from pascaline.models.flux_vae import ATTN_SCORES_PER_CHUNK, VARIANTS, FluxVAEConfig

MIN_TILE = 16  # latent pixels per side: 128 image pixels
GRANULE = 8  # tile sizes are multiples of this (latent pixels)
# Margin for what the walk does not count: allocator rounding, GroupNorm statistics.
# With it the estimate of a 1024² decode is ~5-10% above the peak measured on an H100
# (cuDNN 9.19); see the report.
MARGIN = 1.1


def _conv(live: int, c_in: int, c_out: int) -> int:
    # A convolution's moment: the tensors alive plus cuDNN's working copies of its input
    # and output (layout transforms). Measured on an H100, fp32 and bf16 alike: the
    # upsample conv and the channel-changing resnets peak at exactly live + in + out.
    return live + c_in + c_out


def _resnet_peak(c_in: int, c_out: int) -> int:
    # Elements per pixel alive inside ResnetBlock.forward; x is held for the residual.
    conv1 = _conv(2 * c_in + c_out, c_in, c_out)  # x, norm1(x), conv1 output
    conv2 = _conv(c_in + 2 * c_out, c_out, c_out)  # x, norm2(h), conv2 output
    if c_in != c_out:
        shortcut = _conv(c_in + 2 * c_out, c_in, c_out)  # x, h, nin(x)
        return max(conv1, conv2, shortcut)
    # A same-width resnet measured 6c where the walk says 5c (workspace, on the H100). It is
    # never the decoder's peak step, but the encoder's full-resolution resnets are its peak.
    return max(conv1, conv2) + c_out


def _upsample_peak(c: int) -> int:
    # Per input pixel: x, nearest ×2 (4 pixels), the conv output (4 pixels).
    return _conv(c + 4 * c + 4 * c, 4 * c, 4 * c)


def decoder_param_count(config: FluxVAEConfig) -> int:
    """Parameters of the decoder, from the config alone (49,545,475 for FLUX)."""

    def conv(i: int, o: int, k: int = 3) -> int:
        return i * o * k * k + o

    def res(i: int, o: int) -> int:
        return 2 * i + conv(i, o) + 2 * o + conv(o, o) + (conv(i, o, 1) if i != o else 0)

    widths, top = config.widths, config.widths[-1]
    n = conv(config.z_channels, top) + 2 * res(top, top) + 2 * top + 4 * conv(top, top, 1)
    c_in = top
    for i in reversed(range(len(widths))):
        n += sum(res(c_in if j == 0 else widths[i], widths[i]) for j in range(config.num_res_blocks + 1))
        n += conv(widths[i], widths[i]) if i else 0
        c_in = widths[i]
    return n + 2 * widths[0] + conv(widths[0], config.out_ch)


def _item(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def head_steps(h: int, w: int, dtype: torch.dtype, config: FluxVAEConfig) -> list[tuple[str, int]]:
    """(step, activation bytes alive) of ``Decoder.head`` (conv_in + mid) on an h×w latent."""
    top, hw, item = config.widths[-1], h * w, _item(dtype)
    # Attention: x, norm(x), q, k, v and a conv output at once, plus one query chunk's
    # fp32 scores (measured: below this bound).
    chunk = min(hw, max(1, ATTN_SCORES_PER_CHUNK // hw))
    return [
        ("conv_in", _conv(config.z_channels + top, config.z_channels, top) * hw * item),
        ("mid.block_1", _resnet_peak(top, top) * hw * item),
        ("mid.attn_1", 6 * top * hw * item + chunk * hw * 4),
        ("mid.block_2", _resnet_peak(top, top) * hw * item),
    ]


def tail_steps(h: int, w: int, dtype: torch.dtype, config: FluxVAEConfig) -> list[tuple[str, int]]:
    """(step, activation bytes alive) of ``Decoder.tail`` (up path + output) for an h×w latent."""
    widths, item = config.widths, _item(dtype)
    levels = len(widths)
    pixels = [h * w * 4 ** (levels - 1 - i) for i in range(levels)]  # pixels[0]: full resolution
    steps, c_in = [], widths[-1]
    for i in reversed(range(levels)):
        c = widths[i]
        steps.append((f"up.{i}.block.0", _resnet_peak(c_in, c) * pixels[i] * item))
        steps.append((f"up.{i}.block.1+", _resnet_peak(c, c) * pixels[i] * item))
        if i:
            steps.append((f"up.{i}.upsample", _upsample_peak(c) * pixels[i] * item))
        c_in = c
    out = _conv(2 * widths[0] + config.out_ch, widths[0], config.out_ch)  # x, norm_out(x), output
    steps.append(("norm_out+conv_out", out * pixels[0] * item))
    return steps


def _peak(steps: list[tuple[str, int]]) -> int:
    return max(b for _, b in steps)


def estimate_decode_peak_bytes(
    h: int,
    w: int,
    dtype: torch.dtype = torch.float32,
    config: FluxVAEConfig | None = None,
    *,
    batch: int = 1,
    include_weights: bool = True,
) -> int:
    """Estimated peak device bytes of one untiled decode of a ``[batch, z, h, w]`` latent.

    Counts the activations alive at the worst step (for FLUX the last upsample: 256
    channels at full resolution, with cuDNN's working copies), times ``MARGIN``, plus the fp32 copy of the
    output and, when ``include_weights``, the decoder weights. ``dtype`` is the compute
    dtype (fp32 or bf16). The 1024² FLUX decode: ``estimate_decode_peak_bytes(128, 128,
    torch.float32)``; for a plan see ``estimate_plan_peak_bytes``.
    """
    config = config or VARIANTS["flux"]
    item = _item(dtype)
    act = batch * max(_peak(head_steps(h, w, dtype, config)), _peak(tail_steps(h, w, dtype, config)))
    out = batch * config.out_ch * h * w * config.downscale**2 * 4
    weights = decoder_param_count(config) * item if include_weights else 0
    return int(act * MARGIN) + out + weights


@dataclass(frozen=True)
class TilePlan:
    """Latent tiles for one decode: square ``tile`` windows sharing ``overlap`` pixels.

    ``global_mid``: the mid block (whose attention is global) runs once on the whole
    latent and only the up path is tiled, so tiles agree on global context; else every
    tile runs the whole decoder. A tile at least as large as the latent means one
    untiled decode.
    """

    h: int
    w: int
    tile: int
    overlap: int
    global_mid: bool = True

    @property
    def single(self) -> bool:
        return self.tile >= self.h and self.tile >= self.w

    def starts(self, length: int) -> list[int]:
        """Evenly spread tile starts along one axis; neighbours overlap by >= ``overlap``."""
        if self.tile >= length:
            return [0]
        n = math.ceil((length - self.overlap) / (self.tile - self.overlap))
        return [round(i * (length - self.tile) / (n - 1)) for i in range(n)]

    def windows(self) -> list[tuple[slice, slice]]:
        """(rows, cols) latent slices, row-major."""
        th, tw = min(self.tile, self.h), min(self.tile, self.w)
        return [
            (slice(y, y + th), slice(x, x + tw)) for y in self.starts(self.h) for x in self.starts(self.w)
        ]

    def smaller(self) -> TilePlan | None:
        """The next plan after the tiles ran out of memory, or None at the smallest tile."""
        current = min(self.tile, max(self.h, self.w))
        if current <= MIN_TILE:
            return None
        tile = max(MIN_TILE, (current * 3 // 4) // GRANULE * GRANULE)
        return tile_plan(self.h, self.w, tile, global_mid=self.global_mid)


def default_overlap(tile: int) -> int:
    """A quarter of the tile, at least 2 latent pixels (16 image pixels)."""
    return max(2, tile // 4)


def tile_plan(
    h: int, w: int, tile: int | None = None, overlap: int | None = None, *, global_mid: bool = True
) -> TilePlan:
    """A plan with a given tile size (None: one tile); checks the numbers."""
    tile = max(h, w) if tile is None else int(tile)
    overlap = default_overlap(tile) if overlap is None else int(overlap)
    if tile >= max(h, w):
        return TilePlan(h, w, tile, 0, global_mid)
    if tile < 4 or not 0 <= overlap <= tile // 2:
        raise InvalidArgumentError(
            f"a VAE tile of {tile} latent pixels with overlap {overlap} is impossible; "
            "use a tile of at least 4 and an overlap of at most half the tile."
        )
    return TilePlan(h, w, tile, overlap, global_mid)


def estimate_plan_peak_bytes(
    plan: TilePlan, dtype: torch.dtype, config: FluxVAEConfig | None = None, *, batch: int = 1
) -> int:
    """Estimated peak device bytes of decoding with ``plan``, weights and fp32 canvas included."""
    config = config or VARIANTS["flux"]
    if plan.single:
        return estimate_decode_peak_bytes(plan.h, plan.w, dtype, config, batch=batch)
    item, f = _item(dtype), config.downscale
    th, tw = min(plan.tile, plan.h), min(plan.tile, plan.w)
    tail = _peak(tail_steps(th, tw, dtype, config))
    if plan.global_mid:
        # The mid block's output for the whole latent stays alive while the tiles decode.
        feats = config.widths[-1] * plan.h * plan.w * item
        act = max(_peak(head_steps(plan.h, plan.w, dtype, config)), tail + feats)
    else:
        act = max(_peak(head_steps(th, tw, dtype, config)), tail)
    # fp32 canvas, plus a tile's fp32 pixels and its weighted copy.
    pixels = config.out_ch * f * f * (plan.h * plan.w + 2 * th * tw) * 4
    return int(batch * act * MARGIN) + batch * pixels + decoder_param_count(config) * item


def _candidates(h: int, w: int) -> list[int]:
    top = max(h, w)
    sizes = {top, *range(GRANULE, top, GRANULE)}
    return sorted((s for s in sizes if s >= min(MIN_TILE, top)), reverse=True)


def plan_decode_tiles(
    h: int,
    w: int,
    dtype: torch.dtype,
    budget_bytes: int,
    *,
    config: FluxVAEConfig | None = None,
    batch: int = 1,
) -> TilePlan:
    """The largest square tile whose estimated decode peak fits ``budget_bytes``.

    ``budget_bytes`` is what the decode may use on the device, the decoder's weights and
    the fp32 output canvas included. One tile (no tiling) when the whole latent fits; a
    global mid block when it fits beside the tiles; a smaller budget never gives a larger
    tile. Raises ``BudgetError`` naming both numbers when even the smallest tile does not fit.
    """
    config = config or VARIANTS["flux"]
    need = 0
    for tile in _candidates(h, w):
        for global_mid in (True, False):
            plan = tile_plan(h, w, tile, global_mid=global_mid)
            need = estimate_plan_peak_bytes(plan, dtype, config, batch=batch)
            if need <= budget_bytes:
                return plan
    raise BudgetError(
        f"the VAE decode needs about {need / 2**20:,.0f} MiB even with the smallest tile "
        f"({min(MIN_TILE, h)}×{min(MIN_TILE, w)} latent pixels) but the budget is "
        f"{budget_bytes / 2**20:,.0f} MiB; raise the VRAM budget or decode on the CPU."
    )


def _ramp(length: int, start: int, stop: int, prev_end: int | None, next_start: int | None) -> torch.Tensor:
    """1-D blend weight of one tile over [start, stop): cosine ramps in the overlaps."""
    x = torch.arange(start, stop, dtype=torch.float64) + 0.5
    weight = torch.ones(stop - start, dtype=torch.float64)
    if prev_end is not None and prev_end > start:
        t = ((x - start) / (prev_end - start)).clamp(0, 1)
        weight = torch.minimum(weight, torch.sin(t * math.pi / 2) ** 2)
    if next_start is not None and stop > next_start:
        t = ((stop - x) / (stop - next_start)).clamp(0, 1)
        weight = torch.minimum(weight, torch.sin(t * math.pi / 2) ** 2)
    return weight


def axis_weights(starts: list[int], tile: int, length: int, factor: int) -> list[torch.Tensor]:
    """Per-tile 1-D weights in image pixels, normalised to sum to 1 at every pixel."""
    spans = [(s * factor, min(s + tile, length) * factor) for s in starts]
    ramps = []
    for i, (a, b) in enumerate(spans):
        prev_end = spans[i - 1][1] if i else None
        next_start = spans[i + 1][0] if i + 1 < len(spans) else None
        ramps.append(_ramp(length * factor, a, b, prev_end, next_start))
    total = torch.zeros(length * factor, dtype=torch.float64)
    for (a, b), r in zip(spans, ramps, strict=True):
        total[a:b] += r
    return [(r / total[a:b]).float() for (a, b), r in zip(spans, ramps, strict=True)]


class TiledDecoder(Protocol):
    """What ``decode_tiled`` needs: ``models.flux_vae.Decoder`` or a test double."""

    def __call__(self, z: torch.Tensor) -> torch.Tensor: ...  # raw latent -> pixels
    def head(self, z: torch.Tensor) -> torch.Tensor: ...  # latent -> features, same h×w
    def tail(self, x: torch.Tensor) -> torch.Tensor: ...  # features -> pixels


def _decode_tiles(fn: Callable, x: torch.Tensor, plan: TilePlan, factor: int) -> torch.Tensor:
    th, tw = min(plan.tile, plan.h), min(plan.tile, plan.w)
    ys, xs = plan.starts(plan.h), plan.starts(plan.w)
    wy, wx = axis_weights(ys, th, plan.h, factor), axis_weights(xs, tw, plan.w, factor)
    canvas = None
    for i, y in enumerate(ys):
        for j, x0 in enumerate(xs):
            pixels = fn(x[:, :, y : y + th, x0 : x0 + tw]).float()  # [B, 3, th*f, tw*f]
            if canvas is None:
                canvas = pixels.new_zeros(x.shape[0], pixels.shape[1], plan.h * factor, plan.w * factor)
            weight = wy[i].to(pixels.device)[:, None] * wx[j].to(pixels.device)[None, :]
            canvas[:, :, y * factor : (y + th) * factor, x0 * factor : (x0 + tw) * factor] += pixels.mul_(
                weight
            )
            del pixels
    return canvas


def _decode_plan(decoder: TiledDecoder, z: torch.Tensor, plan: TilePlan, factor: int) -> torch.Tensor:
    if plan.single:
        return decoder(z)
    if not plan.global_mid:
        return _decode_tiles(decoder, z, plan, factor)
    return _decode_tiles(decoder.tail, decoder.head(z), plan, factor)


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def decode_tiled(
    decoder: TiledDecoder,
    z: torch.Tensor,
    plan: TilePlan,
    *,
    factor: int = 8,
    oom_errors: tuple[type[BaseException], ...] = (torch.OutOfMemoryError,),
    on_retry: Callable[[TilePlan], None] | None = None,
) -> torch.Tensor:
    """Decode raw latent ``z`` [B, C, h, w] -> [B, 3, h*factor, w*factor] following ``plan``.

    A single-tile plan calls ``decoder(z)`` as it is (the result equals the untiled decode
    exactly, in the decoder's dtype); tiled results are fp32. When the decoder raises one
    of ``oom_errors`` (CUDA out of memory by default), device memory is released and the
    decode restarts with the next smaller plan (``TilePlan.smaller``; at the smallest tile
    the mid block is tiled too); ``on_retry(plan)`` is told each new plan. Past that it
    raises ``BudgetError``.
    """
    while True:
        try:
            return _decode_plan(decoder, z, plan, factor)
        except oom_errors:
            # Leave the except block before retrying, so the failed attempt's frames
            # (and their activations) are released first.
            smaller = plan.smaller() or _untiled_mid(plan)
        _free_device_memory()
        if smaller is None:
            raise BudgetError(
                f"the VAE decode ran out of device memory even with {plan.tile}×{plan.tile} latent "
                "tiles; free device memory, lower the resolution or decode on the CPU."
            )
        plan = smaller
        if on_retry is not None:
            on_retry(plan)


def _untiled_mid(plan: TilePlan) -> TilePlan | None:
    # The smallest tile still ran out of memory: stop holding the whole-latent mid block.
    if not plan.global_mid:
        return None
    return tile_plan(plan.h, plan.w, min(plan.tile, MIN_TILE), plan.overlap, global_mid=False)
