"""The SD3/SD3.5 MMDiT against diffusers' SD3Transformer2DModel, through the production loaders:
skip layers, bf16, the fp16 residual-stream guard, the host-resident pos-embed, real sizes,
block streaming, quantization (SQNR-gated, pre-quantized files) and the bench building blocks."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pascaline.errors import ConfigError, InvalidArgumentError
from pascaline.formats.materialize import load_state_
from pascaline.formats.sd3_mmdit import convert_diffusers_mmdit, load_mmdit, open_mmdit_for_quantize
from pascaline.models.mmdit import VARIANTS, MMDiT, MMDiTConfig
from pascaline.offload.plan import plan_for_model, unit_sizes
from pascaline.offload.streamer import BlockStreamer
from pascaline.quant import QLinear, quantized_modules, scheme_from_name
from pascaline.quant.primitives import sqnr_db
from pascaline.runtime.memory import mmdit_activation_bytes
from tests.factories.sd3 import (
    KWARGS,
    REAL_KWARGS,
    make_diffusers_mmdit,
    mmdit_inputs,
    run_diffusers,
    save_original,
)

# Output SQNR (dB) of the whole tiny dual-attention model vs its fp32 run, measured (torch 2.13, CPU,
# the seeds below), minus ~1.5 dB of margin.
# measured: int8 61.8  w8a8 55.6  fp8-e4m3 45.8  fp8-e5m2 39.3  fp8-e4m3/tensor 45.7
MIN_DB = {"int8": 60.0, "w8a8": 54.0, "fp8-e4m3": 44.0, "fp8-e5m2": 37.5, "fp8-e4m3-per-tensor": 44.0}


def _ours(ref, variant: str, dtype=torch.float32) -> MMDiT:
    with torch.device("meta"):
        model = MMDiT(VARIANTS[variant])
    return load_state_(model, convert_diffusers_mmdit(ref.state_dict()).items(), dtype=dtype).eval()


@pytest.fixture(scope="module")
def ref():
    return make_diffusers_mmdit("tiny", seed=3)


@pytest.fixture(scope="module")
def ours(ref):
    return _ours(ref, "tiny")


@pytest.fixture(scope="module")
def float_file(ref, tmp_path_factory):
    return save_original(ref, tmp_path_factory.mktemp("sd3") / "sd3.5_medium_like.safetensors")


@pytest.mark.parametrize("variant", list(KWARGS))
@pytest.mark.parametrize("skip", [[0], [1], [0, 2], [-1]])
def test_skip_layers_equal_diffusers(variant, skip):
    ref = make_diffusers_mmdit(variant, seed=5)
    model = _ours(ref, variant)
    skip = [i % len(ref.transformer_blocks) for i in skip]  # -1: the context_pre_only last block
    x, t, ctx, pooled = mmdit_inputs(variant, batch=1, h=8, w=10, tokens=5)
    expected = run_diffusers(ref, x, t, ctx, pooled, skip_layers=skip)
    with torch.no_grad():
        got = model(x, t, ctx, pooled, skip_layers=skip)
        plain = model(x, t, ctx, pooled)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the skip is real


def test_scalar_timestep_and_batch_equal_single_samples(ours):
    x, t, ctx, pooled = mmdit_inputs("tiny", batch=2)
    with torch.no_grad():
        batch = ours(x, t, ctx, pooled)
        singles = torch.cat([ours(x[i:i + 1], t[i], ctx[i:i + 1], pooled[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(batch, singles, rtol=1e-5, atol=1e-5)


def test_bf16_runs_close(ref, ours):
    model = copy.deepcopy(ours).bfloat16()
    x, t, ctx, pooled = mmdit_inputs("tiny")
    with torch.no_grad():
        got = model(x.bfloat16(), t, ctx.bfloat16(), pooled.bfloat16())
    expected = run_diffusers(ref, x, t, ctx, pooled)
    assert got.dtype == torch.bfloat16
    err = (got.float() - expected).abs().max() / expected.abs().max()
    assert err < 0.03, f"bf16 relative error {err:.3g}"


def _growing_stream(seed=4):
    """A tiny model whose image residual stream passes 65504 (4 channels gain 3e4 per block, gate 1)
    while every layer output stays inside fp16: the case the fp32 stream is for."""
    ref = make_diffusers_mmdit("tiny", seed=seed)
    d = ref.inner_dim
    with torch.no_grad():
        for block in ref.transformer_blocks:
            block.norm1.linear.weight[5 * d:6 * d] = 0  # chunk 5 is gate_mlp, in both 6 and 9 chunks
            block.norm1.linear.bias[5 * d:6 * d] = 1
            block.ff.net[2].bias[:4] += 3e4
    return ref


def test_fp16_residual_stream_does_not_overflow():
    ref = _growing_stream()
    model = _ours(ref, "tiny")
    peaks = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: peaks.append(out[0].abs().max().item()))
             for b in model.joint_blocks]
    x, t, ctx, pooled = mmdit_inputs("tiny")
    with torch.no_grad():
        expected = model(x, t, ctx, pooled)
        for h in hooks:
            h.remove()
        half = [x.half(), t, ctx.half(), pooled.half()]
        plain_fp16 = run_diffusers(copy.deepcopy(ref).half(), *half)
        got = copy.deepcopy(model).half()(*half)
    assert max(peaks) > 65504 and not plain_fp16.isfinite().all()  # diffusers' fp16 stream overflows
    assert got.dtype == torch.float16 and got.isfinite().all()
    err = (got.float() - expected).abs().max() / expected.abs().max()
    assert err < 2e-3, f"fp16 relative error {err:.3g}"


class _OpsOn(TorchDispatchMode):
    """Records the aten ops that take a given tensor (by storage and size) as an input."""

    def __init__(self, tensor):
        super().__init__()
        self.ptr, self.numel, self.ops = tensor.data_ptr(), tensor.numel(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = tree_flatten((args, kwargs or {}))[0]
        if any(isinstance(a, torch.Tensor) and a.data_ptr() == self.ptr and a.numel() == self.numel
               for a in inputs):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_pos_embed_only_its_crop_moves(ref):
    """The table may stay in host RAM in another dtype (``host_tensors``): the forward views the
    whole table and copies only the crop."""
    model = copy.deepcopy(_ours(ref, "tiny")).bfloat16()
    model.pos_embed = model.pos_embed.float()  # what the offload layer leaves on the host
    x, t, ctx, pooled = (v.bfloat16() for v in mmdit_inputs("tiny"))
    recorder = _OpsOn(model.pos_embed)
    with torch.no_grad(), recorder:
        got = model(x, t, ctx, pooled)
    views = ("aten.view", "aten.slice")
    assert recorder.ops and all(op.startswith(views) for op in recorder.ops), recorder.ops
    expected = run_diffusers(ref, *mmdit_inputs("tiny"))
    assert (got.float() - expected).abs().max() / expected.abs().max() < 0.03
    assert MMDiT.host_tensors == ("pos_embed",) and MMDiT.offload_units == ("joint_blocks",)


@pytest.mark.parametrize(("variant", "params", "table", "tensors"), [
    ("sd3-medium", 2_028_328_000, 192 * 192 * 1536, 491),  # sd3-family.md §1.2: 2.028 B + 56.6 M
    ("sd3.5-medium", 2_243_171_520, 384 * 384 * 1536, 665),  # 2.243 B + 226.5 M (9 % of the file)
    ("sd3.5-large", 8_056_627_520, 192 * 192 * 2432, 923),  # 8.057 B + 89.7 M; 923 tensors
])
def test_real_sizes_equal_diffusers(variant, params, table, tensors):
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = MMDiT(VARIANTS[variant])
        reference = SD3Transformer2DModel(**REAL_KWARGS[variant])
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in reference.parameters()) == params
    assert model.pos_embed.numel() == table and len(model.state_dict()) == tensors
    assert len(unit_sizes(model)) == VARIANTS[variant].depth


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"heads": 7}, "hidden 1536 is not divisible by heads 7"),
    ({"dual_attention_layers": (3, 1)}, r"dual_attention_layers \(3, 1\) must be increasing"),
    ({"dual_attention_layers": (24,)}, r"below depth 24"),
    ({"depth": 0}, r"positive.*'depth': 0"),
    ({"t_freq_dim": 255}, "t_freq_dim 255 must be even"),
])
def test_config_validation(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        MMDiTConfig(**kwargs)


def test_bad_inputs_are_named(ours):
    x, t, ctx, pooled = mmdit_inputs("tiny", batch=1)
    with pytest.raises(InvalidArgumentError, match=r"multiples of 2, got \(1, 16, 7, 12\)"):
        ours(x[..., :7, :], t, ctx, pooled)
    with pytest.raises(InvalidArgumentError, match="keep both image sides at or below 256 px"):
        ours(torch.randn(1, 16, 34, 12), t, ctx, pooled)
    with pytest.raises(InvalidArgumentError, match=r"context \[1, L, 48\], got \(1, 7, 32\)"):
        ours(x, t, ctx[..., :32], pooled)
    with pytest.raises(InvalidArgumentError, match=r"pooled \[1, 32\], got \(2, 32\)"):
        ours(x, t, ctx, pooled.expand(2, -1))
    with pytest.raises(InvalidArgumentError, match=r"skip_layers \[3\] must be block indices 0..2"):
        ours(x, t, ctx, pooled, skip_layers=[3])


def test_streamed_equals_resident(ours):
    """BlockStreamer on the CPU with a budget that streams every joint block through two slots."""
    x, t, ctx, pooled = mmdit_inputs("tiny")
    with torch.no_grad():
        resident = ours(x, t, ctx, pooled)
        skipped = ours(x, t, ctx, pooled, skip_layers=[1])
    sizes = [b for _, b in unit_sizes(ours)]
    other = plan_for_model(ours, None, 0).other_bytes
    plan = plan_for_model(ours, 1000 + other + 2 * max(sizes), 1000)
    assert len(plan.streamed) == 3 and plan.slots == 2
    with BlockStreamer(ours, plan, "cpu") as streamer, torch.no_grad():
        streamed = [ours(x, t, ctx, pooled) for _ in range(2)]
        streamed_skip = ours(x, t, ctx, pooled, skip_layers=[1])
        assert streamer.stats.h2d_bytes > 0
    for out in streamed:
        torch.testing.assert_close(out, resident, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(streamed_skip, skipped, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def fp32_out(float_file):
    with torch.no_grad():
        return load_mmdit(float_file, dtype=torch.float32)(*mmdit_inputs("tiny"))


@pytest.mark.parametrize("name", list(MIN_DB))
def test_quantized_output_sqnr(name, float_file, fp32_out):
    model = load_mmdit(float_file, dtype=torch.float32, quant=name)
    with torch.no_grad():
        out = model(*mmdit_inputs("tiny"))
    assert sqnr_db(fp32_out, out) > MIN_DB[name]


def test_default_filter_quantizes_block_linears_only(float_file):
    model = load_mmdit(float_file, dtype=torch.float32, quant="int8")
    expected = set()
    for i in range(3):
        full = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
        for side, leaves in (("x_block", full), ("context_block", full if i < 2 else ["attn.qkv"])):
            expected |= {f"joint_blocks.{i}.{side}.{leaf}" for leaf in leaves}
    expected |= {"joint_blocks.0.x_block.attn2.qkv", "joint_blocks.0.x_block.attn2.proj"}
    assert set(quantized_modules(model)) == expected
    floats = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)}
    kept = {"x_embedder.proj", "t_embedder.mlp.0", "y_embedder.mlp.2", "context_embedder",
            "final_layer.linear", "final_layer.adaLN_modulation.1",
            "joint_blocks.0.x_block.adaLN_modulation.1", "joint_blocks.2.context_block.adaLN_modulation.1"}
    assert kept <= floats
    assert model.joint_blocks[0].x_block.attn.ln_q.weight.dtype == torch.float32
    assert model.pos_embed.dtype == torch.float32


@pytest.mark.parametrize("name", ["int8", "fp8-e4m3"])
def test_prequantized_file_round_trip(name, float_file, tmp_path):
    """open_mmdit_for_quantize + the quant.files writer give a file that loads with no requantizing
    and runs exactly like quantizing on load."""
    from pascaline.quant import quantize_
    from pascaline.quant.files import _write_stream
    from pascaline.quant.schemes import file_metadata

    scheme = scheme_from_name(name)
    source, model, tensors = open_mmdit_for_quantize(float_file)
    path = tmp_path / "q.safetensors"
    with source, path.open("wb") as f:
        quantize_(model, scheme)
        _write_stream(f, model, tensors(), file_metadata("sd3-mmdit", scheme), float_file)
    prequantized = load_mmdit(path, dtype=torch.float32)
    on_load = load_mmdit(float_file, dtype=torch.float32, quant=name)
    qkv = prequantized.joint_blocks[1].x_block.attn.qkv
    assert isinstance(qkv, QLinear) and qkv.qweight.dtype != torch.float32
    inputs = mmdit_inputs("tiny")
    with torch.no_grad():
        assert torch.equal(prequantized(*inputs), on_load(*inputs))
    with pytest.raises(InvalidArgumentError, match="stored quantized"):
        load_mmdit(path, quant="fp8-e5m2" if name == "int8" else "int8")


def test_activation_estimate():
    cfg = VARIANTS["sd3.5-large"]
    one = mmdit_activation_bytes(cfg, 1024, 1024, 333, torch.float32)
    cfg_batch = mmdit_activation_bytes(cfg, 1024, 1024, 333, torch.float32, batch=2)
    # one block's working set over 4096 + 333 tokens: 8 hidden-wide + 3 MLP-wide fp32 tensors per token
    floor = 4429 * (8 * 2432 + 3 * 9728) * 4
    assert floor < one < 1.6 * floor and 1.9 * one < cfg_batch < 2.1 * one
    fp16 = mmdit_activation_bytes(cfg, 1024, 1024, 333, torch.float16)
    bf16 = mmdit_activation_bytes(cfg, 1024, 1024, 333, torch.bfloat16)
    assert bf16 < fp16 < one  # fp16 adds the fp32 residual streams
    assert mmdit_activation_bytes(cfg, 1024, 1024, 333, torch.float16, "w8a8") > fp16
    assert mmdit_activation_bytes(cfg, 768, 768, 333, torch.float16) < fp16
    with pytest.raises(ValueError, match="multiple of 16"):
        mmdit_activation_bytes(cfg, 1000, 1024, 333, torch.float16)


def test_bench_building_blocks_match_diffusers():
    from pascaline.bench.synthetic_sd3 import build_mmdit, diffusers_mmdit, mmdit_config, mmdit_inputs

    cfg = mmdit_config("sd3.5-medium", depth=2, dim=128)
    assert (cfg.depth, cfg.heads, cfg.pos_embed_max_size, cfg.dual_attention_layers) == (2, 2, 384, (0, 1))
    assert mmdit_config("sd3.5-large", "full") == VARIANTS["sd3.5-large"]
    model = build_mmdit(cfg, dtype=torch.float32, seed=1)
    x, t, ctx, pooled = mmdit_inputs(cfg, 128, batch=2, context_tokens=9)
    assert x.shape == (2, 16, 16, 16) and ctx.shape == (2, 9, 4096) and pooled.shape == (2, 2048)
    expected = run_diffusers(diffusers_mmdit(model), x, t, ctx, pooled)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, ctx, pooled), expected, rtol=1e-5, atol=1e-5)
    quantized = build_mmdit(cfg, dtype=torch.bfloat16, quant="int8")
    assert quantized_modules(quantized)
    with pytest.raises(ValueError, match="float model"):
        diffusers_mmdit(quantized)
