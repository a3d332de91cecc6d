"""Z-Image LoRA key map: every name a Z-Image LoRA uses for a module -> the canonical module.

Canonical names are the ComfyUI file's (``pascaline.models.zimage_dit``): fused
``attention.qkv``, ``attention.out``, ``x_embedder``, ``final_layer.*``. Trainers name the
same modules the diffusers way (zimage-turbo.md §2.3; sd3-family.md §7.3): ai-toolkit
(``diffusion_model.`` + diffusers names), musubi-tuner (``lora_unet_`` + underscores),
DiffSynth (bare names, PEFT ``.default``), OneTrainer (``transformer.``), Anime-Z (dot names
``to.q``), SimpleTuner, LyCORIS. ``to_q``/``to_k``/``to_v`` land on row slices ``[0, D)``,
``[D, 2D)``, ``[2D, 3D)`` of ``qkv``, as in ComfyUI's ``z_image_to_diffusers``. The prefixes
and spellings are handled by ``pascaline.lora.keys``; this file only lists the names.

When a file holds a layer both split and fused (Anime-Z's duplicate ``qkv``/``out`` keys),
the diffusers-named copy is read (priority 1), as diffusers does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from pascaline.lora.keys import LoraTargets, Target

FAMILY = "Z-Image"
_QKV = re.compile(r"(?P<attn>(noise_refiner|context_refiner|layers)\.\d+\.attention)\.qkv")
# diffusers name -> canonical name, outside the blocks
_TOP_LEVEL = (
    ("all_x_embedder.2-1", "x_embedder"),
    ("all_final_layer.2-1.linear", "final_layer.linear"),
    ("all_final_layer.2-1.adaLN_modulation.1", "final_layer.adaLN_modulation.1"),
)


def zimage_lora_targets(shapes: Mapping[str, tuple[int, ...]]) -> LoraTargets:
    """The key map over a Z-Image DiT's ``{module: weight shape}`` (``pascaline.lora.weight_shapes``)."""
    aliases = {name: Target(name) for name in shapes}
    for name, shape in shapes.items():
        if m := _QKV.fullmatch(name):
            dim = shape[0] // 3
            for k, part in enumerate("qkv"):
                aliases[f"{m['attn']}.to_{part}"] = Target(name, (k * dim, (k + 1) * dim), priority=1)
        elif name.endswith(".attention.out"):
            aliases[name.removesuffix("out") + "to_out.0"] = Target(name, priority=1)
    for diffusers, canonical in _TOP_LEVEL:
        if canonical in shapes:
            aliases[diffusers] = Target(canonical, priority=1)
    return LoraTargets(FAMILY, aliases, shapes)
