"""`pascaline bench --model sd3.5-large`: MMDiT counters against hand arithmetic, the module and
sd3-family.md, the per-family kits, a CFG-step run beside diffusers, and SD3 projections."""

import json
from dataclasses import replace

import pytest
import torch

from pascaline.bench import counters_sd3, projection
from pascaline.bench.kits import get_kit, kit_of_config
from pascaline.bench.runner import BenchOptions, resolve, run_bench
from pascaline.bench.timing import extrapolate
from pascaline.cli import main
from pascaline.families import all_families, get_family
from pascaline.models.mmdit import VARIANTS, MMDiT
from pascaline.runtime.device import DeviceCaps

LARGE, MEDIUM, SD3M = VARIANTS["sd3.5-large"], VARIANTS["sd3.5-medium"], VARIANTS["sd3-medium"]
KIT = get_kit("sd3")


# --- counters ------------------------------------------------------------------------------


def test_block_params_follow_the_reference_formulas():
    # sd3-family.md §1.2: 36 D² + 30 D (+256 qk-norm) per joint block, 23 D² + 20 D for the last,
    # +7 D² + 7 D (+128) for an MMDiT-X block
    d = LARGE.hidden
    assert counters_sd3.block_params(LARGE, "joint") == 36 * d * d + 30 * d + 256
    assert counters_sd3.block_params(LARGE, "last") == 23 * d * d + 20 * d + 256
    d = MEDIUM.hidden
    assert counters_sd3.block_params(MEDIUM, "dual") == 43 * d * d + 37 * d + 384
    assert counters_sd3.block_params(SD3M, "joint") == 36 * d * d + 30 * d  # no qk-norm
    # §1.2 "all tensors": 2.085 B, 2.470 B, 8.146 B (the pos-embed table included)
    assert [round(counters_sd3.mmdit_params(c) / 1e6) for c in (SD3M, MEDIUM, LARGE)] == [2085, 2470, 8146]


@pytest.mark.parametrize("variant", ["tiny", "tiny-sd3"])
@pytest.mark.parametrize("scheme", [None, "int8", "w8a8", "fp8-e4m3-per-tensor"])
def test_counters_match_the_real_module(variant, scheme):
    from pascaline.offload.plan import module_nbytes, other_nbytes

    cfg = VARIANTS[variant]
    with torch.device("meta"):
        model = MMDiT(cfg)
    assert counters_sd3.mmdit_params(cfg) == sum(t.numel() for t in (*model.parameters(), *model.buffers()))
    if scheme is not None:
        from pascaline.quant import quantize_, scheme_from_name

        quantize_(model, scheme_from_name(scheme))
    units = counters_sd3.unit_bytes(cfg, scheme or "fp32", "fp32")
    assert units == [(f"joint_blocks.{i}", module_nbytes(b)) for i, b in enumerate(model.joint_blocks)]
    assert counters_sd3.other_bytes(cfg, "fp32") == other_nbytes(model)  # pos_embed stays on the host


def test_flops_cross_check_reference_section_2_8():
    # [ESTIMATE] linear + attention at 1024²: SD3M 8.4/8.9 T, SD3.5M 10.8/11.2 T, SD3.5L 29.6/31.1 T
    # with 154/333 text tokens; SD3.5L 15.5 T at 768²
    for cfg, short, long in ((SD3M, 8.4, 8.9), (MEDIUM, 10.8, 11.2), (LARGE, 29.6, 31.1)):
        assert counters_sd3.forward_flops(cfg, 1024, 1024, 154).total == pytest.approx(short * 1e12, rel=0.01)
        assert counters_sd3.forward_flops(cfg, 1024, 1024, 333).total == pytest.approx(long * 1e12, rel=0.01)
    assert counters_sd3.forward_flops(LARGE, 768, 768, 154).total == pytest.approx(15.5e12, rel=0.01)
    one, cfg_step = (counters_sd3.forward_flops(LARGE, 1024, 1024, 154, b) for b in (1, 2))
    assert cfg_step.total == 2 * one.total
    # one joint block by hand: N = 4096, L = 154, S = 4250, D = 2432, MLP 9728
    d, m, n, ctx = 2432, 9728, 4096, 154
    per_token = 4 * d * d + 2 * d * m
    block = 2 * (n + ctx) * per_token + 4 * (n + ctx) ** 2 * d
    two = counters_sd3.forward_flops(replace(LARGE, depth=2), 1024, 1024, 154)
    last = 2 * n * per_token + 2 * ctx * 3 * d * d + 4 * (n + ctx) ** 2 * d
    rest = 2 * n * 64 * d + 2 * ctx * 4096 * d + 2 * n * d * 64
    assert two.linear + two.attention == block + last + rest


