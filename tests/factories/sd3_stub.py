"""A stand-in MMDiT: plain modules at the ORIGINAL (SAI / ComfyUI) key names and shapes of
sd3-family.md §5.2, with a diffusers twin made by diffusers' own converter.

There is no forward: the LoRA key map only needs names and shapes, and outputs come from the
twin (``convert_sd3_transformer_checkpoint_to_diffusers`` + ``SD3Transformer2DModel``), which
also proves by strict loading that the stand-in's names and shapes are a real checkpoint's.
"""

from __future__ import annotations

import torch
from torch import nn

# diffusers config of the twin (sd3-family.md §9.2: SD3.5-Medium-like, one dual layer, qk-norm)
SD3_KWARGS = dict(
    sample_size=16,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=48,
    caption_projection_dim=32,
    pooled_projection_dim=32,
    pos_embed_max_size=8,
    dual_attention_layers=(0,),
    qk_norm="rms_norm",
)


def original_layers(
    depth: int = 3,
    dim: int = 32,
    dual: tuple[int, ...] = (0,),
    context_in: int = 48,
    pooled: int = 32,
    patch_out: int = 64,
) -> dict[str, tuple[int, ...]]:
    """``{module: weight shape}`` of every Linear (and the patch-embed conv) of an original MMDiT."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(depth):
        last = i == depth - 1
        for side in ("x_block", "context_block"):
            block = f"joint_blocks.{i}.{side}"
            chunks = 2 if last and side == "context_block" else 9 if side == "x_block" and i in dual else 6
            shapes[f"{block}.adaLN_modulation.1"] = (chunks * dim, dim)
            shapes[f"{block}.attn.qkv"] = (3 * dim, dim)
            if not (last and side == "context_block"):
                shapes[f"{block}.attn.proj"] = (dim, dim)
                shapes[f"{block}.mlp.fc1"] = (4 * dim, dim)
                shapes[f"{block}.mlp.fc2"] = (dim, 4 * dim)
        if i in dual:
            shapes[f"joint_blocks.{i}.x_block.attn2.qkv"] = (3 * dim, dim)
            shapes[f"joint_blocks.{i}.x_block.attn2.proj"] = (dim, dim)
    shapes.update(
        {
            "x_embedder.proj": (dim, 16, 2, 2),
            "t_embedder.mlp.0": (dim, 256),
            "t_embedder.mlp.2": (dim, dim),
            "y_embedder.mlp.0": (dim, pooled),
            "y_embedder.mlp.2": (dim, dim),
            "context_embedder": (dim, context_in),
            "final_layer.linear": (patch_out, dim),
            "final_layer.adaLN_modulation.1": (2 * dim, dim),
        }
    )
    return shapes


def _put(root: nn.Module, name: str, module: nn.Module) -> None:
    *path, leaf = name.split(".")
    for part in path:
        if part not in root._modules:
            root.add_module(part, nn.Module())
        root = root._modules[part]
    root.add_module(leaf, module)


class _Norm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class StubMMDiT(nn.Module):
    """nn.Linear / nn.Conv2d at the original names, plus ``pos_embed`` and the qk-norm weights."""

    offload_units = ("joint_blocks",)

    def __init__(self, depth: int = 3, dim: int = 32, head_dim: int = 8, dual: tuple[int, ...] = (0,)):
        super().__init__()
        for name, shape in original_layers(depth, dim, dual).items():
            layer = (
                nn.Conv2d(shape[1], shape[0], 2, stride=2)
                if len(shape) == 4
                else nn.Linear(shape[1], shape[0])
            )
            _put(self, name, layer)
        for name, module in list(self.named_modules()):
            if name.endswith(("attn", "attn2")):
                module.ln_q, module.ln_k = _Norm(head_dim), _Norm(head_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, 64, dim))


def make_stub(seed: int = 0) -> StubMMDiT:
    torch.manual_seed(seed)
    stub = StubMMDiT()
    with torch.no_grad():
        for name, p in stub.named_parameters():
            if name == "pos_embed" or name.endswith(("ln_q.weight", "ln_k.weight")):
                p.copy_(torch.randn(p.shape) * (1.0 if name == "pos_embed" else 0.2) + (name != "pos_embed"))
    return stub.eval()


def original_state_dict(stub: StubMMDiT) -> dict[str, torch.Tensor]:
    """The stand-in as a checkpoint (copies: diffusers' converter pops from its input)."""
    return {key: value.detach().clone() for key, value in stub.state_dict().items()}


def diffusers_twin(stub: StubMMDiT):
    """``SD3Transformer2DModel`` holding the stand-in's weights, converted by diffusers' converter."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    model = SD3Transformer2DModel(**SD3_KWARGS)
    model.load_state_dict(
        convert_sd3_transformer_checkpoint_to_diffusers(original_state_dict(stub)), strict=True
    )
    return model.eval()


def twin_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(2, 16, 16, 12, generator=g),
        encoder_hidden_states=torch.randn(2, 10, 48, generator=g),
        pooled_projections=torch.randn(2, 32, generator=g),
        timestep=torch.tensor([500.0, 250.0]),
    )


def run_twin(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**twin_inputs(), return_dict=False)[0]
