"""SD3 / SD3.5 LoRA key map: every name an MMDiT LoRA uses for a module -> the original module.

Canonical names are the original (SAI / ComfyUI) checkpoint's, sd3-family.md §5.2:
``joint_blocks.{i}.{x_block,context_block}.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2,
adaLN_modulation.1}``, ``x_block.attn2.{qkv,proj}`` (MMDiT-X), ``context_embedder``,
``t_embedder.mlp.{0,2}``, ``y_embedder.mlp.{0,2}``, ``x_embedder.proj`` (a conv),
``final_layer.{linear,adaLN_modulation.1}``. kohya sd-scripts trains those names
(``lora_unet_joint_blocks_0_x_block_attn_qkv``, fused qkv); diffusers, SimpleTuner, PEFT,
OneTrainer and LyCORIS train the diffusers names of §5.3, mapped here:

- ``attn.to_q/to_k/to_v`` (``add_*_proj``, ``attn2.*``) -> row slices of the fused ``qkv``;
- ``norm1_context.linear`` of the last block and ``norm_out.linear`` are diffusers'
  ``AdaLayerNormContinuous``, whose rows are (scale, shift) where the checkpoint has
  (shift, scale): their delta rows are swapped (``swap_scale_shift``).

A kohya ``split_qkv`` LoRA is stored fused (down = cat of the three downs, up block-diagonal,
rank 3r, alpha unchanged); its scale is alpha / 3r, as kohya's own loader and ComfyUI read it
(sd3-family.md §7.1: such files apply at a third of the training strength unless their alpha
was chosen for that; pascaline matches the tools users compare with).

The map is a function of the model's module names and shapes only, so it serves any
module tree with the original names (the MMDiT, or a test's stand-in).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from pascaline.lora.keys import LoraTargets, Target

FAMILY = "SD3/SD3.5"
_BLOCK = re.compile(r"joint_blocks\.(?P<i>\d+)\.x_block\.attn\.qkv")
# per block: diffusers suffix, original suffix, q/k/v index (None: the whole weight)
_BLOCK_NAMES = (
    *((f"attn.to_{p}", "x_block.attn.qkv", k) for k, p in enumerate("qkv")),
    *((f"attn.add_{p}_proj", "context_block.attn.qkv", k) for k, p in enumerate("qkv")),
    *((f"attn2.to_{p}", "x_block.attn2.qkv", k) for k, p in enumerate("qkv")),
    ("attn.to_out.0", "x_block.attn.proj", None),
    ("attn.to_add_out", "context_block.attn.proj", None),
    ("attn2.to_out.0", "x_block.attn2.proj", None),
    ("norm1.linear", "x_block.adaLN_modulation.1", None),
    ("norm1_context.linear", "context_block.adaLN_modulation.1", None),
    ("ff.net.0.proj", "x_block.mlp.fc1", None),
    ("ff.net.2", "x_block.mlp.fc2", None),
    ("ff_context.net.0.proj", "context_block.mlp.fc1", None),
    ("ff_context.net.2", "context_block.mlp.fc2", None),
)
_TOP_LEVEL = (
    ("context_embedder", "context_embedder"),
    ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
    ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
    ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
    ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"),
    ("pos_embed.proj", "x_embedder.proj"),
    ("proj_out", "final_layer.linear"),
    ("norm_out.linear", "final_layer.adaLN_modulation.1"),
)
_CONTINUOUS_NORMS = ("norm1_context.linear", "norm_out.linear")  # (scale, shift) rows in diffusers


def sd3_lora_targets(shapes: Mapping[str, tuple[int, ...]]) -> LoraTargets:
    """The key map over an MMDiT's ``{module: weight shape}`` with original names (§5.2)."""
    aliases = {name: Target(name) for name in shapes}
    blocks = sorted(int(m["i"]) for name in shapes if (m := _BLOCK.fullmatch(name)))
    for i in blocks:
        for diffusers, original, part in _BLOCK_NAMES:
            target = _target(shapes, f"joint_blocks.{i}.{original}", diffusers, part)
            if target is not None:
                aliases[f"transformer_blocks.{i}.{diffusers}"] = target
    for diffusers, original in _TOP_LEVEL:
        target = _target(shapes, original, diffusers, None)
        if target is not None:
            aliases[diffusers] = target
    return LoraTargets(FAMILY, aliases, shapes)


def _target(shapes, original: str, diffusers: str, part: int | None) -> Target | None:
    shape = shapes.get(original)
    if shape is None:
        return None
    if part is not None:
        dim = shape[0] // 3
        return Target(original, (part * dim, (part + 1) * dim), priority=1)
    # a (shift, scale) modulation of 2 x dim rows: the last block's context side, the final layer
    swap = diffusers in _CONTINUOUS_NORMS and len(shape) == 2 and shape[0] == 2 * shape[1]
    return Target(original, swap_halves=swap, priority=1)
