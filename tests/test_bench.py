"""`pascaline bench`: counters against hand arithmetic and real modules, projections, the JSON report."""

import json
import subprocess
import sys

import pytest
import torch

from pascaline.bench import counters, projection
from pascaline.bench.runner import BenchOptions, parse_strategy, resolve
from pascaline.bench.timing import Stats, extrapolate
from pascaline.errors import InvalidArgumentError
from pascaline.models.zimage_dit import VARIANTS, ZImageDiT
from pascaline.runtime.device import DeviceCaps

REAL = VARIANTS["z-image-turbo"]


# --- counters ------------------------------------------------------------------------------


def test_block_params_match_the_published_counts():
    # zimage-turbo.md §7: 4 * 3840² + 2 * 128 = 58,982,656 (attention); 3 * 3840 * 10240 =
    # 117,964,800 (FFN); 4 * 3840 = 15,360 (norms); 256 * 15360 + 15360 = 3,947,520 (adaLN)
    assert counters.block_params(REAL) == 58_982_656 + 117_964_800 + 15_360 + 3_947_520 == 180_910_336
    assert counters.block_params(REAL, modulated=False) == 176_962_816
    assert counters.dit_params(REAL) == 6_154_908_736


def test_block_flops_by_hand_at_1024():
    # 1024²: 64 x 64 patches = 4096 image tokens; 64 caption tokens (a multiple of 32): S = 4160
    tokens = counters.token_counts(REAL, 1024, 1024, 64)
    assert (tokens.image, tokens.image_padded, tokens.caption_padded, tokens.total) == (4096, 4096, 64, 4160)
    flops = counters.block_flops(REAL, tokens.total)
    # linears: 2 * 4160 * (4 * 3840² + 3 * 3840 * 10240) = 2 * 4160 * 176,947,200
    assert flops.linear == 1_472_200_704_000
    # attention: 4 * 4160² * 3840
    assert flops.attention == 265_814_016_000
    # adaLN: 2 * 256 * 15360 per sample
    assert flops.per_sample == 7_864_320


def test_forward_flops_cross_check_legacy_gpus_section_10():
    # §10 refined: ≈57.7 TFLOP at S ≈ 4300; coarse 2 * 6.15e9 * 4300 + 4 * 30 * 4300² * 3840 ≈ 61.4
    tokens = counters.token_counts(REAL, 1024, 1024, 200)  # caption pads to 224: S = 4320
    total = counters.forward_flops(REAL, tokens).total
    assert total == pytest.approx(57.7e12, rel=0.02)
    assert total < 61.4e12
    caption_32 = counters.token_counts(REAL, 1024, 1024, 20)  # pads to 32, like zimage-turbo.md §1.4
    assert counters.forward_flops(REAL, caption_32).total < total


def test_weight_bytes_by_hand():
    assert counters.block_weight_bytes(REAL, "bf16") == 2 * 180_910_336
    assert counters.block_weight_bytes(REAL, "fp32") == 4 * 180_910_336
    # int8: 1 byte per linear weight + an fp32 scale per output row (3*3840 qkv, 3840 out, 2*10240
    # w1/w3, 3840 w2 = 39,680 rows) + norms and adaLN kept in bf16 (3,963,136 params)
    assert counters.block_weight_bytes(REAL, "int8", "bf16") == 176_947_200 + 4 * 39_680 + 2 * 3_963_136
    per_tensor = counters.block_weight_bytes(REAL, "fp8-e4m3-per-tensor", "bf16")
    assert per_tensor == 176_947_200 + 4 * 5 + 2 * 3_963_136
    assert counters.dit_weight_bytes(REAL, "bf16") == 2 * 6_154_908_736


