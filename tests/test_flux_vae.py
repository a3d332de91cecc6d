"""FLUX VAE: names, conversion and parity with diffusers' AutoencoderKL (tiny, random, fp32)."""

import pytest
import torch
from safetensors.torch import save_file

from pascaline.errors import (
    ConfigError,
    InvalidArgumentError,
    MissingFileError,
    StateDictError,
    TruncatedFileError,
    WrongModelError,
)
from pascaline.formats.flux_vae import (
    FluxVAE,
    convert_diffusers_vae,
    infer_vae_config,
    load_vae,
    to_pil,
)
from pascaline.models.flux_vae import VARIANTS, FluxAutoEncoder, FluxVAEConfig
from tests.factories.vae import (
    FLUX_VAE,
    TINY_VAE,
    bfl_keys_and_shapes,
    bfl_state_dict,
    bfl_to_diffusers_names,
    make_diffusers_vae,
    save_bfl_vae,
    save_diffusers_vae,
)

SCALE, SHIFT = 0.3611, 0.1159


@pytest.fixture(scope="module")
def ref():
    return make_diffusers_vae(seed=3)


@pytest.fixture(scope="module")
def files(ref, tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    save_diffusers_vae(ref, root / "snapshot")
    return {
        "bfl": save_bfl_vae(ref, root / "ae.safetensors"),
        "bfl_prefixed": save_bfl_vae(
            ref,
            root / "ckpt.safetensors",
            prefix="first_stage_model.",
            extra={"model.diffusion_model.out.0.weight": torch.ones(4)},
        ),
        "diffusers_folder": root / "snapshot" / "vae",
        "snapshot_root": root / "snapshot",
    }


def test_oracle_convert_ldm_vae_checkpoint(ref):
    # diffusers' own BFL -> diffusers conversion of the factory's BFL dict gives back the model's
    # weights, and our diffusers -> BFL conversion gives exactly that BFL dict.
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    bfl = bfl_state_dict(ref)
    back = convert_ldm_vae_checkpoint(bfl, dict(ref.config))
    sd = ref.state_dict()
    assert set(back) == set(sd)
    assert all(torch.equal(back[k].reshape(sd[k].shape), sd[k]) for k in sd)
    ours = convert_diffusers_vae(sd)
    assert set(ours) == set(bfl)
    for k in bfl:
        assert ours[k].shape == bfl[k].shape and torch.equal(ours[k], bfl[k]), k
    assert ours["decoder.up.3.block.0.conv1.weight"].shape == (64, 64, 3, 3)  # up index reversed
    assert ours["decoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)


def test_real_width_names_and_sizes():
    # Our module names at FLUX width are what diffusers' converter knows as the BFL names,
    # one to one with diffusers' own FLUX AutoencoderKL, and the parameter counts are BFL's.
    from diffusers import AutoencoderKL

    shapes = bfl_keys_and_shapes(VARIANTS["flux"])
    names = bfl_to_diffusers_names(shapes, FLUX_VAE)
    with torch.device("meta"):
        diffusers_sd = AutoencoderKL(**FLUX_VAE).state_dict()
    assert set(names.values()) == set(diffusers_sd)
    with torch.device("meta"):
        model = FluxAutoEncoder(VARIANTS["flux"])
    assert sum(p.numel() for p in model.encoder.parameters()) == 34_274_208
    assert sum(p.numel() for p in model.decoder.parameters()) == 49_545_475
    assert infer_vae_config(shapes) == VARIANTS["flux"]


def test_infer_config_tiny_and_bad():
    assert infer_vae_config(bfl_keys_and_shapes(VARIANTS["tiny"])) == VARIANTS["tiny"]
    with pytest.raises(ConfigError, match="decoder.conv_out.weight"):
        infer_vae_config({"decoder.up.0.block.0.conv2.weight": (32, 32, 3, 3)})
    with pytest.raises(ConfigError, match="multiples of 32"):
        FluxVAEConfig(ch=16, ch_mult=(1, 2))


def _latent(b=2, h=4, w=6):
    return torch.randn(b, 16, h, w, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def expected_decode(ref):
    with torch.no_grad():
        return ref.decode(_latent() / SCALE + SHIFT).sample


@pytest.fixture(scope="module")
def image_and_expected_latent(ref):
    image = torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(8)) * 2 - 1
    with torch.no_grad():
        return image, (ref.encode(image).latent_dist.mean - SHIFT) * SCALE


@pytest.mark.parametrize("form", ["bfl", "bfl_prefixed", "diffusers_folder", "snapshot_root"])
def test_decode_equals_diffusers(files, expected_decode, form):
    vae = load_vae(files[form])
    assert isinstance(vae, FluxVAE) and vae.config == VARIANTS["tiny"] and vae.dtype == torch.float32
    latent = _latent()
    with torch.no_grad():
        raw = vae.model.decode(latent / SCALE + SHIFT)
    assert expected_decode.abs().max() > 1.5  # unclamped values exist: the raw check sees them
    torch.testing.assert_close(raw, expected_decode, rtol=0, atol=2e-5)
    out = vae.decode(latent)
    assert out.shape == (2, 3, 32, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected_decode.clamp(-1, 1), rtol=0, atol=2e-5)


@pytest.mark.parametrize("form", ["bfl", "diffusers_folder"])
def test_encode_equals_diffusers(files, image_and_expected_latent, form):
    vae = load_vae(files[form])
    image, expected = image_and_expected_latent
    latent = vae.encode(image)
    assert latent.shape == (2, 16, 4, 5)
    torch.testing.assert_close(latent, expected, rtol=0, atol=1e-5)


def test_bf16_close_to_fp32(files):
    vae32, vae16 = load_vae(files["bfl"]), load_vae(files["bfl"], dtype=torch.bfloat16)
    assert vae16.dtype == torch.bfloat16 and vae16.model.encoder.conv_in.weight.dtype == torch.bfloat16
    latent = _latent(1, 3, 3)
    a, b = vae32.decode(latent), vae16.decode(latent)
    assert b.dtype == torch.float32
    assert (a - b).abs().mean() < 0.03 and (a - b).abs().mean() > 0  # really computed in bf16


def test_fp16_refused_unless_forced(files):
    with pytest.raises(InvalidArgumentError, match="float16.*allow_fp16=True"):
        load_vae(files["bfl"], dtype=torch.float16)
    vae = load_vae(files["bfl"], dtype=torch.float16, allow_fp16=True)
    assert vae.dtype == torch.float16
    with pytest.raises(InvalidArgumentError, match="float16"):
        load_vae(files["bfl"]).to(dtype=torch.float16)
    with pytest.raises(InvalidArgumentError, match="float32 or bfloat16"):
        load_vae(files["bfl"], dtype=torch.int8)


def test_missing_and_truncated_files(files, tmp_path):
    with pytest.raises(MissingFileError, match="does not exist"):
        load_vae(tmp_path / "nope.safetensors")
    data = files["bfl"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(TruncatedFileError, match="cut.safetensors is truncated"):
        load_vae(cut)


def test_wrong_model_named(tmp_path):
    dit = tmp_path / "dit.safetensors"
    dit_sd = {"cap_embedder.1.weight": torch.zeros(8, 4), "layers.0.attention.qkv.weight": torch.zeros(24, 8)}
    save_file(dit_sd, str(dit))
    with pytest.raises(WrongModelError, match="looks like a Z-Image DiT, not the FLUX.1 VAE"):
        load_vae(dit)
    sd_vae = tmp_path / "sd_vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(64, 4, 3, 3)}, str(sd_vae))
    with pytest.raises(WrongModelError, match="Stable Diffusion VAE"):
        load_vae(sd_vae)


def test_incomplete_file_lists_keys(ref, tmp_path):
    sd = bfl_state_dict(ref)
    del sd["decoder.mid.attn_1.q.bias"]
    sd["decoder.extra.weight"] = torch.zeros(2)
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    with pytest.raises(StateDictError, match=r"missing key.*mid\.attn_1\.q\.bias.*unexpected.*extra"):
        load_vae(path)


def test_bad_inputs(files):
    vae = load_vae(files["bfl"])
    with pytest.raises(InvalidArgumentError, match=r"\[B, 16, h, w\]"):
        vae.decode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(InvalidArgumentError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(InvalidArgumentError, match="not both"):
        vae.decode(torch.zeros(1, 16, 8, 8), tile=8, budget_bytes=2**30)


def test_to_pil():
    images = torch.stack([torch.full((3, 8, 16), -1.0), torch.full((3, 8, 16), 1.0)])
    images[1, 0, 0, 0] = 0.0
    pil = to_pil(images, rounding="round")
    assert [p.size for p in pil] == [(16, 8), (16, 8)] and pil[0].mode == "RGB"
    assert pil[0].getpixel((3, 3)) == (0, 0, 0) and pil[1].getpixel((3, 3)) == (255, 255, 255)
    assert pil[1].getpixel((0, 0)) == (128, 255, 255)


def test_tiny_variant_matches_factory_config():
    assert VARIANTS["tiny"].widths == TINY_VAE["block_out_channels"]
    assert VARIANTS["flux"].widths == FLUX_VAE["block_out_channels"] and VARIANTS["flux"].downscale == 8
