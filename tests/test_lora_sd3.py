"""SD3/SD3.5 LoRAs on a stand-in MMDiT with the original key names and shapes (sd3-family.md §5.2).

The reference is diffusers' SD3Transformer2DModel holding the same weights (made by diffusers'
own converter) with the LoRA injected by PEFT. Ours: the LoRA merged into the stand-in by
``apply_loras_`` + ``sd3_lora_targets``, then converted by the same diffusers converter and run.
So the q/k/v row slices and the (scale, shift) swap of the last block's context modulation and
of the final layer are checked against diffusers' ``swap_scale_shift`` and qkv split.
"""

import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from pascaline.errors import LoraError
from pascaline.formats.sd3_lora import sd3_lora_targets
from pascaline.formats.zimage_lora import zimage_lora_targets
from pascaline.lora import LoraWarning, apply_loras_, lora_state, read_lora
from tests.factories.lora import fuse_qkv_lora, kohya_keys, peft_inject_, peft_keys, random_lora, save_lora
from tests.factories.sd3_stub import diffusers_twin, make_stub, run_twin

RANK, ALPHA, STRENGTH = 4, 8.0, 0.7
SCALE = ALPHA / RANK
LAST = 2  # the stand-in's last joint block (context_pre_only)

# the test's own diffusers -> original names (sd3-family.md §5.3, read in reverse)
_QKV = (
    ("attn.to_{}", "x_block.attn.qkv"),
    ("attn.add_{}_proj", "context_block.attn.qkv"),
    ("attn2.to_{}", "x_block.attn2.qkv"),
)
_RENAMES = (
    ("attn.to_out.0", "x_block.attn.proj"),
    ("attn.to_add_out", "context_block.attn.proj"),
    ("attn2.to_out.0", "x_block.attn2.proj"),
    ("norm1.linear", "x_block.adaLN_modulation.1"),
    ("norm1_context.linear", "context_block.adaLN_modulation.1"),
    ("ff.net.0.proj", "x_block.mlp.fc1"),
    ("ff.net.2", "x_block.mlp.fc2"),
    ("ff_context.net.0.proj", "context_block.mlp.fc1"),
    ("ff_context.net.2", "context_block.mlp.fc2"),
)
_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}


def _swap(up):
    half = up.shape[0] // 2
    return torch.cat([up[half:], up[:half]])


def to_original(lora) -> dict:
    """diffusers-named pairs -> original names; q/k/v fused kohya's split_qkv way (rank 3r)."""
    out = {}
    for name, (down, up) in lora.items():
        if name in _TOP:
            out[_TOP[name]] = (down, _swap(up) if name == "norm_out.linear" else up)
            continue
        _, i, rest = name.split(".", 2)
        for pattern, fused in _QKV:
            if rest == pattern.format("q"):
                parts = [lora[f"transformer_blocks.{i}.{pattern.format(p)}"] for p in "qkv"]
                out[f"joint_blocks.{i}.{fused}"] = fuse_qkv_lora(*parts)
        for old, new in _RENAMES:
            if rest == old:
                swap = old == "norm1_context.linear" and int(i) == LAST
                out[f"joint_blocks.{i}.{new}"] = (down, _swap(up) if swap else up)
    return out


def _alphas(sd, original):
    """kohya alphas: ALPHA per module, 3 x ALPHA on a fused qkv of rank 3r (alpha / rank kept)."""
    for key in [k for k in sd if k.endswith(".alpha")]:
        if key.removesuffix(".alpha").replace("_", ".").endswith("qkv") and original:
            sd[key] = torch.tensor(3 * ALPHA)
    return sd


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd3lora")
    twin = diffusers_twin(make_stub())
    base = run_twin(twin)
    linears = {
        n: (m.out_features, m.in_features) for n, m in twin.named_modules() if isinstance(m, nn.Linear)
    }
    lora = random_lora(linears, RANK, seed=2)
    g = torch.Generator().manual_seed(3)
    lora["pos_embed.proj"] = (
        torch.randn(RANK, 16, 2, 2, generator=g) / 8,
        torch.randn(32, RANK, 1, 1, generator=g) / 8,
    )
    peft = peft_inject_(twin, lora, RANK, ALPHA, STRENGTH, tmp / "peft")
    return dict(
        tmp=tmp,
        lora=lora,
        base=base,
        expected=run_twin(twin),
        peft=peft,
    )


def _peft_file(setup, prefix):
    from safetensors import safe_open

    with safe_open(str(setup["peft"]), "pt") as f:
        meta = f.metadata()
    return {prefix + k: v for k, v in load_file(str(setup["peft"])).items()}, meta


FORMATS = {
    "diffusers-peft": lambda s: _peft_file(s, ""),
    "transformer.": lambda s: (_peft_file(s, "transformer.")[0], None),  # no metadata: alpha in up
    "base_model.model.": lambda s: _peft_file(s, "base_model.model."),
    ".lora_B.default.weight": lambda s: (peft_keys(_scaled(s["lora"]), "", "default"), None),
    "lora_transformer_ (OneTrainer)": lambda s: (kohya_keys(s["lora"], "lora_transformer_", ALPHA), None),
    "lycoris_ (SimpleTuner)": lambda s: (kohya_keys(s["lora"], "lycoris_", ALPHA), None),
    "lora_unet_ (kohya, fused qkv)": lambda s: (
        _alphas(kohya_keys(to_original(s["lora"]), "lora_unet_", ALPHA), True),
        None,
    ),
    "diffusion_model. (ComfyUI)": lambda s: (
        _alphas(kohya_keys(to_original(s["lora"]), "diffusion_model.", ALPHA, dotted=True), True),
        None,
    ),
}