@pytest.mark.parametrize("scheme", [None, "int8", "w8a8", "fp8-e4m3"])
def test_counters_match_the_real_module(scheme):
    """Counted params and bytes equal those of pascaline's own DiT (and its quantize_'d twin)."""
    from pascaline.offload.plan import module_tensors

    cfg = VARIANTS["tiny"]
    with torch.device("meta"):
        model = ZImageDiT(cfg)
    if scheme is not None:
        from pascaline.quant import quantize_, scheme_from_name

        quantize_(model, scheme_from_name(scheme))

    def nbytes(module):
        return sum(t.numel() * t.element_size() for *_, t in module_tensors(module))

    assert counters.dit_params(cfg) == sum(p.numel() for p in ZImageDiT(cfg).parameters())
    storage = scheme or "fp32"
    assert nbytes(model.layers[0]) == counters.block_weight_bytes(cfg, storage, "fp32", True)
    assert nbytes(model.context_refiner[0]) == counters.block_weight_bytes(cfg, storage, "fp32", False)
    assert nbytes(model) == counters.dit_weight_bytes(cfg, storage, "fp32")


# --- projections ---------------------------------------------------------------------------


def _projected(gpu: str, strategy: str, quant: str | None):
    spec = next(s for s in projection.GPUS if s.name == gpu)
    return projection.project(REAL, spec, strategy, quant)


def test_projection_int8_compute_beats_fp32_on_a_gtx_1070():
    fp32 = _projected("GTX 1070", "streamed", None)
    w8a8 = _projected("GTX 1070", "streamed", "w8a8")
    assert fp32.compute_dtype == "fp32" and fp32.bound == "compute" and w8a8.bound == "compute"
    assert w8a8.s_per_it < fp32.s_per_it / 2
    # weight-only int8 computes in fp32: same compute floor, less to stream
    int8 = _projected("GTX 1070", "streamed", "int8")
    assert int8.compute_s == pytest.approx(fp32.compute_s) and int8.pcie_s < fp32.pcie_s
    # legacy-gpus.md §10 at peak: 9.5 s (fp32) and ≈3.4 s (DP4A linears, fp32 attention) at S ≈ 4300
    assert 7.0 < fp32.s_per_it < 10.0 and 2.5 < w8a8.s_per_it < 3.6


def test_projection_fits_and_bounds():
    # a 12.3 GB bf16/fp16 DiT is never resident on 6-8 GB cards, and is on a 16 GB T4 in int8
    assert not _projected("RTX 2060", "resident", None).fits
    assert _projected("RTX 2060", "resident", None).s_per_it is None
    assert _projected("T4", "resident", "int8").fits
    streamed = _projected("RTX 2060", "streamed", None)
    assert streamed.fits and streamed.streamed_bytes > 0
    assert streamed.pcie_s == pytest.approx(streamed.streamed_bytes / 12e9)
    assert streamed.s_per_it == max(streamed.compute_s, streamed.memory_s, streamed.pcie_s)
    assert all(p.label == "projected" for p in projection.project_all(REAL, [("streamed", "w8a8")]))


# --- timing and options --------------------------------------------------------------------


def test_stats_and_extrapolation():
    stats = Stats.of([3.0, 1.0, 2.0])
    assert (stats.min, stats.median, stats.max) == (1.0, 2.0, 3.0)
    per_block = {"layers": 0.5, "noise_refiner": 0.4, "context_refiner": 0.1}
    measured = {"layers": 2, "noise_refiner": 1, "context_refiner": 1}
    full = {"layers": 30, "noise_refiner": 2, "context_refiner": 2}
    assert extrapolate(2.0, per_block, measured, full) == pytest.approx(2.0 + 28 * 0.5 + 0.4 + 0.1)
    with pytest.raises(ValueError):
        extrapolate(2.0, {"layers": 0.5}, measured, full)


def test_strategy_names_and_cpu_defaults():
    assert parse_strategy("streamed-fp8-e4m3") == ("streamed", "fp8-e4m3")
    assert parse_strategy("resident") == ("resident", None)
    with pytest.raises(InvalidArgumentError):
        parse_strategy("teleported")
    cpu = DeviceCaps.preset("cpu")
    quick, default = resolve(BenchOptions(quick=True), cpu), resolve(BenchOptions(), cpu)
    assert (quick.resolution, quick.cfg.n_layers, quick.cfg.dim) == (128, 1, 3840)
    assert (default.resolution, default.cfg.n_layers) == (512, 1)
    assert default.strategies == ("resident", "streamed")
    full = resolve(BenchOptions(depth="full"), cpu).cfg
    assert (full.n_layers, full.n_refiner_layers) == (30, 2)


