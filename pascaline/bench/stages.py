"""The stage run: a synthetic pipeline (encoder -> DiT -> VAE decode) under the memory ledger.

Each stage builds its real-width random model on the compute device, runs it once on the
previous stage's output, and drops it. The ledger tracks every tensor of the model, so a
stage whose model (or any of its tensors) survives the stage is reported as not freed;
on CUDA the allocator's own count is checked as well.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager

import torch

from pascaline.bench import synthetic
from pascaline.bench.timing import PeakRss

ENCODER_LAYERS = 2


def _track(ledger, owner: str, model: torch.nn.Module) -> None:
    for tensor in list(model.parameters()) + list(model.buffers()):
        ledger.track(owner, tensor)


def _encoder_stage(ledger, ctx) -> torch.Tensor:
    with ledger.stage("encoder") as record:
        model = synthetic.build_encoder(
            ENCODER_LAYERS, dtype=ctx.encoder_dtype, device=ctx.device, hidden=ctx.cfg.cap_feat_dim
        )
        _track(ledger, "encoder", model)
        gen = torch.Generator().manual_seed(ctx.seed)
        ids = torch.randint(0, model.config.vocab_size, (1, ctx.caption_tokens), generator=gen).to(ctx.device)
        with torch.inference_mode():
            hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
        record.keep(hidden)
        del model, ids
        gc.collect()
    return hidden  # [L, 2560]


def _dit_stage(ledger, ctx, caption: torch.Tensor) -> torch.Tensor:
    with ledger.stage("dit") as record:
        model = synthetic.build_dit(ctx.cfg, dtype=ctx.dit_dtype, device=ctx.device, seed=ctx.seed)
        _track(ledger, "dit", model)
        x, t, _ = synthetic.dit_inputs(ctx.cfg, ctx.stage_resolution, dtype=ctx.dit_dtype, device=ctx.device)
        with torch.inference_mode():
            latent = model(x, t, [caption.to(ctx.dit_dtype)])
        record.keep(latent)
        del model, x, t, _
        gc.collect()
    return latent  # [1, 16, R/8, R/8]


def _vae_stage(ledger, ctx, latent: torch.Tensor) -> None:
    with ledger.stage("vae") as record:
        variant = "flux" if ctx.cfg.dim == synthetic.REAL_DIM else "tiny"  # tiny only with a test width
        decoder = synthetic.build_vae_decoder(dtype=ctx.vae_dtype, device=ctx.device, variant=variant)
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
    """Encoder, DiT and VAE decode once each; per-stage seconds, peaks and the freed check."""
    from pascaline.offload.ledger import LIBRARY_WORKSPACE_BYTES, MemoryLedger

    ledger = MemoryLedger(ctx.device, cuda_slack_bytes=LIBRARY_WORKSPACE_BYTES)
    with _sampled(ledger, "encoder", progress):
        caption = _encoder_stage(ledger, ctx)
    with _sampled(ledger, "dit", progress):
        latent = _dit_stage(ledger, ctx, caption)
    del caption
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
