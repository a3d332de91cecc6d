"""Tiled VAE decode and encode within a memory budget.

At 1024² the FLUX decoder's full-resolution activations (256 channels at 1024×1024) are
the largest tensors of the whole pipeline: about 2.5 GiB in fp32, the most common
out-of-memory point on an 8 GB card; the encoder's (128 channels at 1024×1024, for an
img2img init image) come second. Running overlapping tiles bounds that peak by the tile's
area; the overlaps are blended with cosine ramps so no seam shows.

- ``estimate_decode_peak_bytes`` / ``estimate_encode_peak_bytes`` walk the decoder /
  encoder level by level and count the bytes alive at each step of ``models.flux_vae``
  forwards (they free eagerly and activate in place); ``plan_decode_tiles`` /
  ``plan_encode_tiles`` pick the largest tile whose estimate fits a budget. All are pure
  functions of sizes. Plans count latent pixels in both directions (an encode tile of
  ``t`` latent pixels reads ``8t`` image pixels), so encode tiles align with the
  encoder's stride-2 grid.
- ``decode_tiled`` / ``encode_tiled`` run a plan with any decoder / encoder (a module or
  a test double). The mid block's attention is global, so by default it runs once on
  the whole latent and only the local part is tiled (the decoder's up path, the
  encoder's down path). When a tile runs out of device memory the run retries with
  smaller tiles; the model is an argument, so tests inject a fake out-of-memory error
  on the CPU.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch

from pascaline.errors import BudgetError, InvalidArgumentError
from pascaline.models.flux_vae import ATTN_SCORES_PER_CHUNK, VARIANTS, FluxVAEConfig

MIN_TILE = 16  # latent pixels per side: 128 image pixels
GRANULE = 8  # tile sizes are multiples of this (latent pixels)
# Margin for what the walk does not count: allocator rounding, GroupNorm statistics.
# With it the estimate of a 1024² decode is ~5-10% above the peak measured on an H100
# (cuDNN 9.19); see the report. The encode estimate reuses the same steps and
# margin; it was not measured on a GPU.
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


def _downsample_peak(c: int) -> int:
    # Per input pixel: x, its (0,1,0,1)-padded copy, the stride-2 conv output (1/4 pixel).
    return _conv(2 * c + c // 4, c, c // 4)


def _conv_params(c_in: int, c_out: int, k: int = 3) -> int:
    return c_in * c_out * k * k + c_out


def _resnet_params(c_in: int, c_out: int) -> int:
    shortcut = _conv_params(c_in, c_out, 1) if c_in != c_out else 0
    return 2 * c_in + _conv_params(c_in, c_out) + 2 * c_out + _conv_params(c_out, c_out) + shortcut


def _mid_params(c: int) -> int:
    # Two resnets, the attention's norm and its four 1x1 convs.
    return 2 * _resnet_params(c, c) + 2 * c + 4 * _conv_params(c, c, 1)


def decoder_param_count(config: FluxVAEConfig) -> int:
    """Parameters of the decoder, from the config alone (49,545,475 for FLUX)."""
    widths = config.widths
    n = _conv_params(config.z_channels, widths[-1]) + _mid_params(widths[-1])
    c_in = widths[-1]
    for i in reversed(range(len(widths))):
        c = widths[i]
        n += sum(_resnet_params(c_in if j == 0 else c, c) for j in range(config.num_res_blocks + 1))
        n += _conv_params(c, c) if i else 0
        c_in = c
    return n + 2 * widths[0] + _conv_params(widths[0], config.out_ch)  # norm_out, conv_out


def encoder_param_count(config: FluxVAEConfig) -> int:
    """Parameters of the encoder, from the config alone (34,274,208 for FLUX)."""
    widths = config.widths
    n = _conv_params(config.in_channels, widths[0])
    c_in = widths[0]
    for i, c in enumerate(widths):
        n += sum(_resnet_params(c_in if j == 0 else c, c) for j in range(config.num_res_blocks))
        n += _conv_params(c, c) if i < len(widths) - 1 else 0
        c_in = c
    top = widths[-1]
    return n + _mid_params(top) + 2 * top + _conv_params(top, 2 * config.z_channels)  # norm_out, conv_out


def _item(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _mid_steps(hw: int, top: int, item: int) -> list[tuple[str, int]]:
    # The mid block (decoder and encoder alike) on hw latent pixels. Attention: x, norm(x),
    # q, k, v and a conv output at once, plus one query chunk's fp32 scores (measured:
    # below this bound).
    chunk = min(hw, max(1, ATTN_SCORES_PER_CHUNK // hw))
    return [
        ("mid.block_1", _resnet_peak(top, top) * hw * item),
        ("mid.attn_1", 6 * top * hw * item + chunk * hw * 4),
        ("mid.block_2", _resnet_peak(top, top) * hw * item),
    ]


def head_steps(h: int, w: int, dtype: torch.dtype, config: FluxVAEConfig) -> list[tuple[str, int]]:
    """(step, activation bytes alive) of ``Decoder.head`` (conv_in + mid) on an h×w latent."""
    top, hw, item = config.widths[-1], h * w, _item(dtype)
    conv_in = _conv(config.z_channels + top, config.z_channels, top) * hw * item
    return [("conv_in", conv_in), *_mid_steps(hw, top, item)]


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


def encoder_head_steps(
    height: int, width: int, dtype: torch.dtype, config: FluxVAEConfig
) -> list[tuple[str, int]]:
    """(step, activation bytes alive) of ``Encoder.head`` (conv_in + down path) on a height×width image."""
    widths, item, c_img = config.widths, _item(dtype), config.in_channels
    pixels = [height * width // 4**i for i in range(len(widths))]  # pixels[0]: full resolution
    steps = [("conv_in", _conv(c_img + widths[0], c_img, widths[0]) * pixels[0] * item)]
    c_in = widths[0]
    for i, c in enumerate(widths):
        steps.append((f"down.{i}.block.0", _resnet_peak(c_in, c) * pixels[i] * item))
        if config.num_res_blocks > 1:
            steps.append((f"down.{i}.block.1+", _resnet_peak(c, c) * pixels[i] * item))
        if i < len(widths) - 1:
            steps.append((f"down.{i}.downsample", _downsample_peak(c) * pixels[i] * item))
        c_in = c
    return steps


def encoder_tail_steps(h: int, w: int, dtype: torch.dtype, config: FluxVAEConfig) -> list[tuple[str, int]]:
    """(step, activation bytes alive) of ``Encoder.tail`` (mid + output) on an h×w latent."""
    top, hw, item, moments = config.widths[-1], h * w, _item(dtype), 2 * config.z_channels
    out = _conv(2 * top + moments, top, moments)  # x, norm_out(x), moments
    return [*_mid_steps(hw, top, item), ("norm_out+conv_out", out * hw * item)]


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


def estimate_encode_peak_bytes(
    height: int,
    width: int,
    dtype: torch.dtype = torch.float32,
    config: FluxVAEConfig | None = None,
    *,
    batch: int = 1,
    include_weights: bool = True,
) -> int:
    """Estimated peak device bytes of one untiled encode of a ``[batch, 3, height, width]`` image.

    Counts the activations alive at the worst step (for FLUX the full-resolution resnets:
    128 channels at full resolution, with cuDNN's working copies), times ``MARGIN``, plus
    the image on the device, the fp32 latent and, when ``include_weights``, the encoder
    weights. Sizes are image pixels (multiples of ``config.downscale``); ``dtype`` is the
    compute dtype. For a plan see ``estimate_encode_plan_peak_bytes``.
    """
    config = config or VARIANTS["flux"]
    item, f = _item(dtype), config.downscale
    head = _peak(encoder_head_steps(height, width, dtype, config))
    act = batch * max(head, _peak(encoder_tail_steps(height // f, width // f, dtype, config)))
    image = batch * config.in_channels * height * width * item
    latent = batch * config.z_channels * (height // f) * (width // f) * 4
    weights = encoder_param_count(config) * item if include_weights else 0
    return int(act * MARGIN) + image + latent + weights


@dataclass(frozen=True)
class TilePlan:
    """Latent tiles for one decode or encode: square ``tile`` windows sharing ``overlap`` pixels.

    Sizes are latent pixels in both directions (an encode reads ``downscale`` image pixels
    per latent pixel). ``global_mid``: the mid block (whose attention is global) runs once
    on the whole latent and only the local part is tiled (the decoder's up path, the
    encoder's down path), so tiles agree on global context; else every tile runs the whole
    decoder or encoder. A tile at least as large as the latent means one untiled run.
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


def encode_tile_plan(height: int, width: int, tile: int | None = None, *, downscale: int = 8) -> TilePlan:
    """The plan of an encode with ``tile`` image pixels per side (None: one tile).

    The tile must be a multiple of ``downscale`` (8 for FLUX, the encoder's stride), so
    every tile starts on the encoder's stride grid and a tile's latent is whole pixels.
    """
    if height % downscale or width % downscale:
        raise InvalidArgumentError(
            f"the VAE encodes images whose sides are multiples of {downscale}, not {height}×{width}."
        )
    if tile is not None and (tile < 4 * downscale or tile % downscale):
        raise InvalidArgumentError(
            f"a VAE encode tile of {tile} image pixels is impossible; use a multiple of {downscale} "
            f"of at least {4 * downscale}."
        )
    return tile_plan(height // downscale, width // downscale, None if tile is None else tile // downscale)


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


def estimate_encode_plan_peak_bytes(
    plan: TilePlan, dtype: torch.dtype, config: FluxVAEConfig | None = None, *, batch: int = 1
) -> int:
    """Estimated peak device bytes of encoding with ``plan``, weights, image and fp32 canvas included."""
    config = config or VARIANTS["flux"]
    item, f = _item(dtype), config.downscale
    if plan.single:
        return estimate_encode_peak_bytes(plan.h * f, plan.w * f, dtype, config, batch=batch)
    th, tw = min(plan.tile, plan.h), min(plan.tile, plan.w)
    head = _peak(encoder_head_steps(th * f, tw * f, dtype, config))
    if plan.global_mid:
        # Tiles blend down-path features into an fp32 canvas, alive until the mid block has
        # run on it (in the compute dtype: one more copy unless fp32).
        channels = config.widths[-1]
        copy = 0 if item == 4 else channels * plan.h * plan.w * item
        act = max(head, _peak(encoder_tail_steps(plan.h, plan.w, dtype, config)) + copy)
    else:
        channels = 2 * config.z_channels
        act = max(head, _peak(encoder_tail_steps(th, tw, dtype, config)))
    # fp32 canvas, a tile's fp32 output and its weighted copy, and the whole image.
    canvas = channels * (plan.h * plan.w + 2 * th * tw) * 4
    image = config.in_channels * plan.h * plan.w * f * f * item
    return int(batch * act * MARGIN) + batch * (canvas + image) + encoder_param_count(config) * item


def _candidates(h: int, w: int) -> list[int]:
    top = max(h, w)
    sizes = {top, *range(GRANULE, top, GRANULE)}
    return sorted((s for s in sizes if s >= min(MIN_TILE, top)), reverse=True)


def _largest_fitting(
    h: int, w: int, budget_bytes: int, estimate: Callable[[TilePlan], int]
) -> tuple[TilePlan | None, int]:
    # Largest tile first, a global mid block before a tiled one: a smaller budget can
    # only stop later in this order, so it never gets a larger tile.
    need = 0
    for tile in _candidates(h, w):
        for global_mid in (True, False):
            plan = tile_plan(h, w, tile, global_mid=global_mid)
            need = estimate(plan)
            if need <= budget_bytes:
                return plan, need
    return None, need


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
    plan, need = _largest_fitting(
        h, w, budget_bytes, lambda p: estimate_plan_peak_bytes(p, dtype, config, batch=batch)
    )
    if plan is None:
        raise BudgetError(
            f"the VAE decode needs about {need / 2**20:,.0f} MiB even with the smallest tile "
            f"({min(MIN_TILE, h)}×{min(MIN_TILE, w)} latent pixels) but the budget is "
            f"{budget_bytes / 2**20:,.0f} MiB; raise the VRAM budget or decode on the CPU."
        )
    return plan


def plan_encode_tiles(
    height: int,
    width: int,
    dtype: torch.dtype,
    budget_bytes: int,
    *,
    config: FluxVAEConfig | None = None,
    batch: int = 1,
) -> TilePlan:
    """The largest square tile whose estimated encode peak fits ``budget_bytes``.

    ``height`` and ``width`` are image pixels (multiples of ``config.downscale``); the plan
    counts latent pixels (see ``TilePlan``). ``budget_bytes`` is what the encode may use on
    the device, the encoder's weights, the image and the fp32 canvas included. One tile
    (no tiling) when the whole image fits; a global mid block when it fits beside the
    tiles; a smaller budget never gives a larger tile. Raises ``BudgetError`` naming both
    numbers when even the smallest tile does not fit.
    """
    config = config or VARIANTS["flux"]
    f = config.downscale
    whole = encode_tile_plan(height, width, downscale=f)  # checks the sides
    h, w = whole.h, whole.w
    plan, need = _largest_fitting(
        h, w, budget_bytes, lambda p: estimate_encode_plan_peak_bytes(p, dtype, config, batch=batch)
    )
    if plan is None:
        raise BudgetError(
            f"the VAE encode needs about {need / 2**20:,.0f} MiB even with the smallest tile "
            f"({min(MIN_TILE, h) * f}×{min(MIN_TILE, w) * f} image pixels) but the budget is "
            f"{budget_bytes / 2**20:,.0f} MiB; raise the VRAM budget or lower the init image's resolution."
        )
    return plan


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
    """Per-tile 1-D weights in output pixels (``factor`` per plan pixel), summing to 1 at each."""
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


class TiledModel(Protocol):
    """What ``decode_tiled`` / ``encode_tiled`` need: a ``models.flux_vae`` Decoder / Encoder, or a double.

    The decoder's ``head`` is global (conv_in + mid) and its ``tail`` local; the encoder's
    ``head`` is local (the down path) and its ``tail`` global (mid + output).
    """

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...
    def head(self, x: torch.Tensor) -> torch.Tensor: ...
    def tail(self, x: torch.Tensor) -> torch.Tensor: ...


def _blend_tiles(
    fn: Callable, x: torch.Tensor, plan: TilePlan, scale_in: int, scale_out: int
) -> torch.Tensor:
    # Runs fn on each tile of x (scale_in pixels of x per plan pixel) and blends the outputs
    # (scale_out pixels per plan pixel) into an fp32 canvas. Decode: 1 -> 8; encode: 8 -> 1.
    th, tw = min(plan.tile, plan.h), min(plan.tile, plan.w)
    ys, xs = plan.starts(plan.h), plan.starts(plan.w)
    wy, wx = axis_weights(ys, th, plan.h, scale_out), axis_weights(xs, tw, plan.w, scale_out)
    a, b = scale_in, scale_out
    canvas = None
    for i, y in enumerate(ys):
        for j, x0 in enumerate(xs):
            out = fn(x[:, :, y * a : (y + th) * a, x0 * a : (x0 + tw) * a]).float()  # [B, C, th*b, tw*b]
            if canvas is None:
                canvas = out.new_zeros(x.shape[0], out.shape[1], plan.h * b, plan.w * b)
            weight = wy[i].to(out.device)[:, None] * wx[j].to(out.device)[None, :]
            canvas[:, :, y * b : (y + th) * b, x0 * b : (x0 + tw) * b] += out.mul_(weight)
            del out
    return canvas


def _decode_plan(decoder: TiledModel, z: torch.Tensor, plan: TilePlan, factor: int) -> torch.Tensor:
    if plan.single:
        return decoder(z)
    if not plan.global_mid:
        return _blend_tiles(decoder, z, plan, 1, factor)
    return _blend_tiles(decoder.tail, decoder.head(z), plan, 1, factor)


def _encode_plan(encoder: TiledModel, x: torch.Tensor, plan: TilePlan, factor: int) -> torch.Tensor:
    if plan.single:
        return encoder(x)
    if not plan.global_mid:
        return _blend_tiles(encoder, x, plan, factor, 1)
    return encoder.tail(_blend_tiles(encoder.head, x, plan, factor, 1).to(x.dtype))


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run_with_retries(
    run: Callable[[TilePlan], torch.Tensor],
    plan: TilePlan,
    oom_errors: tuple[type[BaseException], ...],
    on_retry: Callable[[TilePlan], None] | None,
    what: str,
    unit: tuple[int, str],
) -> torch.Tensor:
    # unit: how the error message counts a tile's side, (per plan pixel, name).
    while True:
        try:
            return run(plan)
        except oom_errors:
            # Leave the except block before retrying, so the failed attempt's frames
            # (and their activations) are released first.
            smaller = plan.smaller() or _untiled_mid(plan)
        _free_device_memory()
        if smaller is None:
            raise BudgetError(
                f"the VAE {what} ran out of device memory even with {plan.tile * unit[0]}×"
                f"{plan.tile * unit[0]} {unit[1]} tiles; "
                f"free device memory, lower the resolution or {what} on the CPU."
            )
        plan = smaller
        if on_retry is not None:
            on_retry(plan)


def decode_tiled(
    decoder: TiledModel,
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
    run = partial(_decode_plan, decoder, z, factor=factor)
    return _run_with_retries(run, plan, oom_errors, on_retry, "decode", (1, "latent"))


def encode_tiled(
    encoder: TiledModel,
    x: torch.Tensor,
    plan: TilePlan,
    *,
    factor: int = 8,
    oom_errors: tuple[type[BaseException], ...] = (torch.OutOfMemoryError,),
    on_retry: Callable[[TilePlan], None] | None = None,
) -> torch.Tensor:
    """Encode image ``x`` [B, 3, H, W] -> moments [B, 2z, H/factor, W/factor] following ``plan``.

    ``plan`` is on the latent grid (``encode_tile_plan`` makes one from image pixels). A
    single-tile plan calls ``encoder(x)`` as it is (the result equals the untiled encode
    exactly). A tiled encode is an approximation: GroupNorm statistics are per tile, and
    with ``global_mid`` false the mid block's attention sees one tile too. The retry on
    ``oom_errors`` is ``decode_tiled``'s.
    """
    run = partial(_encode_plan, encoder, x, factor=factor)
    return _run_with_retries(run, plan, oom_errors, on_retry, "encode", (factor, "image-pixel"))


def _untiled_mid(plan: TilePlan) -> TilePlan | None:
    # The smallest tile still ran out of memory: stop holding the whole-latent mid block.
    if not plan.global_mid:
        return None
    return tile_plan(plan.h, plan.w, min(plan.tile, MIN_TILE), plan.overlap, global_mid=False)
