"""Z-Image DiT files: detection, conversion (checked against diffusers' own converter), config
inference, fp8 dequantization, streaming, and every user error by its message."""

import inspect

import pytest
import torch
from safetensors.torch import load_file, save_file

from pascaline.errors import (
    ConfigError,
    InvalidArgumentError,
    MissingFileError,
    NotSafetensorsError,
    StateDictError,
    TruncatedFileError,
    WrongModelError,
)
from pascaline.formats.safetensors_io import WeightSource
from pascaline.formats.zimage_dit import (
    convert_comfy_dit,
    convert_diffusers_dit,
    detect_dit_format,
    infer_dit_config,
    iter_dit_tensors,
    load_dit,
)
from pascaline.models.zimage_dit import VARIANTS, ZImageDiT, ZImageDiTConfig
from tests.factories.dit import (
    COMFY_PREFIX,
    comfy_reference,
    make_tiny_diffusers_dit,
    run_diffusers,
    save_comfy_dit,
    save_diffusers_dit,
)

TINY = ZImageDiTConfig(**{**VARIANTS["tiny"].__dict__, "axes_lens": (1536, 512, 512)})  # as inferred


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 12, 20, generator=g)
    return x, torch.tensor([0.0, 0.6]), [torch.randn(7, 32, generator=g), torch.randn(45, 32, generator=g)]


def _parity(ref, ours, atol=1e-5):
    x, t, caps = _inputs()
    expected = run_diffusers(ref, x, t, caps)
    with torch.no_grad():
        got = ours(x, t, caps)
    torch.testing.assert_close(got, expected, rtol=atol, atol=atol)


@pytest.fixture(scope="module")
def ref():
    return make_tiny_diffusers_dit(seed=0)


@pytest.fixture(scope="module")
def comfy_file(ref, tmp_path_factory):
    """bf16, prefixed, with the stray norm_final.weight: like a ComfyUI AIO checkpoint."""
    return save_comfy_dit(ref, tmp_path_factory.mktemp("comfy") / "z_image_bf16.safetensors")


def test_comfy_conversion_matches_diffusers_oracle(comfy_file):
    """Ours (ComfyUI -> canonical) equals diffusers' convert_z_image_transformer_checkpoint_to_diffusers
    followed by our diffusers -> canonical map, tensor for tensor."""
    oracle = comfy_reference(comfy_file)  # loaded strictly into a diffusers model
    ours = convert_comfy_dit(load_file(str(comfy_file)))
    via_oracle = convert_diffusers_dit(oracle.state_dict())
    assert ours.keys() == via_oracle.keys()
    assert set(ours) == set(ZImageDiT(VARIANTS["tiny"]).state_dict())
    for key, value in ours.items():
        torch.testing.assert_close(value.float(), via_oracle[key], rtol=0, atol=0, msg=key)


def test_comfy_file_parity(comfy_file):
    _parity(comfy_reference(comfy_file), load_dit(comfy_file, dtype=torch.float32))


def test_comfy_file_without_prefix_or_stray_key(ref, tmp_path):
    path = save_comfy_dit(ref, tmp_path / "plain.safetensors", prefix=False, stray_norm_final=False,
                          dtype=torch.float32)
    assert not any(k.startswith(COMFY_PREFIX) for k in load_file(str(path)))
    _parity(ref, load_dit(path, dtype=torch.float32))


def test_aio_checkpoint_ignores_other_components(ref, tmp_path):
    path = save_comfy_dit(ref, tmp_path / "aio.safetensors", dtype=torch.float32)
    sd = load_file(str(path))
    sd["first_stage_model.decoder.conv_in.weight"] = torch.zeros(8, 16, 3, 3)
    save_file(sd, str(path))
    _parity(ref, load_dit(path, dtype=torch.float32))


@pytest.mark.parametrize(("fp8", "step"), [(torch.float8_e4m3fn, 2**-4), (torch.float8_e5m2, 2**-3)])
def test_comfy_scaled_fp8_dequantized_on_load(ref, tmp_path, fp8, step):
    path = save_comfy_dit(ref, tmp_path / "fp8.safetensors", fp8=fp8)
    stored = load_file(str(path))
    assert stored[COMFY_PREFIX + "layers.0.attention.qkv.weight"].dtype == fp8
    ours = load_dit(path, dtype=torch.float32)
    _parity(comfy_reference(path), ours)
    # dequantized, not just widened: within one fp8 rounding step of the original weights
    original = ref.layers[0].feed_forward.w1.weight
    assert (ours.layers[0].feed_forward.w1.weight - original).abs().max() <= step * original.abs().max()


@pytest.mark.parametrize(("shards", "dtype"), [(2, None), (1, None), (3, torch.bfloat16)])
def test_diffusers_folder_forms(ref, tmp_path, shards, dtype):
    folder = save_diffusers_dit(ref, tmp_path / "snap" / "transformer", shards=shards, dtype=dtype)
    assert len(list(folder.glob("*.safetensors"))) == shards
    ours = load_dit(tmp_path / "snap", dtype=torch.float32)  # the snapshot root finds transformer/
    if dtype is None:
        _parity(ref, ours)
    else:
        _parity(ref.to(dtype).float(), ours)
        ref.float()


