"""The Z-Image DiT against diffusers' ZImageTransformer2DModel, through the production loader.

Covers every path of zimage-turbo.md §8 (caption and image padding, non-square grid,
batch with different caption lengths, t at 0 / mid / 1), bf16, the fp16 overflow guard,
the attention kernel against its reference, and one real-width model.
"""

import gc

import pytest
import torch

from pascaline.errors import ConfigError, InvalidArgumentError
from pascaline.formats.materialize import load_state_
from pascaline.formats.zimage_dit import convert_diffusers_dit, load_dit
from pascaline.kernels import fp16
from pascaline.kernels.attention import attention, attention_ref
from pascaline.models.zimage_dit import VARIANTS, ZImageDiT, ZImageDiTConfig
from tests.factories.dit import (
    make_real_width_diffusers_dit,
    make_tiny_diffusers_dit,
    run_diffusers,
    save_diffusers_dit,
)

# (latent h, w, caption lengths, t): image pad or not, caption pad or not, square or not, batch mask
CASES = [
    (8, 8, [20], [0.0]),  # 16 image tokens + 16 pad, caption 20 + 12 pad, t = 0 (pure noise)
    (12, 20, [32], [0.5]),  # non-square 6x10 grid: 60 tokens + 4 pad; caption already a multiple of 32
    (16, 16, [64], [1.0]),  # 64 tokens, no pad anywhere, t = 1
    (12, 20, [7, 45], [0.25, 0.75]),  # batch with different padded caption lengths -> key mask
    (8, 16, [33, 40], [0.3, 0.9]),  # batch, same padded length (64): no mask, different real lengths
]


