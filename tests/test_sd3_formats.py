"""SD3/SD3.5 MMDiT files: detection, conversion (checked against diffusers' own converter), every
file form users have, scaled fp8, config inference from shapes, streaming, and every wrong file
by its message."""

import copy
import inspect
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file

from pascaline.errors import (
    ConfigError,
    InvalidArgumentError,
    StateDictError,
    TruncatedFileError,
    WrongModelError,
)
from pascaline.formats.detect import guess_kind
from pascaline.formats.safetensors_io import WeightSource
from pascaline.formats.sd3_mmdit import (
    convert_diffusers_mmdit,
    convert_original_mmdit,
    detect_mmdit_format,
    infer_mmdit_config,
    iter_mmdit_tensors,
    load_mmdit,
)
from pascaline.models.mmdit import VARIANTS, MMDiT
from tests.factories.sd3 import (
    COMFY_PREFIX,
    KWARGS,
    REAL_KWARGS,
    diffusers_to_original,
    make_diffusers_mmdit,
    mmdit_inputs,
    original_reference,
    run_diffusers,
    save_diffusers,
    save_original,
)

FORMS = ["original-checkpoint", "original-plain", "diffusers-sharded", "diffusers-lone"]


@pytest.fixture(scope="module")
def refs():
    return {name: make_diffusers_mmdit(name, seed=i) for i, name in enumerate(KWARGS)}