def _scaled(lora):
    return {n: (d, u * SCALE) for n, (d, u) in lora.items()}


def _write(setup, fmt):
    sd, meta = FORMATS[fmt](setup)
    if fmt == "transformer.":
        sd = {k: (v * SCALE if ".lora_B." in k else v) for k, v in sd.items()}
    return save_lora(sd, setup["tmp"] / f"{abs(hash(fmt))}.safetensors", meta)


def _merged_stub(path, mode="auto"):
    stub = make_stub()
    apply_loras_(stub, [(read_lora(path), STRENGTH)], sd3_lora_targets, mode)
    return stub


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_matches_peft_on_diffusers(setup, fmt):
    stub = _merged_stub(_write(setup, fmt))
    assert (setup["expected"] - setup["base"]).abs().max() > 0.05
    torch.testing.assert_close(run_twin(diffusers_twin(stub)), setup["expected"], rtol=1e-5, atol=1e-5)


def test_kohya_fused_qkv_equals_peft_split(setup):
    split = _merged_stub(_write(setup, "diffusers-peft")).state_dict()
    fused = _merged_stub(_write(setup, "lora_unet_ (kohya, fused qkv)")).state_dict()
    for key in split:
        torch.testing.assert_close(fused[key], split[key], rtol=1e-6, atol=1e-7)
    delta = (
        split[f"joint_blocks.{LAST}.context_block.adaLN_modulation.1.weight"]
        - make_stub().state_dict()[f"joint_blocks.{LAST}.context_block.adaLN_modulation.1.weight"]
    )
    down, up = setup["lora"][f"transformer_blocks.{LAST}.norm1_context.linear"]
    torch.testing.assert_close(
        delta, STRENGTH * SCALE * _swap(up) @ down, rtol=1e-5, atol=1e-6
    )  # (shift, scale)


def test_branch_equals_merge_module_by_module(setup):
    path = _write(setup, "diffusers-peft")
    merged, branched = _merged_stub(path, "merge"), _merged_stub(path, "branch")
    state = lora_state(branched)
    assert "x_embedder.proj" in state.merged and len(state.branched) == len(setup["lora"]) - 1 - 2 * 7
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name in state.branched:
            layer = merged.get_submodule(name)
            x = torch.randn(3, layer.in_features, generator=g)
            torch.testing.assert_close(branched.get_submodule(name)(x), layer(x), rtol=1e-5, atol=1e-5)


def test_text_encoder_parts_are_announced_not_dropped_silently(setup):
    sd = kohya_keys(to_original(setup["lora"]), "lora_unet_", ALPHA)
    sd.update(
        kohya_keys(
            {"text_model.encoder.layers.0.self_attn.q_proj": (torch.zeros(4, 8), torch.zeros(8, 4))},
            "lora_te1_",
        )
    )
    path = save_lora(_alphas(sd, True), setup["tmp"] / "with_te.safetensors")
    with pytest.warns(LoraWarning, match="also holds 1 text-encoder LoRA module"):
        stub = _merged_stub(path)
    torch.testing.assert_close(run_twin(diffusers_twin(stub)), setup["expected"], rtol=1e-5, atol=1e-5)
    te_only = save_lora(
        {k: v for k, v in sd.items() if "lora_te1_" in k}, setup["tmp"] / "te_only.safetensors"
    )
    with pytest.raises(LoraError, match="holds only text-encoder LoRA weights"):
        _merged_stub(te_only)


def test_unknown_keys_and_other_families(setup):
    d, u = setup["lora"]["transformer_blocks.0.attn.to_out.0"]
    # the last block's context side has no proj: a LoRA for it fits no module
    bad = kohya_keys(
        {f"joint_blocks.{LAST}.context_block.attn.proj": (d, u), "joint_blocks.0.x_block.attn.proj": (d, u)}
    )
    path = save_lora(bad, setup["tmp"] / "unknown.safetensors")
    with pytest.raises(
        LoraError, match=f"1 of its 2 .* SD3/SD3.5 model .*joint_blocks_{LAST}_context_block_attn_proj"
    ):
        _merged_stub(path)
    zimage = save_lora(kohya_keys({"layers.0.attention.to_q": (d, u)}), setup["tmp"] / "z.safetensors")
    with pytest.raises(LoraError, match="is a LoRA for Z-Image, not for this SD3/SD3.5 model"):
        _merged_stub(zimage)
    sd3 = read_lora(_write(setup, "diffusers-peft"))
    from pascaline.formats.zimage_dit import load_dit
    from tests.factories.dit import make_tiny_diffusers_dit, save_comfy_dit

    dit = load_dit(save_comfy_dit(make_tiny_diffusers_dit(), setup["tmp"] / "dit.safetensors"))
    with pytest.raises(LoraError, match="is a LoRA for SD3/SD3.5, not for this Z-Image model"):
        apply_loras_(dit, [(sd3, 1.0)], zimage_lora_targets)


def test_a_lora_for_another_size(setup):
    wide = peft_keys({"transformer_blocks.0.attn.to_q": (torch.zeros(4, 64), torch.zeros(64, 4))})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(LoraError, match=r"has \[96, 32\]; is the LoRA for another model size"):
            _merged_stub(save_lora(wide, setup["tmp"] / "wide.safetensors"))
