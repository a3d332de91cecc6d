import pytest
import torch
from safetensors.torch import save_file

from pascaline.errors import MissingFileError, WrongModelError
from pascaline.quant.schemes import file_metadata, scheme_from_name
from pascaline.runtime.discovery import find_model_files, inspect_weights

DIT = {"cap_embedder.1.weight": (8, 4), "layers.0.attention.qkv.weight": (24, 8)}
TE = {"model.embed_tokens.weight": (10, 4), "model.layers.0.self_attn.q_norm.weight": (2,)}
VAE = {"decoder.conv_in.weight": (8, 16, 3, 3), "encoder.conv_in.weight": (8, 3, 3, 3)}


def _write(path, shapes, dtype=torch.bfloat16, metadata=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.zeros(s, dtype=dtype) for k, s in shapes.items()}, str(path), metadata=metadata)
    return path


def _comfy(root, dit="diffusion_models", te="text_encoders"):
    _write(root / dit / "z_image_turbo_bf16.safetensors", DIT)
    _write(root / te / "qwen_3_4b.safetensors", TE)
    _write(root / "vae" / "ae.safetensors", VAE, torch.float32)
    return root


def test_comfy_folder(tmp_path):
    files = find_model_files(_comfy(tmp_path))
    assert files.dit.name == "z_image_turbo_bf16.safetensors"
    assert files.text_encoder.name == "qwen_3_4b.safetensors" and files.vae.name == "ae.safetensors"


def test_legacy_folder_names_and_nested(tmp_path):
    root = _comfy(tmp_path, dit="unet/zimage", te="clip")
    files = find_model_files(root)
    assert files.dit.parent.name == "zimage" and files.text_encoder.parent.name == "clip"


def test_picks_by_content_not_name(tmp_path):
    root = _comfy(tmp_path)
    # A misleadingly named VAE beside the DiT, and an fp8 copy of the DiT.
    _write(root / "diffusion_models" / "a_z_image_dit.safetensors", VAE, torch.float32)
    _write(root / "diffusion_models" / "a_fp8.safetensors", DIT, torch.float8_e4m3fn)
    files = find_model_files(root)
    assert files.dit.name == "z_image_turbo_bf16.safetensors"


def test_prequantized_preferred_when_its_storage_fits(tmp_path):
    root = _comfy(tmp_path)
    int8 = file_metadata("zimage-dit", scheme_from_name("int8"))
    _write(root / "diffusion_models" / "zz_int8.safetensors", DIT, torch.bfloat16, int8)
    assert find_model_files(root, quant="int8").dit.name == "zz_int8.safetensors"
    assert find_model_files(root, quant="w8a8").dit.name == "zz_int8.safetensors"  # same int8 storage
    assert find_model_files(root, quant="none").dit.name == "z_image_turbo_bf16.safetensors"
    # An fp8 run quantizes the bf16 original rather than requantizing int8 codes.
    assert find_model_files(root, quant="fp8-e4m3").dit.name == "z_image_turbo_bf16.safetensors"
    fp8 = file_metadata("zimage-dit", scheme_from_name("fp8-e4m3"))
    _write(root / "diffusion_models" / "zz_fp8.safetensors", DIT, torch.bfloat16, fp8)
    assert find_model_files(root, quant="fp8-e4m3").dit.name == "zz_fp8.safetensors"


def test_missing_component_is_named(tmp_path):
    root = _comfy(tmp_path)
    (root / "vae" / "ae.safetensors").unlink()
    _write(root / "vae" / "sd_vae.safetensors", {"decoder.conv_in.weight": (8, 4, 3, 3)})
    with pytest.raises(MissingFileError, match=r"no FLUX.1 VAE in vae/ \(found only: sd_vae"):
        find_model_files(root)
    with pytest.raises(MissingFileError, match="does not exist"):
        find_model_files(tmp_path / "nope")


def test_explicit_paths_are_checked(tmp_path):
    root = _comfy(tmp_path)
    files = find_model_files(dit=root / "diffusion_models" / "z_image_turbo_bf16.safetensors",
                             text_encoder=root / "text_encoders" / "qwen_3_4b.safetensors",
                             vae=root / "vae" / "ae.safetensors")
    assert files.root is None
    expected = r"looks like the FLUX.1 VAE, but a diffusion model \(SD3 MMDiT or Z-Image DiT\)"
    with pytest.raises(WrongModelError, match=expected):
        find_model_files(root, dit=root / "vae" / "ae.safetensors")


def test_diffusers_snapshot(tmp_path):
    _write(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors",
           {"all_x_embedder.2-1.weight": (8, 64)})
    _write(tmp_path / "text_encoder" / "model.safetensors", TE)
    _write(tmp_path / "vae" / "diffusion_pytorch_model.safetensors", VAE)
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_text("{}")
    (tmp_path / "model_index.json").write_text("{}")
    files = find_model_files(tmp_path)
    assert files.dit == tmp_path / "transformer" and files.tokenizer == tmp_path / "tokenizer"
    assert inspect_weights(files.dit).kind == "zimage-dit"