# --- kits and options ----------------------------------------------------------------------


def test_every_family_has_a_bench_kit():
    for family in all_families():
        kit = get_kit(family.name)
        assert kit.family is family
        full = next(iter(family.variants.values())).dit_config
        assert kit_of_config(full) is kit


def test_reduced_depth_keeps_one_block_of_every_kind():
    cpu = DeviceCaps.preset("cpu")
    large = resolve(BenchOptions(model="sd3.5-large", quick=True), cpu)
    assert large.kit is KIT and large.batch == 2 and large.caption_tokens == 154
    assert KIT.depths(large.cfg) == {"joint": 1, "last": 1} and large.cfg.hidden == 2432
    assert KIT.depths(large.full_cfg) == {"joint": 37, "last": 1}
    medium = resolve(BenchOptions(model="sd3.5-medium"), cpu)  # 1 would time no dual or joint block
    assert KIT.depths(medium.cfg) == {"dual": 1, "joint": 1, "last": 1}
    assert KIT.depths(medium.full_cfg) == {"dual": 13, "joint": 10, "last": 1}
    assert KIT.depths(KIT.config(MEDIUM, 8)) == {"dual": 4, "joint": 3, "last": 1}  # 13 : 10
    with pytest.raises(ValueError, match="at least 3 blocks"):
        KIT.config(MEDIUM, 2)
    turbo = resolve(BenchOptions(model="sd3.5-large-turbo", depth="full"), cpu)
    assert turbo.cfg == LARGE and turbo.batch == 2  # cfg 1.2 still runs both branches
    assert resolve(BenchOptions(), cpu).batch == 1  # Z-Image Turbo: no CFG


def test_unknown_model_is_one_sentence_and_exit_2(capsys):
    assert main(["bench", "--device", "cpu", "--model", "sdxl"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown model 'sdxl'" in err and "sd3.5-large" in err and "\n" not in err
    assert main(["bench", "--device", "cpu", "--model", "sd3.5-medium", "--depth", "2"]) == 2
    assert "--depth takes a number of blocks >= 3" in capsys.readouterr().err


# --- the run -------------------------------------------------------------------------------


def test_the_stage_runs_encoders_give_the_joint_context_of_their_towers():
    """CLIP-L | CLIP-G | zeros on the 77 CLIP rows, T5 below, as the pipeline assembles it."""
    import torch

    from pascaline.bench.kits.sd3 import build_text_encoders, encode_random_prompt

    towers = build_text_encoders(dtype=torch.float32, device="cpu", seed=3, real_width=False)
    assert [len(t.text_model.encoder.layers) for t in (towers.clip_l, towers.clip_g)] == [2, 2]
    assert len(towers.t5.encoder.block) == 2 and towers.t5.config.d_model == 4096
    context = encode_random_prompt(towers, 154, seed=1)
    assert context.shape == (154, 4096) and torch.isfinite(context).all()
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, 256, (1, n), generator=gen) for n in (77, 77, 77)]
    with torch.inference_mode():
        clip_l = towers.clip_l(input_ids=ids[0], output_hidden_states=True).hidden_states[-2][0]
        clip_g = towers.clip_g(input_ids=ids[1], output_hidden_states=True).hidden_states[-2][0]
        t5 = towers.t5(input_ids=ids[2]).last_hidden_state[0]
    assert torch.equal(context[:77, :768], clip_l) and torch.equal(context[:77, 768:2048], clip_g)
    assert not context[:77, 2048:].any() and torch.equal(context[77:], t5)
    assert not torch.equal(clip_l, clip_g[:, :768])


