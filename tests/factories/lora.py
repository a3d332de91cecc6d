"""Random LoRAs written in the formats trainers write, and an independent plain merge.

A LoRA here is ``{module name: (down [r, in], up [out, r])}`` in the names its trainer
uses (diffusers names for most, original names for kohya SD3); writers spell it as each
tool does (sd3-family.md §7.1, §7.3). ``merge_into_state_dict`` is the test's own merge
(``W += strength * scale * up @ down`` on a state dict), written without pascaline's code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def random_lora(
    shapes: dict[str, tuple[int, int]],
    rank: int = 4,
    seed: int = 0,
    size: float = 0.3,
    dtype: torch.dtype = torch.float32,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random pairs whose delta ``up @ down`` is about ``size`` / sqrt(in) per element."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (n_out, n_in) in shapes.items():
        down = torch.randn(rank, n_in, generator=g) / n_in**0.5
        up = torch.randn(n_out, rank, generator=g) * size / rank**0.5
        out[name] = (down.to(dtype), up.to(dtype))
    return out


def peft_keys(lora, prefix: str = "transformer.", adapter: str | None = None) -> dict[str, torch.Tensor]:
    """diffusers / PEFT: ``{prefix}{m}.lora_A[.adapter].weight`` and ``lora_B``."""
    mid = f".{adapter}" if adapter else ""
    sd = {}
    for name, (down, up) in lora.items():
        sd[f"{prefix}{name}.lora_A{mid}.weight"] = down
        sd[f"{prefix}{name}.lora_B{mid}.weight"] = up
    return sd


def kohya_keys(
    lora, prefix: str = "lora_unet_", alpha: float | None = None, dotted: bool = False
) -> dict[str, torch.Tensor]:
    """kohya / musubi / OneTrainer / LyCORIS: ``{prefix}{m_underscored}.lora_down.weight``, ``.alpha``."""
    sd = {}
    for name, (down, up) in lora.items():
        base = prefix + (name if dotted else name.replace(".", "_"))
        sd[f"{base}.lora_down.weight"] = down
        sd[f"{base}.lora_up.weight"] = up
        if alpha is not None:
            sd[f"{base}.alpha"] = torch.tensor(float(alpha))
    return sd


def save_lora(sd: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def peft_metadata(rank: int, alpha: float, prefix: str = "transformer.") -> dict[str, str]:
    """diffusers' ``lora_adapter_metadata`` entry (``save_lora_weights(..., *_lora_adapter_metadata)``)."""
    config = {
        f"{prefix}r": rank,
        f"{prefix}lora_alpha": alpha,
        f"{prefix}alpha_pattern": {},
        f"{prefix}use_rslora": False,
    }
    return {"format": "pt", "lora_adapter_metadata": json.dumps(config)}


def merge_into_state_dict(sd: dict[str, torch.Tensor], lora, scale: float) -> dict[str, torch.Tensor]:
    """The test's own merge: ``sd[m.weight] += scale * up @ down`` (fp32, a new dict)."""
    out = dict(sd)
    for name, (down, up) in lora.items():
        key = name + ".weight"
        out[key] = (sd[key].double() + scale * (up.double() @ down.double())).to(sd[key].dtype)
    return out


def peft_inject_(model, lora, rank: int, alpha: float, strength: float, save_dir: Path) -> Path:
    """The reference: ``lora``'s pairs injected into a diffusers ``model`` by PEFT (active at
    ``strength``), and the adapter saved by diffusers' own writer; returns the written file."""
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(lora)), adapter_name="default")
    with torch.no_grad():
        for name, (down, up) in lora.items():
            layer = model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(down)
            layer.lora_B["default"].weight.copy_(up)
    model.save_lora_adapter(save_dir)  # bare names, the LoraConfig as lora_adapter_metadata
    model.set_adapters(["default"], weights=[strength])
    return Path(save_dir) / "pytorch_lora_weights.safetensors"


def fuse_qkv_lora(q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    """Split q/k/v pairs as one fused LoRA of rank 3r (kohya ``split_qkv``): cat downs, block-diagonal up."""
    down = torch.cat([q[0], k[0], v[0]])  # [3r, in]
    up = torch.block_diag(q[1], k[1], v[1])  # [3 out, 3r]
    return down, up