def _write(ref, form, base):
    """``ref`` in one of the forms users have; returns what a user would pass to the loader."""
    if form == "original-checkpoint":  # sd3.5_large.safetensors: prefixed, with VAE and text encoders
        return save_original(ref, base / "sd3.5_checkpoint.safetensors", dtype=torch.float16,
                             other_components=True)
    if form == "original-plain":  # a ComfyUI diffusion_models/ file without prefix
        return save_original(ref, base / "mmdit.safetensors", prefix=False)
    if form == "diffusers-sharded":  # the snapshot root of a diffusers folder with an index json
        save_diffusers(ref, base / "snapshot" / "transformer", shards=3)
        return base / "snapshot"
    # SimpleTuner checkpoint-N/transformer/diffusion_pytorch_model.safetensors, copied alone into unet/
    folder = save_diffusers(ref, base / "checkpoint-500" / "transformer", shards=1, config=False)
    lone = base / "unet" / "my_finetune.safetensors"
    lone.parent.mkdir()
    (folder / "diffusion_pytorch_model.safetensors").rename(lone)
    return lone


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("variant", list(KWARGS))
def test_every_form_loads_with_parity(refs, tmp_path, variant, form):
    ref = refs[variant]
    path = _write(ref, form, tmp_path)
    ours = load_mmdit(path, dtype=torch.float32)
    assert ours.config == VARIANTS[variant]  # inferred from the shapes
    expected_ref = copy.deepcopy(ref).half().float() if form == "original-checkpoint" else ref  # as stored
    x, t, ctx, pooled = mmdit_inputs(variant)
    expected = run_diffusers(expected_ref, x, t, ctx, pooled)
    with torch.no_grad():
        got = ours(x, t, ctx, pooled)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_original_conversion_matches_diffusers_oracle(refs, tmp_path):
    """Ours (original -> canonical) equals diffusers' convert_sd3_transformer_checkpoint_to_diffusers
    followed by our diffusers -> canonical map, tensor for tensor, for every kind of block."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    for variant, ref in refs.items():
        path = save_original(ref, tmp_path / f"{variant}.safetensors", other_components=True)
        checkpoint = load_file(str(path))
        ours = convert_original_mmdit(checkpoint)
        mmdit_only = {k: v for k, v in checkpoint.items() if k.startswith(COMFY_PREFIX)}
        diffusers_sd = convert_sd3_transformer_checkpoint_to_diffusers(dict(mmdit_only))  # it pops: a copy
        SD3Transformer2DModel(**KWARGS[variant]).load_state_dict(diffusers_sd, strict=True)
        via_oracle = convert_diffusers_mmdit(diffusers_sd)
        assert ours.keys() == via_oracle.keys() == MMDiT(VARIANTS[variant]).state_dict().keys()
        for key, value in ours.items():
            torch.testing.assert_close(value, via_oracle[key], rtol=0, atol=0, msg=key)


def test_diffusers_conversion_swaps_and_fuses(refs):
    ref = refs["tiny"]
    sd = convert_diffusers_mmdit(ref.state_dict())
    last = ref.transformer_blocks[2]
    scale, shift = last.norm1_context.linear.weight.chunk(2)  # diffusers' AdaLayerNormContinuous order
    torch.testing.assert_close(sd["joint_blocks.2.context_block.adaLN_modulation.1.weight"],
                               torch.cat([shift, scale]))
    dual = ref.transformer_blocks[0].attn2
    torch.testing.assert_close(sd["joint_blocks.0.x_block.attn2.qkv.bias"],
                               torch.cat([dual.to_q.bias, dual.to_k.bias, dual.to_v.bias]))
    assert "joint_blocks.2.context_block.attn.proj.weight" not in sd  # context_pre_only: no output
    assert sd["pos_embed"].data_ptr() == ref.pos_embed.pos_embed.data_ptr()  # copies share the tensor


@pytest.mark.parametrize(("fp8", "scale_name", "step"), [(torch.float8_e4m3fn, "scale_weight", 2**-4),
                                                          (torch.float8_e5m2, "weight_scale", 2**-3)])
def test_scaled_fp8_equals_dequantized_float_model(refs, tmp_path, fp8, scale_name, step):
    ref = refs["tiny"]
    path = save_original(ref, tmp_path / "sd3.5_fp8_scaled.safetensors", fp8=fp8, scale_name=scale_name,
                         other_components=True)
    stored = load_file(str(path))
    assert stored[COMFY_PREFIX + "joint_blocks.0.x_block.attn.qkv.weight"].dtype == fp8
    assert COMFY_PREFIX + f"joint_blocks.0.x_block.attn.qkv.{scale_name}" in stored
    ours = load_mmdit(path, dtype=torch.float32)
    inputs = mmdit_inputs("tiny")
    with torch.no_grad():
        got = ours(*inputs)
    expected = run_diffusers(original_reference(path, "tiny"), *inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # dequantized, not merely widened: within one fp8 rounding step of the original weights
    original = ref.transformer_blocks[1].ff.net[0].proj.weight
    loaded = ours.joint_blocks[1].x_block.mlp.fc1.weight
    assert (loaded - original).abs().max() <= step * original.abs().max()


def test_detect_format(refs):
    sd = refs["tiny"].state_dict()
    assert detect_mmdit_format(sd) == "diffusers"
    original = diffusers_to_original(sd)
    assert detect_mmdit_format(original) == "original"
    assert detect_mmdit_format({COMFY_PREFIX + k: v for k, v in original.items()}) == "original"
    assert detect_mmdit_format({"first_stage_model.decoder.conv_in.weight": 0}) is None
    unprefixed_checkpoint = {**original, "first_stage_model.decoder.conv_in.weight": torch.zeros(1),
                             "text_encoders.clip_g.transformer.text_projection.weight": torch.zeros(1)}
    assert convert_original_mmdit(unprefixed_checkpoint).keys() == MMDiT(VARIANTS["tiny"]).state_dict().keys()
    assert detect_mmdit_format({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": 0}) is None
    assert guess_kind(_shapes(sd)) == guess_kind(_shapes(original)) == "sd3-mmdit"


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_infer_config_tiny_real_and_quantized(refs):
    from diffusers import SD3Transformer2DModel

    from pascaline.quant import quantize_, scheme_from_name

    for name, ref in refs.items():
        assert infer_mmdit_config(_shapes(ref.state_dict())) == VARIANTS[name]
    for name, kwargs in REAL_KWARGS.items():
        with torch.device("meta"):
            real = SD3Transformer2DModel(**kwargs)  # the HF config: diffusers names
            ours = MMDiT(VARIANTS[name])
        assert infer_mmdit_config(_shapes(real.state_dict())) == VARIANTS[name]
        prefixed = {COMFY_PREFIX + k: v for k, v in _shapes(ours.state_dict()).items()}
        assert infer_mmdit_config(prefixed) == VARIANTS[name]  # the original single file's names
    with torch.device("meta"):
        quantized = quantize_(MMDiT(VARIANTS["sd3.5-large"]), scheme_from_name("int8"))
    shapes = _shapes(quantized.state_dict())
    assert "joint_blocks.0.x_block.attn.qkv.qweight" in shapes
    assert infer_mmdit_config(shapes) == VARIANTS["sd3.5-large"]


def _tiny_shapes():
    return _shapes(MMDiT(VARIANTS["tiny"]).state_dict())


@pytest.mark.parametrize(("edit", "pattern"), [
    (lambda s: s.update({"joint_blocks.1.x_block.attn.qkv.weight": (90, 32)}),
     r"joint_blocks.1.x_block.attn.qkv.weight has shape \(90, 32\) where hidden 32.*imply \(96, 32\)"),
    (lambda s: s.update({"pos_embed": (1, 250, 32)}), r"pos_embed of \(1, 250, 32\) fit no MMDiT"),
    (lambda s: s.pop("y_embedder.mlp.0.weight"), "lack y_embedder.mlp.0.weight"),
    (lambda s: s.update({f"joint_blocks.0.x_block.attn.ln_{n}.weight": (12,) for n in "qk"}),
     r"hidden 32 \(x_embedder\) with heads of 12"),
])
def test_shapes_no_config_explains(edit, pattern):
    shapes = _tiny_shapes()
    edit(shapes)
    with pytest.raises(ConfigError, match=pattern):
        infer_mmdit_config(shapes)


def test_iter_streams_one_tensor_at_a_time(refs, tmp_path):
    path = save_original(refs["tiny"], tmp_path / "sd3.safetensors", other_components=True)
    source = WeightSource(path)
    with mock.patch.object(source, "get", wraps=source.get) as get:
        stream = iter_mmdit_tensors(source)
        assert inspect.isgenerator(stream)
        key, _ = next(stream)
        assert get.call_count == 1 and not key.startswith(COMFY_PREFIX)
        keys = [k for k, _ in stream]
    reads = [c.args[0] for c in get.call_args_list]
    assert not any(k.startswith(("first_stage_model.", "text_encoders.")) for k in keys)
    assert not any(r.startswith(("first_stage_model.", "text_encoders.")) for r in reads)


def test_diffusers_qkv_read_as_one_group(refs, tmp_path):
    ref = refs["tiny-large"]
    got = dict(iter_mmdit_tensors(save_diffusers(ref, tmp_path / "transformer")))
    attn = ref.transformer_blocks[1].attn
    torch.testing.assert_close(got["joint_blocks.1.context_block.attn.qkv.weight"],
                               torch.cat([attn.add_q_proj.weight, attn.add_k_proj.weight,
                                          attn.add_v_proj.weight]))


def test_loads_bf16_by_default_and_config_override(refs, tmp_path):
    path = save_original(refs["tiny"], tmp_path / "sd3.safetensors")
    model = load_mmdit(path)
    assert {p.dtype for p in model.parameters()} | {model.pos_embed.dtype} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert load_mmdit(path, config="tiny").config == VARIANTS["tiny"]
    with pytest.raises(StateDictError, match="missing key.*joint_blocks.2.x_block.attn2"):
        load_mmdit(path, config=VARIANTS["tiny"].__class__(**{**VARIANTS["tiny"].__dict__,
                                                             "dual_attention_layers": (0, 2)}))
    with pytest.raises(InvalidArgumentError, match="unknown MMDiT config .huge.; use one of sd3-medium"):
        load_mmdit(path, config="huge")


def test_extra_keys_are_listed(refs, tmp_path):
    """An unknown tensor under the MMDiT prefix (a ControlNet add-on, say) is not silently dropped."""
    path = save_original(refs["tiny"], tmp_path / "sd3.safetensors")
    sd = load_file(str(path))
    sd[COMFY_PREFIX + "controlnet_blocks.0.weight"] = torch.zeros(32, 32)
    save_file(sd, str(path))
    with pytest.raises(StateDictError, match="sd3.safetensors does not match.*unexpected.*controlnet_blocks"):
        load_mmdit(path)


def test_truncated(refs, tmp_path):
    path = save_original(refs["tiny"], tmp_path / "full.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(TruncatedFileError, match="cut.safetensors is truncated"):
        load_mmdit(cut)


def _zimage_dit():
    from pascaline.formats.zimage_dit import convert_diffusers_dit
    from tests.factories.dit import make_tiny_diffusers_dit

    sd = convert_diffusers_dit(make_tiny_diffusers_dit().state_dict())
    return {COMFY_PREFIX + k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize(("tensors", "looks_like"), [
    (_zimage_dit, "a Z-Image DiT"),
    ({"double_blocks.0.img_attn.qkv.weight": (96, 32), "img_in.weight": (32, 64)}, "a FLUX.1 transformer"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3)}, "a Stable Diffusion UNet"),
    ({"decoder.conv_in.weight": (8, 16, 3, 3), "encoder.conv_in.weight": (8, 3, 3, 3)}, "the FLUX.1 VAE"),
    ({"text_model.encoder.layers.0.mlp.fc1.weight": (37, 16)}, "a CLIP or T5 text encoder"),
    ({"encoder.block.0.layer.0.SelfAttention.q.weight": (48, 48), "shared.weight": (100, 48)},
     "a CLIP or T5 text encoder"),
])
def test_wrong_model(tmp_path, tensors, looks_like):
    shapes = tensors() if callable(tensors) else tensors
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path))
    pattern = f"other.safetensors looks like {looks_like}.*not an SD3/SD3.5 MMDiT; pass the diffusion model"
    with pytest.raises(WrongModelError, match=pattern):
        load_mmdit(path)
    with pytest.raises(WrongModelError, match=f"look like {looks_like}"):
        infer_mmdit_config(shapes)