def test_sd3_bench_run_beside_diffusers():
    """A CFG step (batch 2) at a test width: every placement and scheme, diffusers, stages, projections."""
    from pascaline.bench.report import format_table

    strategies = ("resident", "streamed", "resident-int8", "streamed-w8a8")
    options = BenchOptions(model="sd3.5-large", quick=True, dim=128, device="cpu", strategies=strategies)
    report = json.loads(json.dumps(run_bench(options)))  # what --json writes
    assert set(report) == {"pascaline_version", "torch", "device", "config", "results", "baseline",
                           "stages", "projection"}  # fmt: skip
    cfg = report["config"]
    assert set(cfg) >= {"model", "model_label", "family", "batch", "depth_measured", "full_depth",
                        "resolution", "caption_tokens", "iterations", "warmup", "stage_resolution", "dim",
                        "synthetic"}  # fmt: skip
    assert (cfg["model"], cfg["family"], cfg["batch"]) == ("sd3.5-large", "sd3", 2)
    assert cfg["caption_tokens"] == 154 and cfg["dim"] == 128
    assert cfg["depth_measured"] == {"joint": 1, "last": 1} and cfg["full_depth"] == {"joint": 37, "last": 1}
    rows = {r["strategy"]: r for r in report["results"]}
    assert set(rows) == set(strategies)
    for r in rows.values():
        assert set(r) >= {"compute_dtype", "quant", "peak_vram_bytes", "peak_vram_kind", "peak_rss_bytes",
                          "budget_bytes", "h2d_bytes_per_it", "h2d_gbps", "overlap"}  # fmt: skip
        s = r["s_per_it"]
        assert 0 < s["min"] <= s["median"] <= s["max"] and r["full_depth_label"] == "extrapolated"
        if r["strategy"] in ("resident", "resident-int8"):  # CPU: per-block times from the timed iterations
            expected = extrapolate(s["median"], r["per_block_s"], cfg["depth_measured"], cfg["full_depth"])
            assert r["s_per_it_full_depth"] == pytest.approx(expected)
            assert expected > s["median"] + 35 * r["per_block_s"]["joint"]
    streamed, resident = rows["streamed"], rows["resident"]
    assert streamed["h2d_bytes_per_it"] > 0 and resident["h2d_bytes_per_it"] == 0
    assert streamed["peak_vram_bytes"] <= streamed["budget_bytes"] < resident["peak_vram_bytes"]
    assert rows["resident-int8"]["peak_vram_bytes"] < resident["peak_vram_bytes"]
    base = report["baseline"]
    assert base["diffusers"]["resident"]["s_per_it"]["median"] > 0 and base["ratio"]["resident"] > 0
    assert base["max_abs_diff"] < 1e-4  # the same weights through SD3Transformer2DModel
    assert "SD3Transformer2DModel" in base["note"]
    assert [(s["name"], s["freed"]) for s in report["stages"]] == [("encoder", True), ("dit", True),
                                                                    ("vae", True)]  # fmt: skip
    for stage in report["stages"]:
        assert stage["seconds"] > 0 and stage["peak_rss_bytes"] > 0 and "peak_vram_bytes" in stage
    projected = report["projection"]
    assert {p["gpu"] for p in projected} == {"GTX 1070", "GTX 1660 Ti", "RTX 2060", "T4"}
    assert all(p["label"] == "projected" and p["batch"] == 2 for p in projected)
    assert all(p["model"] == "sd3.5-large" for p in projected)
    table = format_table(report)
    assert "SD3.5 Large MMDiT: 2 blocks: 1 joint + 1 last (full: 37 joint + 1 last)" in table
    assert "batch 2 (one CFG step)" in table and "PROJECTED" in table


# --- projections ---------------------------------------------------------------------------


def _projected(cfg, gpu: str, strategy: str, quant: str | None):
    spec = next(s for s in projection.GPUS if s.name == gpu)
    return projection.project(cfg, spec, strategy, quant)


def test_sd3_projections():
    for cfg in (LARGE, MEDIUM, SD3M):
        rows = projection.project_all(cfg, [("resident", None), ("streamed", "w8a8")])
        assert len(rows) == 8 and all(p.label == "projected" for p in rows)
        assert all((p.batch, p.cond_tokens, p.resolution) == (2, 154, 1024) for p in rows)
    fp32 = _projected(LARGE, "GTX 1070", "streamed", None)
    # a CFG step in fp32 at the 6.46 TFLOP/s peak: 2 x 29.6 T / 6.46 T/s
    assert fp32.bound == "compute" and fp32.compute_s == pytest.approx(2 * 29.6e12 / 6.46e12, rel=0.01)
    assert fp32.streamed_bytes > 20e9  # 32.6 GB of fp32 weights, most of them streamed each step
    w8a8 = _projected(LARGE, "GTX 1070", "streamed", "w8a8")
    assert w8a8.fits and w8a8.s_per_it < fp32.s_per_it / 2
    for gpu in ("GTX 1070", "RTX 2060"):
        assert not _projected(LARGE, gpu, "resident", "int8").fits  # 8.15 GB of 8-bit weights
        assert _projected(MEDIUM, gpu, "resident", "int8").fits  # 2.47 GB
    rtx = _projected(LARGE, "RTX 2060", "streamed", "int8")
    assert rtx.compute_dtype == "fp16" and rtx.fits and rtx.s_per_it < fp32.s_per_it
    assert get_family("sd3").typical_cond_tokens(LARGE) == 154
