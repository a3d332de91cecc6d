"""The stage run: a synthetic pipeline (encoder -> DiT -> VAE decode) under the memory ledger.

Each stage builds its real-width random model on the compute device (the family's bench
kit says which), runs it once on the previous stage's output, and drops it; a kit with no
encoder model runs the DiT on random conditioning. The ledger tracks every tensor of the
model, so a stage whose model (or any of its tensors) survives the stage is reported as
not freed; on CUDA the allocator's own count is checked as well.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager

import torch

from pascaline.bench.timing import PeakRss


def _track(ledger, owner: str, model: torch.nn.Module) -> None:
    for tensor in list(model.parameters()) + list(model.buffers()):
        ledger.track(owner, tensor)


def _encoder_stage(ledger, ctx):
    with ledger.stage("encoder") as record:
        encoder = ctx.kit.build_encoder(ctx)
        _track(ledger, "encoder", encoder)
        cond = ctx.kit.encode(encoder, ctx)
        record.keep(cond)
        del encoder
        gc.collect()
    return cond  # what the DiT's inputs take as conditioning ([L, 2560] for Z-Image)


def _dit_stage(ledger, ctx, cond) -> torch.Tensor:
    from pascaline.bench.runner import inputs_of

    with ledger.stage("dit") as record:
        model = ctx.kit.build(ctx.cfg, dtype=ctx.dit_dtype, device=ctx.device, seed=ctx.seed)
        _track(ledger, "dit", model)
        inputs = inputs_of(ctx, ctx.device, ctx.stage_resolution, cond)
        with torch.inference_mode():
            latent = ctx.kit.forward(model, inputs)[:1]  # one image decodes: [1, 16, R/8, R/8]
        record.keep(latent)
        del model, inputs
        gc.collect()
    return latent


def _vae_stage(ledger, ctx, latent: torch.Tensor) -> None:
    with ledger.stage("vae") as record:
        decoder = ctx.kit.build_vae_decoder(ctx)
        _track(ledger, "vae", decoder)
        with torch.inference_mode():
            image = decoder(latent.to(ctx.vae_dtype))  # [1, 3, R, R]
        record.keep(image)
        del decoder
        gc.collect()
    del image


@contextmanager
def _sampled(ledger, name: str, progress):
    """The ledger samples RSS at its own calls only; a sampler thread sees the forward's peak too."""
    if progress:
        progress(f"stage {name}")
    with PeakRss() as rss:
        yield
    record = ledger.records[-1]
    record.peak_rss_bytes = max(record.peak_rss_bytes or 0, rss.peak)


def run_stages(ctx, progress=None) -> list[dict]:
    """Encoder (when the kit has one), DiT and VAE decode once each; per-stage seconds, peaks and
    the freed check."""
    from pascaline.offload.ledger import LIBRARY_WORKSPACE_BYTES, MemoryLedger

    ledger = MemoryLedger(ctx.device, cuda_slack_bytes=LIBRARY_WORKSPACE_BYTES)
    cond = None
    if ctx.kit.has_encoder:
        with _sampled(ledger, "encoder", progress):
            cond = _encoder_stage(ledger, ctx)
    with _sampled(ledger, "dit", progress):
        latent = _dit_stage(ledger, ctx, cond)
    del cond
    with _sampled(ledger, "vae", progress):
        _vae_stage(ledger, ctx, latent)
    return [
        {
            "name": r.name,
            "seconds": r.seconds,
            "peak_vram_bytes": r.peak_vram_bytes,
            "peak_vram_kind": "measured" if ctx.device.type == "cuda" else "own-accounted",
            "peak_rss_bytes": r.peak_rss_bytes,
            "freed": r.freed,
            "leaked_bytes": max(r.leaked_bytes, r.cuda_leaked_bytes),
        }
        for r in ledger.records
    ]
