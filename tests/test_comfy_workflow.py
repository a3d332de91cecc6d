"""PNGs that ComfyUI opens as workflows: the API-format ``prompt`` chunk, checked node by node
against ComfyUI's own node signatures, and ComfyUI's 8-bit rule."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from pascaline.errors import ConfigError, InvalidArgumentError
from pascaline.formats.flux_vae import to_pil, to_uint8
from pascaline.models.zimage_dit import VARIANTS, ZImageDiT
from pascaline.runtime.comfy_workflow import comfy_prompt
from pascaline.runtime.images import generation_metadata, read_png_text, save_png
from pascaline.runtime.sampling import img2img_schedule, sigma_schedule

# ComfyUI's node signatures (Comfy-Org/ComfyUI nodes.py, comfy_extras/nodes_sd3.py and
# nodes_model_advanced.py, INPUT_TYPES / define_schema and RETURN_TYPES), the structural
# reference every graph is checked against. FILE: a name from a models folder.
FILE, STRING = ("FILE",), ("STRING",)
SAMPLERS = (
    "euler",
    "euler_ancestral",
    "heun",
    "dpm_2",
    "lms",
    "dpmpp_2s_ancestral",
    "dpmpp_sde",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_3m_sde",
    "ddpm",
    "lcm",
    "ipndm",
    "deis",
    "res_multistep",
    "gradient_estimation",
    "er_sde",
)
SCHEDULERS = (
    "simple",
    "sgm_uniform",
    "karras",
    "exponential",
    "ddim_uniform",
    "beta",
    "normal",
    "linear_quadratic",
    "kl_optimal",
)
CLIP_TYPES = (
    "stable_diffusion",
    "stable_cascade",
    "sd3",
    "stable_audio",
    "mochi",
    "ltxv",
    "pixart",
    "cosmos",
    "lumina2",
    "wan",
    "hidream",
    "chroma",
    "ace",
    "omnigen2",
    "qwen_image",
    "hunyuan_image",
    "flux2",
)
DEVICE = ("COMBO", ("default", "cpu"))
SEED = ("INT", 0, 2**64 - 1)


def INT(lo, hi):  # noqa: N802 - the spelling of ComfyUI's type
    return ("INT", lo, hi)


def FLOAT(lo, hi):  # noqa: N802
    return ("FLOAT", lo, hi)


def COMBO(*options):  # noqa: N802
    return ("COMBO", options)


def node(outputs, required, optional=None):
    return {"outputs": outputs, "required": required, "optional": optional or {}}


# the inputs KSampler and KSamplerAdvanced share
SAMPLING = {
    "model": "MODEL",
    "steps": INT(1, 10000),
    "cfg": FLOAT(0.0, 100.0),
    "sampler_name": COMBO(*SAMPLERS),
    "scheduler": COMBO(*SCHEDULERS),
    "positive": "CONDITIONING",
    "negative": "CONDITIONING",
    "latent_image": "LATENT",
}
SIGNATURES = {
    "UNETLoader": node(
        ["MODEL"],
        {"unet_name": FILE, "weight_dtype": COMBO("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")},
    ),
    "CLIPLoader": node(["CLIP"], {"clip_name": FILE, "type": COMBO(*CLIP_TYPES)}, {"device": DEVICE}),
    "VAELoader": node(["VAE"], {"vae_name": FILE}),
    "CheckpointLoaderSimple": node(["MODEL", "CLIP", "VAE"], {"ckpt_name": FILE}),
    "DualCLIPLoader": node(
        ["CLIP"],
        {
            "clip_name1": FILE,
            "clip_name2": FILE,
            "type": COMBO("sdxl", "sd3", "flux", "hunyuan_video", "hidream"),
        },
        {"device": DEVICE},
    ),
    "TripleCLIPLoader": node(
        ["CLIP"], {"clip_name1": FILE, "clip_name2": FILE, "clip_name3": FILE}, {"device": DEVICE}
    ),
    "CLIPTextEncode": node(["CONDITIONING"], {"text": STRING, "clip": "CLIP"}),
    "ConditioningZeroOut": node(["CONDITIONING"], {"conditioning": "CONDITIONING"}),
    "EmptySD3LatentImage": node(
        ["LATENT"], {"width": INT(16, 16384), "height": INT(16, 16384), "batch_size": INT(1, 4096)}
    ),
    "ModelSamplingAuraFlow": node(
        ["MODEL"],
        {"model": "MODEL", "shift": FLOAT(0.0, 100.0)},
        {"sampling": COMBO("flow", "img_to_img_velocity")},
    ),
    "ModelSamplingSD3": node(["MODEL"], {"model": "MODEL", "shift": FLOAT(0.0, 100.0)}),
    "SkipLayerGuidanceSD3": node(
        ["MODEL"],
        {
            "model": "MODEL",
            "layers": STRING,
            "scale": FLOAT(0.0, 10.0),
            "start_percent": FLOAT(0.0, 1.0),
            "end_percent": FLOAT(0.0, 1.0),
        },
    ),
    "KSampler": node(["LATENT"], {**SAMPLING, "seed": SEED, "denoise": FLOAT(0.0, 1.0)}),
    "KSamplerAdvanced": node(
        ["LATENT"],
        {
            **SAMPLING,
            "add_noise": COMBO("enable", "disable"),
            "noise_seed": SEED,
            "start_at_step": INT(0, 10000),
            "end_at_step": INT(0, 10000),
            "return_with_leftover_noise": COMBO("disable", "enable"),
        },
    ),
    "VAEDecode": node(["IMAGE"], {"samples": "LATENT", "vae": "VAE"}),
    "VAEEncode": node(["LATENT"], {"pixels": "IMAGE", "vae": "VAE"}),
    "LoadImage": node(["IMAGE", "MASK"], {"image": FILE}),
    "ImageScale": node(
        ["IMAGE"],
        {
            "image": "IMAGE",
            "upscale_method": COMBO("nearest-exact", "bilinear", "area", "bicubic", "lanczos"),
            "width": INT(0, 16384),
            "height": INT(0, 16384),
            "crop": COMBO("disabled", "center"),
        },
    ),
    "SaveImage": node(["IMAGE"], {"images": "IMAGE", "filename_prefix": STRING}),
}


def check_value(graph, spec, value, where):
    if isinstance(spec, str):  # a link to an output of that type
        assert isinstance(value, list) and len(value) == 2, where
        source, index = value
        assert isinstance(source, str) and source in graph and isinstance(index, int), where
        assert SIGNATURES[graph[source]["class_type"]]["outputs"][index] == spec, where
    elif spec[0] in ("FILE", "STRING"):
        assert isinstance(value, str) and (value or spec[0] == "STRING"), where
    elif spec[0] == "COMBO":
        assert value in spec[1], where
    elif spec[0] == "INT":
        assert isinstance(value, int) and not isinstance(value, bool) and spec[1] <= value <= spec[2], where
    else:
        assert isinstance(value, float) and spec[1] <= value <= spec[2], where


def check_graph(graph):
    """Valid JSON; every node known, with exactly its inputs and values of their types; every link
    to an existing output of the right type; one SaveImage, which every node feeds."""
    assert json.loads(json.dumps(graph)) == graph
    for node_id, item in graph.items():
        sig = SIGNATURES[item["class_type"]]
        names = set(item["inputs"])
        assert set(sig["required"]) <= names <= set(sig["required"]) | set(sig["optional"]), item
        for name, value in item["inputs"].items():
            spec = sig["required"].get(name) or sig["optional"][name]
            check_value(graph, spec, value, f"{node_id}.{name}")
    saves = [i for i, n in graph.items() if n["class_type"] == "SaveImage"]
    assert len(saves) == 1
    reached, todo = set(), list(saves)
    while todo:
        current = todo.pop()
        reached.add(current)
        todo += [
            v[0] for v in graph[current]["inputs"].values() if isinstance(v, list) and v[0] not in reached
        ]
    assert reached == set(graph)
    return graph


def nodes_of(graph, class_type):
    return [n for n in graph.values() if n["class_type"] == class_type]


def one(graph, class_type):
    (item,) = nodes_of(graph, class_type)
    return item


def source(graph, link):
    return graph[link[0]]


def meta_for(models=None, **over):
    meta = {
        "family": "zimage",
        "prompt": "a lighthouse at dusk",
        "negative": "",
        "seed": 42,
        "steps": 8,
        "cfg": 1.0,
        "sampler": "res_multistep",
        "scheduler": "linear",
        "shift": 3.0,
        "width": 1024,
        "height": 768,
        "blind_start": 0,
        "denoise": 1.0,
        "quant": "none",
        "models": models
        or {
            "dit": {"file": "z_image_turbo_bf16.safetensors"},
            "text_encoder": {"file": "qwen_3_4b.safetensors"},
            "vae": {"file": "ae.safetensors"},
        },
    }
    return {**meta, **over}


def test_plain_zimage_is_comfyuis_turbo_template():
    graph = check_graph(comfy_prompt(meta_for()))
    assert Counter(n["class_type"] for n in graph.values()) == Counter(
        [
            "UNETLoader",
            "CLIPLoader",
            "VAELoader",
            "ModelSamplingAuraFlow",
            "CLIPTextEncode",
            "ConditioningZeroOut",
            "EmptySD3LatentImage",
            "KSampler",
            "VAEDecode",
            "SaveImage",
        ]
    )
    assert one(graph, "UNETLoader")["inputs"] == {
        "unet_name": "z_image_turbo_bf16.safetensors",
        "weight_dtype": "default",
    }
    assert one(graph, "CLIPLoader")["inputs"]["type"] == "lumina2"
    k = one(graph, "KSampler")["inputs"]
    assert {x: k[x] for x in ("seed", "steps", "cfg", "sampler_name", "scheduler", "denoise")} == {
        "seed": 42,
        "steps": 8,
        "cfg": 1.0,
        "sampler_name": "res_multistep",
        "scheduler": "simple",
        "denoise": 1.0,
    }
    assert source(graph, k["positive"])["inputs"]["text"] == "a lighthouse at dusk"
    zero = source(graph, k["negative"])
    assert zero["class_type"] == "ConditioningZeroOut" and zero["inputs"]["conditioning"] == k["positive"]
    assert source(graph, k["model"]) == {
        "class_type": "ModelSamplingAuraFlow",
        "inputs": {
            "model": [next(i for i, n in graph.items() if n["class_type"] == "UNETLoader"), 0],
            "shift": 3.0,
        },
    }
    assert source(graph, k["latent_image"])["inputs"] == {"width": 1024, "height": 768, "batch_size": 1}


def test_the_8_step_simple_schedule_is_ours():
    """ComfyUI's `simple` is pascaline's `linear` for Z-Image: the same sigmas at 8 steps."""
    assert torch.equal(sigma_schedule(8, 3.0, scheduler="linear"), sigma_schedule(8, 3.0, scheduler="simple"))


def test_cfg_with_a_negative_encodes_it_and_without_zeroes_it():
    graph = check_graph(comfy_prompt(meta_for(cfg=2.5, negative="blurry, text")))
    k = one(graph, "KSampler")["inputs"]
    assert k["cfg"] == 2.5 and source(graph, k["negative"]) == {
        "class_type": "CLIPTextEncode",
        "inputs": {"text": "blurry, text", "clip": source(graph, k["positive"])["inputs"]["clip"]},
    }
    assert not nodes_of(graph, "ConditioningZeroOut")
    zeroed = check_graph(comfy_prompt(meta_for(cfg=2.5)))  # guidance against the zeroed prompt
    assert (
        source(zeroed, one(zeroed, "KSampler")["inputs"]["negative"])["class_type"] == "ConditioningZeroOut"
    )
    unused = check_graph(comfy_prompt(meta_for(negative="blurry")))  # cfg 1: the pipeline never encodes it
    assert len(nodes_of(unused, "CLIPTextEncode")) == 1


@pytest.mark.parametrize("denoise,init", [(1.0, False), (0.6, True)])
def test_blind_start_is_two_chained_advanced_samplers(denoise, init):
    over = {"init_image": {"file": "photo.png"}} if init else {}
    graph = check_graph(comfy_prompt(meta_for(blind_start=2, denoise=denoise, cfg=1.0, **over)))
    assert not nodes_of(graph, "KSampler")
    first, second = (n["inputs"] for n in nodes_of(graph, "KSamplerAdvanced"))
    assert source(graph, second["latent_image"])["inputs"] is first
    assert source(graph, first["positive"])["class_type"] == "ConditioningZeroOut"
    assert source(graph, second["positive"])["class_type"] == "CLIPTextEncode"
    assert (first["add_noise"], first["return_with_leftover_noise"]) == ("enable", "enable")
    assert (second["add_noise"], second["return_with_leftover_noise"]) == ("disable", "disable")
    assert first["noise_seed"] == second["noise_seed"] == 42 and first["steps"] == second["steps"]
    # ComfyUI's windows sigmas[start:end + 1] of a `steps`-step schedule are our two segments
    total = first["steps"]
    ours = img2img_schedule(8, denoise, 3.0)
    comfy = sigma_schedule(total, 3.0)
    assert torch.equal(comfy[first["start_at_step"] : first["end_at_step"] + 1], ours[: 2 + 1])
    assert torch.equal(comfy[second["start_at_step"] :], ours[2:])
    assert second["end_at_step"] == total


def test_img2img_loads_scales_and_encodes_the_init_image():
    graph = check_graph(comfy_prompt(meta_for(denoise=0.6, init_image={"file": "photo.png"}, width=832)))
    k = one(graph, "KSampler")["inputs"]
    encode = source(graph, k["latent_image"])
    assert encode["class_type"] == "VAEEncode" and k["denoise"] == 0.6
    scale = source(graph, encode["inputs"]["pixels"])
    assert scale["inputs"] | {"image": None} == {
        "image": None,
        "upscale_method": "lanczos",
        "width": 832,
        "height": 768,
        "crop": "center",
    }
    assert source(graph, scale["inputs"]["image"]) == {
        "class_type": "LoadImage",
        "inputs": {"image": "photo.png"},
    }
    assert encode["inputs"]["vae"] == one(graph, "VAEDecode")["inputs"]["vae"]
    assert not nodes_of(graph, "EmptySD3LatentImage")


def test_fp8_runs_name_comfyuis_fp8_weight_dtype():
    for quant, dtype in (
        ("fp8-e4m3", "fp8_e4m3fn"),
        ("fp8-e5m2", "fp8_e5m2"),
        ("int8", "default"),
        ("w8a8", "default"),
    ):
        graph = check_graph(comfy_prompt(meta_for(quant=quant)))
        assert one(graph, "UNETLoader")["inputs"]["weight_dtype"] == dtype


SD3_FILES = {
    "dit": {"file": "sd3.5_medium.safetensors"},
    "clip_l": {"file": "clip_l.safetensors"},
    "clip_g": {"file": "clip_g.safetensors"},
    "t5": {"file": "t5xxl_fp16.safetensors"},
    "vae": {"file": "sd3_vae.safetensors"},
}


def sd3_meta(models=None, **over):
    settings = dict(
        family="sd3",
        variant="sd3.5-medium",
        cfg=4.5,
        steps=40,
        sampler="dpmpp_2m",
        scheduler="sgm_uniform",
        negative="",
    )
    return meta_for(models or SD3_FILES, **{**settings, **over})


def test_sd3_with_t5_and_a_diffusion_model_file():
    graph = check_graph(comfy_prompt(sd3_meta()))
    assert one(graph, "TripleCLIPLoader")["inputs"] == {
        "clip_name1": "clip_l.safetensors",
        "clip_name2": "clip_g.safetensors",
        "clip_name3": "t5xxl_fp16.safetensors",
    }
    assert one(graph, "UNETLoader")["inputs"]["unet_name"] == "sd3.5_medium.safetensors"
    k = one(graph, "KSampler")["inputs"]
    assert (k["cfg"], k["steps"], k["sampler_name"], k["scheduler"]) == (4.5, 40, "dpmpp_2m", "sgm_uniform")
    assert source(graph, k["model"])["class_type"] == "ModelSamplingSD3"
    assert (
        source(graph, k["negative"])["inputs"]["text"] == ""
    )  # an empty prompt, as ComfyUI's SD3.5 examples
    assert not nodes_of(graph, "SkipLayerGuidanceSD3") and not nodes_of(graph, "CLIPLoader")


def test_sd3_without_t5_from_a_checkpoint_with_its_own_vae():
    models = {k: v for k, v in SD3_FILES.items() if k not in ("t5", "vae")}
    graph = check_graph(
        comfy_prompt(sd3_meta(models, dit_kind="checkpoint", negative_mode="zero", scheduler="linear"))
    )
    ckpt = next(i for i, n in graph.items() if n["class_type"] == "CheckpointLoaderSimple")
    assert one(graph, "DualCLIPLoader")["inputs"]["type"] == "sd3" and not nodes_of(graph, "VAELoader")
    assert one(graph, "VAEDecode")["inputs"]["vae"] == [ckpt, 2]
    assert (
        source(graph, one(graph, "ModelSamplingSD3")["inputs"]["model"])["class_type"]
        == "CheckpointLoaderSimple"
    )
    k = one(graph, "KSampler")["inputs"]
    assert k["scheduler"] == "normal" and source(graph, k["negative"])["class_type"] == "ConditioningZeroOut"
    aio = check_graph(
        comfy_prompt(sd3_meta({"dit": {"file": "sd3.5_large_fp8_scaled.safetensors"}}, dit_kind="checkpoint"))
    )
    # the all-in-one file's own CLIP and VAE
    assert {tuple(n["inputs"]["clip"]) for n in nodes_of(aio, "CLIPTextEncode")} == {("1", 1)}
    assert one(aio, "VAEDecode")["inputs"]["vae"] == ["1", 2]


def test_sd3_with_skip_layer_guidance():
    graph = check_graph(
        comfy_prompt(sd3_meta(slg_layers=[7, 8, 9], slg_scale=2.5, slg_start=0.01, slg_end=0.2))
    )
    slg = one(graph, "SkipLayerGuidanceSD3")["inputs"]
    assert {k: v for k, v in slg.items() if k != "model"} == {
        "layers": "7, 8, 9",
        "scale": 2.5,
        "start_percent": 0.01,
        "end_percent": 0.2,
    }
    assert source(graph, slg["model"])["class_type"] == "ModelSamplingSD3"
    assert source(graph, one(graph, "KSampler")["inputs"]["model"])["class_type"] == "SkipLayerGuidanceSD3"


def test_save_png_writes_the_prompt_chunk_comfyui_reads(tmp_path):
    files = {
        role: tmp_path / name
        for role, name in (
            ("dit", "z.safetensors"),
            ("text_encoder", "q.safetensors"),
            ("vae", "ae.safetensors"),
        )
    }
    for path in files.values():
        path.write_bytes(b"x" * 64)
    meta = generation_metadata(
        prompt="一只猫, 水墨画",
        family="zimage",
        seed=7,
        width=64,
        height=48,
        models=files,
        cfg=2.0,
        negative="blurry",
        blind_start=1,
    )
    out = save_png(Image.new("RGB", (64, 48)), tmp_path / "cat.png", meta)
    chunks = read_png_text(out)
    assert set(chunks) == {"parameters", "pascaline", "prompt"}
    graph = check_graph(json.loads(chunks["prompt"]))
    assert graph == comfy_prompt(meta) and b"tEXtprompt\x00" in out.read_bytes()  # ASCII tEXt, as ComfyUI's
    assert one(graph, "UNETLoader")["inputs"]["unet_name"] == "z.safetensors"
    assert {n["inputs"]["text"] for n in nodes_of(graph, "CLIPTextEncode")} == {"一只猫, 水墨画", "blurry"}


def test_8_bit_rule_is_comfyuis_and_round_is_kept():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 16, 24, generator=g) * 2.4 - 1.2  # beyond [-1, 1] on both sides
    images[0, 0, 0, :4] = torch.tensor([-1.0, 0.0, 1.0, 127 / 255 * 2 - 1])
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.clamp((images.to(dtype).float() + 1.0) / 2.0, 0.0, 1.0).numpy()  # ComfyUI's VAE output
        expected = np.clip(255.0 * x, 0, 255).astype(np.uint8)  # its SaveImage
        assert np.array_equal(to_uint8(images.to(dtype)).numpy(), expected)
        assert np.array_equal(np.asarray(to_pil(images.to(dtype))[1]), expected[1].transpose(1, 2, 0))
    rounded = to_uint8(images, "round").numpy().astype(int)
    assert np.array_equal(rounded, ((images.clamp(-1, 1) + 1) * 127.5).round().numpy().astype(int))
    diff = rounded - to_uint8(images).numpy().astype(int)
    assert set(np.unique(diff)) == {0, 1} and 0.4 < (diff == 1).mean() < 0.6  # about half a level up
    with pytest.raises(InvalidArgumentError, match="rounding 'floor' is unknown"):
        to_uint8(images, "floor")


def test_comfyui_qk_norm_eps_is_an_option_of_the_dit_config():
    """None is ComfyUI's: F.rms_norm with no eps (fp32's epsilon even for bf16 input); the
    default stays the official 1e-5."""
    cfg = VARIANTS["tiny"]
    assert cfg.qk_norm_eps == 1e-5
    with pytest.raises(ConfigError, match="qk_norm_eps"):
        replace(cfg, qk_norm_eps=0.0)
    default = ZImageDiT(cfg).layers[0].attention
    comfy = ZImageDiT(replace(cfg, qk_norm_eps=None)).layers[0].attention
    comfy.load_state_dict(default.state_dict())
    qk = (0.003 * torch.randn(1, 5, 2, cfg.n_heads, cfg.head_dim)).to(torch.bfloat16)  # mean square 1e-5
    reference = torch.nn.RMSNorm(cfg.head_dim, eps=None).to(torch.bfloat16)  # ComfyUI's: no eps given
    reference.weight.data.copy_(default.q_norm.weight)
    with torch.no_grad():
        theirs = reference(qk[:, :, 0]).float()
        ours, official = (a._qk_norm(qk)[:, :, 0].float() for a in (comfy, default))
    assert (ours - theirs).abs().max() <= 2**-7 * theirs.abs().max()  # bf16 rounding apart
    assert (official - theirs).abs().max() > 0.1 * theirs.abs().max()  # eps 1e-5 against 1e-5
