"""The family seam: declarations, discovery across families, and the shared sampling pieces."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from pascaline.errors import InvalidArgumentError
from pascaline.families import all_families, family_names, get_family, resolve_variant, variant_names
from pascaline.formats.detect import contents
from pascaline.offload.plan import other_nbytes, plan_for_model
from pascaline.offload.streamer import BlockStreamer
from pascaline.runtime import sampling
from pascaline.runtime.discovery import find_model_files

DIT = {"cap_embedder.1.weight": (8, 4), "layers.0.attention.qkv.weight": (24, 8)}
TE = {"model.embed_tokens.weight": (10, 4), "model.layers.0.self_attn.q_norm.weight": (2,)}
VAE = {"decoder.conv_in.weight": (8, 16, 3, 3), "encoder.conv_in.weight": (8, 3, 3, 3)}


def _write(path, shapes, prefix=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: torch.zeros(s, dtype=torch.bfloat16) for k, s in shapes.items()}, str(path))
    return path


# --- declarations ------------------------------------------------------------------------------


def test_registry_finds_the_families_by_scanning():
    assert "zimage" in family_names()
    assert get_family("zimage").label == "Z-Image"
    family, variant = resolve_variant("z-image-turbo")
    assert family is get_family("zimage") and variant.defaults.steps == 8
    assert "z-image-turbo" in variant_names()
    with pytest.raises(InvalidArgumentError, match="unknown model 'sdxl'; choose one of .*z-image-turbo"):
        resolve_variant("sdxl")
    with pytest.raises(InvalidArgumentError, match="unknown model family"):
        get_family("base")


@pytest.mark.parametrize("family", all_families(), ids=lambda f: f.name)
def test_every_declaration_is_complete(family):
    roles = [c.role for c in family.components]
    assert len(set(roles)) == len(roles)
    assert [c.stage for c in family.components].count("dit") == 1
    assert [c.stage for c in family.components].count("vae") == 1 and family.encoder_roles
    assert family.components[0].stage == "dit"  # discovery picks a bundled VAE next to it
    assert set(family.schedulers.values()) <= set(sampling.SCHEDULES)
    assert set(family.samplers) <= set(sampling.SAMPLERS)
    for variant in family.variants.values():
        d = variant.defaults
        assert d.sampler in family.samplers and d.scheduler in family.schedulers
        assert d.steps >= 1 and d.width % 16 == 0 and d.height % 16 == 0 and variant.dit_config is not None
    assert family.default_variant in family.variants
    assert family.latent.channels == 16


# --- discovery ----------------------------------------------------------------------------------


def test_contents_splits_a_bundled_checkpoint():
    shapes = {**{"model.diffusion_model." + k: s for k, s in DIT.items()},
              **{"first_stage_model." + k: s for k, s in VAE.items()}}  # fmt: skip
    assert contents(shapes) == {"zimage-dit": "model.diffusion_model.", "flux-vae": "first_stage_model."}
    assert contents(VAE) == {"flux-vae": ""}
    assert contents({"x": (1,)}) == {}


def test_a_vae_in_the_diffusion_models_own_file_wins(tmp_path):
    _write(tmp_path / "checkpoints" / "aio.safetensors",
           {**{"model.diffusion_model." + k: s for k, s in DIT.items()},
            **{"first_stage_model." + k: s for k, s in VAE.items()}})  # fmt: skip
    _write(tmp_path / "text_encoders" / "te.safetensors", TE)
    _write(tmp_path / "vae" / "other_ae.safetensors", VAE)
    files = find_model_files(tmp_path)
    assert files.dit.name == files.vae.name == "aio.safetensors"
    assert files.where("vae").prefix == "first_stage_model."
    assert files.where("dit").prefix == "model.diffusion_model."
    # a standalone DiT: the standalone VAE is used, never one bundled in another checkpoint
    _write(tmp_path / "diffusion_models" / "dit.safetensors", DIT)
    files = find_model_files(tmp_path, dit=tmp_path / "diffusion_models" / "dit.safetensors")
    assert files.vae.name == "aio.safetensors"  # same family's checkpoint beats a standalone file
    assert files.where("vae").prefix == "first_stage_model."


def test_a_role_the_family_lacks_is_refused(tmp_path):
    _write(tmp_path / "diffusion_models" / "dit.safetensors", DIT)
    with pytest.raises(InvalidArgumentError, match="Z-Image has no t5 component"):
        find_model_files(tmp_path, t5=tmp_path / "x.safetensors")


# --- sampling pieces -----------------------------------------------------------------------------

# sd3-family.md §6.2 (shift 3)
NORMAL_28 = [1, .98738, .97411, .96013, .94539, .92982, .91335, .8959, .87738, .85769, .83672, .81432, .79037,
             .76468, .73706, .70728, .67508, .64016, .60215, .56063, .51507, .46488, .40929, .34739, .27805,
             .19983, .11091, .00893, 0]  # fmt: skip


@pytest.mark.parametrize(
    "scheduler,steps,expected",
    [("normal", 28, NORMAL_28), ("normal", 4, [1, .85769, .60215, .00893, 0]),
     ("sgm_uniform", 4, [1, .90036, .75112, .50299, 0]), ("simple", 4, [1, .9, .75, .5, 0])],
)  # fmt: skip
def test_comfyui_schedules(scheduler, steps, expected):
    got = sampling.sigma_schedule(steps, 3.0, scheduler=scheduler)
    assert len(got) == steps + 1
    assert torch.allclose(got.double(), torch.tensor(expected, dtype=torch.float64), atol=6e-6, rtol=0)


@pytest.mark.parametrize("steps", [4, 28])
def test_normal_is_diffusers_flow_match_schedule(steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(steps)
    assert torch.allclose(sched.sigmas, sampling.sigma_schedule(steps, 3.0, scheduler="normal"), atol=1e-6)


def _dpmpp_2m_comfy(model, x, sigmas):
    """k-diffusion's sample_dpmpp_2m as ComfyUI ships it, written out independently."""
    def t_fn(s):
        return -math.log(s)

    def sigma_fn(t):
        return math.exp(-t)

    old = None
    s = [float(v) for v in sigmas]
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        if s[i + 1] == 0:
            x = denoised
        else:
            t, t_next = t_fn(s[i]), t_fn(s[i + 1])
            h = t_next - t
            if old is None:
                x = (sigma_fn(t_next) / sigma_fn(t)) * x - math.expm1(-h) * denoised
            else:
                r = (t - t_fn(s[i - 1])) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
                x = (sigma_fn(t_next) / sigma_fn(t)) * x - math.expm1(-h) * d
        old = denoised
    return x