def _inputs(h, w, lens, t, cap_dim=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lens), 16, h, w, generator=g)
    caps = [torch.randn(n, cap_dim, generator=g) for n in lens]
    return x, torch.tensor(t), caps


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(diffusers reference, our model loaded from its sharded diffusers folder in fp32)."""
    ref = make_tiny_diffusers_dit(seed=0)
    folder = save_diffusers_dit(ref, tmp_path_factory.mktemp("dit") / "transformer", shards=2)
    return ref, load_dit(folder, dtype=torch.float32)


@pytest.mark.parametrize(("h", "w", "lens", "t"), CASES)
def test_fp32_parity_with_diffusers(pair, h, w, lens, t):
    ref, ours = pair
    x, tt, caps = _inputs(h, w, lens, t)
    expected = run_diffusers(ref, x, tt, caps)
    with torch.no_grad():
        got = ours(x, tt, caps)
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_batch_equals_single_samples(pair):
    _, ours = pair
    x, tt, caps = _inputs(12, 20, [7, 45], [0.25, 0.75])
    with torch.no_grad():
        batch = ours(x, tt, caps)
        singles = torch.cat([ours(x[i:i + 1], tt[i:i + 1], caps[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(batch, singles, rtol=1e-5, atol=1e-5)


def test_pad_tokens_matter(pair):
    """The learned pad tokens are on the path (a zeroed x_pad_token changes the output)."""
    _, ours = pair
    x, tt, caps = _inputs(8, 8, [20], [0.5])
    with torch.no_grad():
        before = ours(x, tt, caps)
        saved = ours.x_pad_token.clone()
        ours.x_pad_token.zero_()
        after = ours(x, tt, caps)
        ours.x_pad_token.copy_(saved)
    assert (before - after).abs().max() > 1e-3


def test_bf16_loads_and_runs(pair, tmp_path):
    ref, _ = pair
    ours = load_dit(save_diffusers_dit(ref, tmp_path / "transformer", shards=1), dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    x, tt, caps = _inputs(12, 20, [7, 45], [0.25, 0.75])
    expected = run_diffusers(ref, x, tt, caps)
    with torch.no_grad():
        got = ours(x.bfloat16(), tt, [c.bfloat16() for c in caps])
    assert got.dtype == torch.bfloat16
    err = (got.float() - expected).abs().max() / expected.abs().max()
    assert err < 0.05, f"bf16 relative error {err:.3g}"


def _overflowing_tiny():
    """A tiny model whose FFN product, w2 output and attention output exceed 65504."""
    ref = make_tiny_diffusers_dit(seed=3)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(("feed_forward.w1.weight", "feed_forward.w3.weight")):
                p.mul_(500.0)
            elif name.endswith(("attention.to_v.weight", "attention.to_out.0.weight")):
                p.mul_(600.0)
    with torch.device("meta"):
        model = ZImageDiT(VARIANTS["tiny"])
    return load_state_(model, convert_diffusers_dit(ref.state_dict()).items(), dtype=torch.float32).eval()


def _min_of_max_outputs(model, x, tt, caps) -> float:
    """The smallest, over all w2 and attention.out layers, of the largest |output|."""
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: seen.append(o.abs().max().item()))
             for name, m in model.named_modules() if name.endswith(("feed_forward.w2", "attention.out"))]
    with torch.no_grad():
        model(x, tt, caps)
    for h in hooks:
        h.remove()
    return min(seen)


def test_fp16_overflow_guard(monkeypatch):
    model = _overflowing_tiny()
    x, tt, caps = _inputs(12, 20, [7, 45], [0.25, 0.75])
    assert _min_of_max_outputs(model, x, tt, caps) > 65504  # every guarded layer overflows plain fp16
    with torch.no_grad():
        expected = model(x, tt, caps)
        model.half()
        guarded = model(x.half(), tt, [c.half() for c in caps]).float()
        monkeypatch.setattr(fp16, "FP16_DOWNSCALE", 1.0)
        unguarded = model(x.half(), tt, [c.half() for c in caps]).float()
    assert not unguarded.isfinite().all()
    assert guarded.isfinite().all()
    err = (guarded - expected).abs().max() / expected.abs().max()
    assert err < 0.02, f"fp16 relative error {err:.3g}"


def test_fp16_helpers_are_exact_identities_elsewhere():
    y = torch.randn(4, 64) * 3
    assert fp16.scale_down_fp16(y) is y and fp16.downscaled_eps(1e-5, torch.bfloat16) == 1e-5
    s = fp16.fp16_downscale(torch.float16)
    norm = torch.nn.functional.rms_norm
    torch.testing.assert_close(norm(y * s, (64,), eps=1e-5 * s * s), norm(y, (64,), eps=1e-5))
    tiny = torch.full((1, 64), 1e-3)  # where eps dominates, the eps correction is what keeps it exact
    torch.testing.assert_close(norm(tiny * s, (64,), eps=fp16.downscaled_eps(1e-5, torch.float16)),
                               norm(tiny, (64,), eps=1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("b", "h", "s", "d", "masked"), [(1, 2, 7, 8, False), (2, 3, 40, 16, True),
                                                          (2, 30, 96, 128, True), (1, 4, 64, 32, False)])
def test_attention_matches_reference(dtype, b, h, s, d, masked):
    q, k, v = (torch.randn(b, h, s, d).to(dtype) for _ in range(3))
    mask = None
    if masked:
        mask = torch.arange(s)[None] < torch.tensor([s, s // 2 + 1] * b)[:b, None]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(attention(q, k, v, mask).float(), attention_ref(q, k, v, mask).float(),
                               rtol=tol, atol=tol)


def test_real_size_structure():
    with torch.device("meta"):
        model = ZImageDiT(VARIANTS["z-image-turbo"])
    assert len(model.state_dict()) == 453  # the ComfyUI file's tensors, norm_final excluded
    assert sum(p.numel() for p in model.parameters()) == 6_154_908_736
    assert all(hasattr(model, name) for name in ZImageDiT.offload_units)


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"n_heads": 7}, "dim 3840 is not divisible by n_heads 7"),
    ({"axes_dims": (32, 48, 40)}, r"axes_dims \(32, 48, 40\).*head_dim 128"),
    ({"dim": 0}, r"positive.*'dim': 0"),
])
def test_config_validation(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        ZImageDiTConfig(**kwargs)


def test_bad_inputs_are_named(pair):
    _, ours = pair
    with pytest.raises(InvalidArgumentError, match=r"multiples of 2, got \(1, 16, 7, 8\)"):
        ours(torch.randn(1, 16, 7, 8), torch.tensor([0.5]), [torch.randn(3, 32)])
    with pytest.raises(InvalidArgumentError, match="got 1 for a batch of 2"):
        ours(torch.randn(2, 16, 8, 8), torch.tensor([0.5, 0.5]), [torch.randn(3, 32)])


@pytest.mark.slow
def test_real_width_parity_with_diffusers():
    """dim 3840, 30 heads, FFN 10240, adaLN 256, t-embedder 1024, RoPE 32/48/48; 1 layer, 1+1 refiners.

    Our model shares the reference's tensors (assign=True; only qkv is a new tensor), so
    about 1.25 copies of the 2.2 GB fp32 weights exist at once."""
    ref = make_real_width_diffusers_dit(seed=0)
    with torch.device("meta"):
        ours = ZImageDiT(ZImageDiTConfig(n_layers=1, n_refiner_layers=1))
    load_state_(ours, convert_diffusers_dit(ref.state_dict()).items(), dtype=torch.float32)
    x, tt, caps = _inputs(16, 16, [20], [0.6], cap_dim=2560)
    expected = run_diffusers(ref, x, tt, caps)
    with torch.no_grad():
        got = ours.eval()(x, tt, caps)
    del ref, ours
    gc.collect()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
