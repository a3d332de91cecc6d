"""Real-size model files as sparse files: a real safetensors header, a hole for the data.

What reads headers only (discovery, ``pascaline models``, ``info``'s plans, host-RAM checks)
sees the real files' names, shapes, dtypes and sizes, while the files take no disk space.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def write_sparse(path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> Path:
    """A safetensors file of ``shapes`` in ``dtype`` whose data is a hole (reads as zeros)."""
    header, offset = {}, 0
    width = torch.empty((), dtype=dtype).element_size()
    for key, shape in shapes.items():
        nbytes = width * int(torch.Size(shape).numel())
        span = [offset, offset + nbytes]
        header[key] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": span}
        offset += nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + offset)
    return path


def _shapes(module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


def sd35_large_folder(root: Path) -> Path:
    """ComfyUI's SD3.5 Large layout at full size: ``checkpoints/sd3.5_large.safetensors`` (MMDiT
    and VAE, fp16) and ``text_encoders/{clip_l,clip_g,t5xxl_fp16}.safetensors`` (HF names)."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    from pascaline.models.flux_vae import VARIANTS as VAE_VARIANTS
    from pascaline.models.flux_vae import FluxAutoEncoder
    from pascaline.models.mmdit import VARIANTS, MMDiT

    clip = dict(projection_dim=768, hidden_act="quick_gelu")
    with torch.device("meta"):
        dit, vae = MMDiT(VARIANTS["sd3.5-large"]), FluxAutoEncoder(VAE_VARIANTS["flux"])
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, **clip))  # fmt: skip
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            projection_dim=1280, hidden_act="gelu"))  # fmt: skip
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                     num_heads=64, feed_forward_proj="gated-gelu",
                                     is_encoder_decoder=False))  # fmt: skip
    # the files' HF names start at text_model. whatever the installed transformers calls them
    clip_l_shapes = {k if k.startswith("text_model.") else f"text_model.{k}": v
                     for k, v in _shapes(clip_l).items()}  # fmt: skip
    checkpoint = _shapes(dit, "model.diffusion_model.") | _shapes(vae, "first_stage_model.")
    write_sparse(root / "checkpoints" / "sd3.5_large.safetensors", checkpoint, torch.float16)
    write_sparse(root / "text_encoders" / "clip_l.safetensors", clip_l_shapes, torch.float16)
    write_sparse(root / "text_encoders" / "clip_g.safetensors", _shapes(clip_g), torch.float16)
    write_sparse(root / "text_encoders" / "t5xxl_fp16.safetensors", _shapes(t5), torch.float16)
    return root