def test_dpmpp_2m_matches_the_reference_formula():
    x0 = torch.linspace(-1, 1, 8, dtype=torch.float64)
    target = torch.cos(torch.arange(8, dtype=torch.float64))

    def denoiser(x, sigma):  # D(x, σ): a smooth non-trivial function of both
        return target * (1 - sigma) + 0.3 * sigma * x

    sigmas = sampling.sigma_schedule(6, 3.0, scheduler="normal").double()
    ours = sampling.dpmpp_2m(lambda x, s: (denoiser(x, float(s)) - x) / s, x0.clone(), sigmas,
                             lambda *a: None)  # fmt: skip
    ref = _dpmpp_2m_comfy(denoiser, x0.clone(), sigmas)
    assert torch.allclose(ours, ref, atol=1e-12)


def test_percent_to_sigma_is_comfyuis():
    for p, s in [(0.01, 0.99664), (0.1, 0.96429), (0.15, 0.94444), (0.2, 0.92308)]:
        assert abs(sampling.percent_to_sigma(p, 3.0) - s) < 1e-5
    assert sampling.percent_to_sigma(0, 3.0) == 1.0 and sampling.percent_to_sigma(1, 3.0) == 0.0


def _per_sample(x, t, conds):
    # x: [B, C, h, w]; each sample's output depends on its own conditioning only
    return torch.stack([x[i] * c + t[i] for i, c in enumerate(conds)])