# --- the command ---------------------------------------------------------------------------


def _bench(tmp_path, *args):
    cmd = [sys.executable, "-m", "pascaline", "bench", "--device", "cpu", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)


def test_bench_quick_writes_the_json_report(tmp_path):
    """--quick at a test width (--dim 256, hidden): every schema field, values that make sense."""
    out = _bench(tmp_path, "--quick", "--dim", "256", "--json", "report.json")
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert "resident" in out.stdout and "PROJECTED" in out.stdout
    assert report["pascaline_version"] and report["torch"] == torch.__version__
    assert set(report["device"]) >= {"name", "capability", "total_vram_bytes"}
    cfg = report["config"]
    assert cfg["depth_measured"] == {"layers": 1, "noise_refiner": 1, "context_refiner": 1}
    assert (cfg["resolution"], cfg["caption_tokens"], cfg["iterations"]) == (128, 64, 2)
    rows = {r["strategy"]: r for r in report["results"]}
    assert set(rows) == {"resident", "streamed"}
    for r in rows.values():
        s = r["s_per_it"]
        assert 0 < s["min"] <= s["median"] <= s["max"]
        assert r["s_per_it_full_depth"] > s["median"] and r["full_depth_label"] == "extrapolated"
        assert r["peak_rss_bytes"] > 0 and r["peak_vram_bytes"] > 0
        assert {"compute_dtype", "quant", "h2d_bytes_per_it", "overlap"} <= set(r)
    streamed, resident = rows["streamed"], rows["resident"]
    assert streamed["peak_vram_bytes"] <= streamed["budget_bytes"]
    assert streamed["peak_vram_bytes"] < resident["peak_vram_bytes"]
    assert streamed["h2d_bytes_per_it"] > 0 and resident["h2d_bytes_per_it"] == 0
    base = report["baseline"]
    assert base["diffusers"]["resident"]["s_per_it"]["median"] > 0
    assert base["ratio"]["resident"] > 0 and base["max_abs_diff"] < 1e-3  # the same weights
    assert [s["name"] for s in report["stages"]] == ["encoder", "dit", "vae"]
    for stage in report["stages"]:
        assert stage["seconds"] > 0 and stage["freed"] is True and stage["peak_rss_bytes"] > 0
        assert set(stage) >= {"peak_vram_bytes"}
    gpus = {p["gpu"] for p in report["projection"]}
    assert gpus == {"GTX 1070", "GTX 1660 Ti", "RTX 2060", "T4"}
    assert all(p["bound"] in ("compute", "pcie", "memory", None) for p in report["projection"])


def test_bench_user_mistakes_exit_2(tmp_path):
    out = _bench(tmp_path, "--strategies", "teleported")
    assert out.returncode == 2 and "unknown strategy" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_bench_models_runs_the_real_pipeline(tmp_path):
    """--models DIR: the real loaders and pipeline on a tiny random Z-Image saved as ComfyUI has it."""
    from tests.factories.pipeline import build_models

    models = build_models(tmp_path / "models")
    out = _bench(
        tmp_path,
        "--models",
        str(models.comfy),
        "--resolution",
        "64",
        "--iterations",
        "3",
        "--warmup",
        "1",
        "--json",
        "real.json",
    )
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "real.json").read_text())
    assert report["config"]["synthetic"] is False
    assert report["config"]["depth_measured"] == {"layers": 2, "noise_refiner": 2, "context_refiner": 2}
    (row,) = report["results"]
    s = row["s_per_it"]
    assert row["strategy"] == "resident" and 0 < s["min"] <= s["median"] <= s["max"]
    assert row["full_depth_label"] == "measured" and row["peak_rss_bytes"] > 0
    names = [st["name"] for st in report["stages"]]
    assert names == ["encoder", "dit", "vae"] and all(st["freed"] for st in report["stages"])
    assert "stages (the timed image, real weights):" in out.stdout