def test_loads_bf16_by_default_and_config_override(ref, tmp_path):
    folder = save_diffusers_dit(ref, tmp_path / "transformer")
    assert next(load_dit(folder).parameters()).dtype == torch.bfloat16
    assert load_dit(folder, config="tiny").config == VARIANTS["tiny"]
    wrong = ZImageDiTConfig(**{**VARIANTS["tiny"].__dict__, "n_layers": 3})
    with pytest.raises(StateDictError, match="missing key.*layers.2"):
        load_dit(folder, config=wrong)
    with pytest.raises(InvalidArgumentError, match="unknown DiT config .huge.; use one of z-image-turbo"):
        load_dit(folder, config="huge")


def test_detect_format():
    sd = make_tiny_diffusers_dit(seed=2).state_dict()
    assert detect_dit_format(sd) == "diffusers"
    comfy = {COMFY_PREFIX + k: v for k, v in convert_diffusers_dit(sd).items()}
    assert detect_dit_format(comfy) == "comfy"
    assert detect_dit_format({k.removeprefix(COMFY_PREFIX): v for k, v in comfy.items()}) == "comfy"
    assert detect_dit_format({"decoder.conv_in.weight": 0, "encoder.conv_in.weight": 0}) is None


def test_infer_config_tiny_and_real_widths():
    sd = make_tiny_diffusers_dit(seed=2).state_dict()
    assert infer_dit_config({k: tuple(v.shape) for k, v in sd.items()}) == TINY
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        real = ZImageTransformer2DModel(axes_lens=[1536, 512, 512])  # the HF config, 6.15 B params
    cfg = infer_dit_config({k: tuple(v.shape) for k, v in real.state_dict().items()})
    assert cfg == VARIANTS["z-image-turbo"]
    assert (cfg.adaln_dim, cfg.t_mid_dim, cfg.axes_dims, cfg.ffn_hidden) == (256, 1024, (32, 48, 48), 10240)


def test_iter_streams_one_tensor_at_a_time(comfy_file):
    source = WeightSource(comfy_file)
    reads = []
    original = source.get
    source.get = lambda key: reads.append(key) or original(key)
    stream = iter_dit_tensors(source)
    assert inspect.isgenerator(stream)
    key, tensor = next(stream)
    assert len(reads) <= 3 and not key.startswith(COMFY_PREFIX)  # at most one q/k/v group so far
    assert tensor.dtype == torch.bfloat16


def test_diffusers_qkv_read_as_one_group(ref, tmp_path):
    folder = save_diffusers_dit(ref, tmp_path / "transformer")
    got = dict(iter_dit_tensors(folder))
    q, k, v = (ref.layers[1].attention.get_submodule(n).weight for n in ("to_q", "to_k", "to_v"))
    torch.testing.assert_close(got["layers.1.attention.qkv.weight"], torch.cat([q, k, v]))
    assert "norm_final.weight" not in got and "layers.1.attention.out.weight" in got


# ---- errors a user sees ------------------------------------------------------------------------


def test_missing(tmp_path):
    with pytest.raises(MissingFileError, match="nope.safetensors does not exist"):
        load_dit(tmp_path / "nope.safetensors")


def test_not_safetensors(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"x_embedder.weight": torch.zeros(4, 4)}}, path)  # a pickled checkpoint
    with pytest.raises(NotSafetensorsError, match="model.ckpt is not a safetensors file"):
        load_dit(path)


def test_truncated(comfy_file, tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(comfy_file.read_bytes()[:-1000])
    with pytest.raises(TruncatedFileError, match="cut.safetensors is truncated.*download it again"):
        load_dit(path)


@pytest.mark.parametrize(("tensors", "looks_like"), [
    ({"decoder.conv_in.weight": (8, 16, 3, 3), "encoder.conv_in.weight": (8, 3, 3, 3)}, "the FLUX.1 VAE"),
    ({"model.layers.0.self_attn.q_norm.weight": (16,), "model.embed_tokens.weight": (10, 8)},
     "a Qwen3 text encoder"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3)}, "a Stable Diffusion UNet"),
])
def test_wrong_model(tmp_path, tensors, looks_like):
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(s) for k, s in tensors.items()}, str(path))
    pattern = f"other.safetensors looks like {looks_like}.*not a Z-Image DiT"
    with pytest.raises(WrongModelError, match=pattern):
        load_dit(path)


def _shapes():
    sd = make_tiny_diffusers_dit(seed=2).state_dict()
    return {k: tuple(v.shape) for k, v in convert_diffusers_dit(sd).items()}


def test_shapes_no_config_explains():
    shapes = _shapes()
    shapes["layers.0.attention.qkv.weight"] = (190, 64)
    with pytest.raises(ConfigError, match=r"qkv.weight has shape \(190, 64\).*dim 64.*imply \(192, 64\)"):
        infer_dit_config(shapes)
    shapes = _shapes()
    shapes.update({f"layers.0.attention.{n}_norm.weight": (8,) for n in "qk"})
    with pytest.raises(ConfigError, match="head_dim 8 cannot be split"):
        infer_dit_config(shapes)
    shapes = _shapes()
    del shapes["t_embedder.mlp.2.weight"]
    with pytest.raises(ConfigError, match="lack t_embedder.mlp.2.weight"):
        infer_dit_config(shapes)


def test_extra_keys_are_listed(ref, tmp_path):
    """An Omni/Edit file (siglip keys) is not silently loaded as Turbo."""
    sd = {k: v for k, v in ref.state_dict().items()}
    sd["siglip_pad_token"] = torch.zeros(1, 64)
    path = tmp_path / "omni.safetensors"
    save_file(sd, str(path))
    with pytest.raises(StateDictError, match="omni.safetensors does not match.*unexpected.*siglip_pad_token"):
        load_dit(path)