def test_batched_cfg_equals_sequential_and_slg_applies_in_its_window():
    x = torch.randn(1, 16, 4, 4)
    cond, neg = [torch.tensor(2.0)], [torch.tensor(-1.0)]
    seq = sampling.guided_predict(_per_sample, cond, negative=neg, cfg=4.0)
    bat = sampling.guided_predict(_per_sample, cond, negative=neg, cfg=4.0, batch=True)
    for sigma in (torch.tensor(0.9), torch.tensor(0.2)):
        assert torch.equal(seq(x, sigma), bat(x, sigma))

    def skipped(x, t, conds):
        return torch.zeros_like(x)

    slg = sampling.SkipLayerGuidance(skipped, 2.0, sigma_start=0.95, sigma_end=0.5)
    guided = sampling.guided_predict(_per_sample, cond, negative=neg, cfg=4.0, slg=slg)
    inside, outside = torch.tensor(0.8), torch.tensor(0.3)
    f_pos = _per_sample(x, (1 - inside).expand(1), cond)
    assert torch.allclose(guided(x, inside), seq(x, inside) + 2.0 * f_pos)
    assert torch.equal(guided(x, outside), seq(x, outside))


def test_prediction_sets_timestep_and_sign():
    seen = []

    def model(x, t, conds):
        seen.append(t)
        return torch.ones_like(x)

    velocity = sampling.Prediction(timestep=lambda s: s * 1000, output_sign=-1.0)
    f = sampling.call_model(model, torch.zeros(2, 16, 2, 2), torch.tensor(0.25), None, None, velocity)
    assert torch.equal(seen[0], torch.full((2,), 250.0)) and torch.equal(f, -torch.ones(2, 16, 2, 2))


# --- host tensors --------------------------------------------------------------------------------


class _WithTable(nn.Module):
    offload_units = ("blocks",)
    host_tensors = ("table",)

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(64, 8))
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        x = x + self.table[:4].to(x.device, x.dtype)  # only the crop moves
        for block in self.blocks:
            x = block(x)
        return x


def test_host_tensors_stay_on_the_host_and_out_of_the_plan():
    model = _WithTable()
    table = model.table
    assert other_nbytes(model) == 0  # the table is not a resident weight
    expected = model(torch.ones(4, 8))
    plan = plan_for_model(model, 2 * 8 * 8 * 4 + 2048, 0)
    with BlockStreamer(model, plan, "cpu"):
        assert model.table is table and model.table.data_ptr() == table.data_ptr()
        out = model(torch.ones(4, 8))
    assert torch.equal(out, expected) and model.table is table


def test_models_command_lists_components_and_what_runs(tmp_path, capsys, dit_bf16):
    from safetensors.torch import load_file

    from pascaline.cli import main

    aio = load_file(str(dit_bf16)) | {"first_stage_model." + k: torch.zeros(s) for k, s in VAE.items()}
    (tmp_path / "checkpoints").mkdir()
    save_file(aio, str(tmp_path / "checkpoints" / "aio.safetensors"))
    _write(tmp_path / "text_encoders" / "te.safetensors", TE)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "notes.safetensors").write_text("not weights")
    assert main(["models", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "checkpoints/aio.safetensors" in out and "a Z-Image DiT" in out and "the FLUX.1 VAE" in out
    assert "text_encoders/te.safetensors" in out and "not recognised: notes.safetensors" in out
    assert "Z-Image: runs as --model z-image-turbo (8 steps, cfg 1.0, res_multistep/linear" in out
    assert "aio.safetensors (first_stage_model.* of a checkpoint)" in out
    assert main(["models", str(tmp_path / "nowhere")]) == 2
