"""BlockStreamer on a small stand-in model: streamed == resident bitwise, budgets, restore."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pascaline.offload.ledger import LeakError, MemoryLedger
from pascaline.offload.plan import plan_for_model, unit_sizes
from pascaline.offload.streamer import BlockStreamer, HostPool


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.register_buffer("gain", torch.rand(dim) + 0.5)
        self.register_buffer("shift", torch.arange(dim, dtype=torch.int64), persistent=False)

    def forward(self, x):
        # x: [B, L, D]
        return x + self.fc2(F.gelu(self.fc1(self.norm(x)))) * self.gain + self.shift.to(x.dtype) * 1e-3


class StandIn(nn.Module):
    """Three lists of blocks, like the DiT's refiners and layers, plus non-block weights."""

    offload_units = ("refiner", "context", "layers")

    def __init__(self, dim: int = 16, depth: tuple[int, int, int] = (2, 1, 5), reverse: bool = False):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.refiner = nn.ModuleList([Block(dim, 2 * dim) for _ in range(depth[0])])
        self.context = nn.ModuleList([Block(dim, 3 * dim) for _ in range(depth[1])])  # larger units
        self.layers = nn.ModuleList([Block(dim, 2 * dim) for _ in range(depth[2])])
        self.head = nn.Linear(dim, 8)
        self.register_buffer("freqs", torch.polar(torch.ones(dim), torch.rand(dim)))  # complex64
        self.reverse = reverse
        with torch.no_grad():  # a non-contiguous weight must come back with its strides
            self.layers[0].fc1.weight = nn.Parameter(torch.randn(dim, 2 * dim).t())

    def forward(self, x):
        h = self.embed(x) * self.freqs.real
        blocks = [*self.refiner, *self.context, *self.layers]
        for block in reversed(blocks) if self.reverse else blocks:
            h = block(h)
        return self.head(h)


def run(model, x, calls=3):
    with torch.no_grad():
        return [model(x + i) for i in range(calls)]


def snapshot(model):
    return {
        k: (v.clone(), v.stride(), v.dtype, v.device) for k, v in model.state_dict(keep_vars=True).items()
    }


@pytest.fixture
def model():
    return StandIn().eval()


X = torch.randn(2, 5, 8)


def budgets(model, prefetch=1, activation=1000):
    """Budgets that force 0, some and all units of ``model`` to stream."""
    sizes = [b for _, b in unit_sizes(model)]
    other = plan_for_model(model, None, 0).other_bytes
    slots = min(prefetch + 1, len(sizes))
    all_streamed = activation + other + slots * max(sizes)
    some = all_streamed + max(1, (len(sizes) - slots) // 2) * max(sizes)
    return {"none": activation + other + sum(sizes), "some": some, "all": all_streamed}


def assert_streaming_is_exact(model, call, case, *, prefetch=1, activation=1000, calls=2):
    """Run ``call(i)`` resident, then streamed under the ``case`` budget: bitwise equal, within budget."""
    reference = [call(i) for i in range(calls)]
    budget = budgets(model, prefetch, activation)[case]
    streamer = BlockStreamer(model, budget, "cpu", activation_bytes=activation, prefetch=prefetch)
    plan = streamer.plan
    shape = {"none": (True, False), "some": (True, True), "all": (False, True)}[case]
    assert (bool(plan.resident), bool(plan.streamed)) == shape, plan.describe()
    with streamer:
        got = [call(i) for i in range(calls)]
    for want, have in zip(reference, got, strict=True):
        for a, b in zip(_tensors(want), _tensors(have), strict=True):
            assert torch.equal(a, b)
    stats = streamer.stats
    assert stats.peak_device_bytes == plan.weight_bytes  # own accounting == the plan
    assert plan.expected_peak_bytes == stats.peak_device_bytes + activation <= budget
    assert stats.device_bytes == 0 and stats.forwards >= calls
    assert stats.copies >= (
        len(plan.streamed) if len(plan.streamed) <= plan.slots else calls * len(plan.streamed)
    )
    return streamer


def _tensors(value):
    return [value] if isinstance(value, torch.Tensor) else list(value)


@pytest.mark.parametrize("case", ["none", "some", "all"])
@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_streamed_equals_resident_bitwise(model, case, prefetch):
    streamer = assert_streaming_is_exact(
        model, lambda i: run(model, X + i, calls=1)[0], case, prefetch=prefetch
    )
    assert streamer.plan.slots == (0 if case == "none" else prefetch + 1)


def test_every_streamed_unit_is_copied_each_call_and_the_window_wraps(model):
    streamer = BlockStreamer(model, budgets(model)["all"], "cpu", activation_bytes=1000, prefetch=1)
    sizes = dict(unit_sizes(model))
    with streamer:
        run(model, X, calls=4)
        stats = streamer.stats
    assert streamer.plan.slots == 2 and len(streamer.plan.streamed) == 8
    # 4 calls x 8 units, plus the first unit of a fifth call prefetched by the last unit
    assert stats.copies == 4 * 8 + 1
    assert stats.h2d_bytes == 4 * sum(sizes.values()) + sizes["refiner.0"]
    assert stats.pageable_bytes == sum(sizes.values()) and stats.pinned_bytes == 0
    assert stats.copy_seconds > 0 and stats.h2d_gbps > 0 and stats.hidden_copy_share == 0.0


def test_streamed_weights_are_views_of_the_reused_slots(model):
    streamer = BlockStreamer(model, budgets(model)["all"], "cpu", activation_bytes=1000)
    seen = []

    def probe(module, args):
        seen.append(module.fc1.weight.data_ptr())

    with streamer:
        handles = [b.register_forward_pre_hook(probe) for b in model.layers]  # after the streamer's
        slots = [s.buffer for s in streamer._slots]
        ranges = [(s.data_ptr(), s.data_ptr() + s.numel()) for s in slots]
        run(model, X, calls=2)
        assert [s.buffer.data_ptr() for s in streamer._slots] == [s.data_ptr() for s in slots]  # no churn
        host = model.layers[1].fc1.weight.data_ptr()
        assert not any(lo <= host < hi for lo, hi in ranges)  # between calls: the host pack
    for handle in handles:
        handle.remove()
    assert len(seen) == 10
    assert all(any(lo <= p < hi for lo, hi in ranges) for p in seen)


def test_detach_restores_the_module_exactly(model):
    before = snapshot(model)
    params = dict(model.named_parameters())
    reference = run(model, X, calls=1)
    with BlockStreamer(model, budgets(model)["some"], "cpu", activation_bytes=1000):
        run(model, X, calls=2)
    after = snapshot(model)
    assert before.keys() == after.keys()
    for key, (value, stride, dtype, device) in before.items():
        got = after[key]
        assert torch.equal(value, got[0]) and (stride, dtype, device) == got[1:], key
    assert model.layers[0].fc1.weight.stride() == (1, 32)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert torch.equal(run(model, X, calls=1)[0], reference[0])
    assert model.layers[3].shift.dtype == torch.int64 and "shift" not in model.layers[3].state_dict()


def test_unexpected_order_and_a_failed_forward_stay_correct(model):
    reversed_model = StandIn(reverse=True).eval()
    reversed_model.load_state_dict(model.state_dict())
    reference = run(reversed_model, X)
    with BlockStreamer(reversed_model, budgets(model)["all"], "cpu", activation_bytes=1000, prefetch=2):
        with pytest.raises(RuntimeError), torch.no_grad():
            reversed_model(torch.randn(2, 5, 7))  # shape error inside the first block
        got = run(reversed_model, X)
    for a, b in zip(reference, got, strict=True):
        assert torch.equal(a, b)


def test_inference_mode_and_grad_guard(model):
    reference = run(model, X, calls=1)[0]
    with BlockStreamer(model, budgets(model)["all"], "cpu", activation_bytes=1000):
        with torch.inference_mode():
            assert torch.equal(model(X), reference)
        with pytest.raises(RuntimeError, match="no_grad"):
            model(X)


def test_ledger_sees_the_placement_and_its_release(model):
    ledger = MemoryLedger(strict=True)
    streamer = BlockStreamer(
        model, budgets(model)["some"], "cpu", activation_bytes=1000, ledger=ledger, name="dit"
    )
    with ledger.stage("dit") as record, streamer:
        run(model, X, calls=1)
        assert ledger.owners() == {"dit": streamer.plan.weight_bytes}
    assert record.freed and record.peak_placed_bytes == streamer.plan.weight_bytes
    with pytest.raises(LeakError, match="dit"), ledger.stage("leaky"):
        streamer.attach_()  # never detached inside the stage
    streamer.detach_()


def test_a_plan_for_another_model_is_refused(model):
    other = StandIn(depth=(1, 1, 1))
    plan = plan_for_model(other, None, 0)
    with pytest.raises(ValueError, match="does not describe"):
        BlockStreamer(model, plan).attach_()


def test_host_pool_caps_pinned_bytes():
    pool = HostPool(pin=False, pin_limit_bytes=1 << 30)
    buffers = [pool.allocate(100), pool.allocate(50)]
    assert (pool.pinned_bytes, pool.pageable_bytes) == (0, 150)
    pool.free(buffers[0])
    assert pool.pageable_bytes == 50


def test_a_failed_attach_puts_everything_back(model, monkeypatch):
    before = snapshot(model)
    ledger = MemoryLedger()
    streamer = BlockStreamer(
        model, budgets(model)["some"], "cpu", activation_bytes=1000, ledger=ledger, name="dit"
    )

    def out_of_memory(nbytes):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(streamer, "_device_empty", out_of_memory)  # the slots, after placing and packing
    with pytest.raises(torch.OutOfMemoryError):
        streamer.attach_()
    assert not streamer.attached and ledger.owners() == {} and streamer.pool.pageable_bytes == 0
    after = snapshot(model)
    assert after.keys() == before.keys()
    for key, (value, stride, dtype, device) in before.items():
        assert torch.equal(after[key][0], value) and after[key][1:] == (stride, dtype, device)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    monkeypatch.undo()
    with streamer:  # and the same streamer attaches cleanly afterwards
        got = run(model, X, calls=1)
    assert torch.equal(got[0], run(model, X, calls=1)[0])


def _stand_in_pinned(nbytes):  # pageable memory standing for a pinned arena
    return torch.empty(nbytes, dtype=torch.uint8)


def test_pinned_buffers_come_from_power_of_two_arenas():
    made = []
    pool = HostPool(pin=True, pin_limit_bytes=4096 + 512, arena_bytes=1024,
                    allocator=lambda n: made.append(n) or _stand_in_pinned(n))
    pool.expect(4 * 512 + 2048 + 512)
    a, b, c = pool.allocate(300), pool.allocate(300), pool.allocate(300)  # 256-aligned: two per arena
    assert made == [1024, 1024] and pool.pinned_bytes == 2048 and pool.pageable_bytes == 0
    d = pool.allocate(300)  # the second arena's free half (first fit)
    big = pool.allocate(2048)  # larger than an arena: its own power of two
    assert made == [1024, 1024, 2048] and pool.pinned_bytes == 4096
    tail = pool.allocate(400)  # 512 left under the cap: the smallest power of two that fits
    assert made[-1] == 512 and pool.pinned_bytes == 4608
    over = pool.allocate(100)  # every arena full and the cap reached: pageable
    assert pool.pageable_bytes == 100 and len(made) == 4
    buffers = [a, b, c, d, big, tail, over]
    for i, buf in enumerate(buffers):  # no two buffers share a byte
        buf.fill_(i)
    assert [int(buf.float().mean()) for buf in buffers] == list(range(7))
    pool.free(a)
    assert pool.pinned_bytes == 4608  # b still lives in the first arena
    pool.free(b)
    assert pool.pinned_bytes == 3584  # the first arena is given back whole
    for buf in (c, d, big, tail, over):
        pool.free(buf)
    assert (pool.pinned_bytes, pool.pageable_bytes) == (0, 0)


def test_arenas_are_sized_to_what_is_expected():
    made = []
    pool = HostPool(pin=True, pin_limit_bytes=1 << 30, arena_bytes=8192,
                    allocator=lambda n: made.append(n) or _stand_in_pinned(n))
    pool.expect(13 * 1536)  # 13 units of 1300 bytes, 1536 aligned: 2048 each if pinned one by one
    units = [pool.allocate(1300) for _ in range(13)]
    assert made == [8192, 8192, 4096, 2048]  # 5 + 5 + 2 + 1 units
    assert pool.pinned_bytes == 22528 < 13 * 2048 and pool.pageable_bytes == 0
    for unit in units:
        pool.free(unit)
    assert pool.pinned_bytes == 0


def test_pinning_refused_by_the_os_is_retried_smaller_then_pageable():
    def lock_at_most(limit):
        def allocate(n):
            if n > limit:
                raise RuntimeError("cudaHostAlloc failed")
            return _stand_in_pinned(n)

        return allocate

    pool = HostPool(pin=True, pin_limit_bytes=1 << 30, arena_bytes=8192, allocator=lock_at_most(2048))
    pool.expect(8192)
    assert pool.allocate(1000).numel() == 1000 and pool.pinned_bytes == 2048
    refusing = HostPool(pin=True, pin_limit_bytes=1 << 30, arena_bytes=1024, allocator=lock_at_most(0))
    assert refusing.allocate(100).numel() == 100
    assert (refusing.pinned_bytes, refusing.pageable_bytes, refusing.pin_limit_bytes) == (0, 100, 0)


def test_streaming_from_arena_buffers_is_exact(model):
    reference = run(model, X)
    streamer = BlockStreamer(model, budgets(model)["all"], "cpu", activation_bytes=1000)
    sizes = dict(unit_sizes(model))
    streamer.pool = HostPool(pin=True, pin_limit_bytes=1 << 30, arena_bytes=4 * max(sizes.values()),
                             allocator=_stand_in_pinned)
    with streamer:
        got = run(model, X)
        stats = streamer.stats
    for a, b in zip(reference, got, strict=True):
        assert torch.equal(a, b)
    assert stats.pageable_bytes == 0 and 0 < stats.pinned_bytes < 2 * sum(sizes.values())
    assert streamer.pool.pinned_bytes == 0  # every arena given back on detach


@pytest.mark.cuda
def test_cuda_streaming_with_pinned_pool_and_fallback(model):
    reference = run(model, X)
    cuda_model = model
    sizes = dict(unit_sizes(model))
    cap = sizes["layers.1"] * 3  # three units pinned, the rest pageable
    streamer = BlockStreamer(
        cuda_model, budgets(model)["all"], "cuda", activation_bytes=1000, pin_limit_bytes=cap
    )
    with streamer:
        got = run(cuda_model, X.cuda())
        stats = streamer.stats
        assert streamer.model.head.weight.is_cuda
    for a, b in zip(reference, got, strict=True):
        torch.testing.assert_close(a, b.cpu())
    assert 0 < stats.pinned_bytes <= cap and stats.pageable_bytes > 0
    assert stats.copy_seconds > 0 and 0.0 <= stats.hidden_copy_share <= 1.0
    assert not model.head.weight.is_cuda


@pytest.mark.parametrize("scheme", ["int8", "w8a8", "fp8-e4m3"])
@pytest.mark.parametrize("case", ["some", "all"])
def test_quantized_blocks_stream_exactly(model, scheme, case):
    from pascaline.quant import QLinear, quantize_, scheme_from_name

    quantize_(model, scheme_from_name(scheme))
    assert isinstance(model.layers[2].fc1, QLinear) and model.layers[2].fc1.qweight.element_size() == 1
    assert_streaming_is_exact(model, lambda i: run(model, X + i, calls=1)[0], case)


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    from tests.factories.qwen3 import cached_tokenizer, make_qwen3, save_comfy

    tokenizer = cached_tokenizer(tmp_path_factory.getbasetemp())
    folder = tmp_path_factory.mktemp("models") / "text_encoders"
    # 5 layers in the file, 4 used (hidden_states[-2]): 4 units to stream
    path = save_comfy(make_qwen3(num_hidden_layers=5), folder / "qwen_3_4b.safetensors", dtype=torch.float32)
    return path, tokenizer


PROMPTS = ["a lighthouse at dusk", "two cats on a red sofa, photographed from above", "x"]


@pytest.mark.parametrize("quant", [None, "int8", "w8a8"])
def test_text_encoder_streams_exactly(encoder_file, quant):
    from pascaline.formats.qwen3 import load_text_encoder

    path, tokenizer = encoder_file
    encoder = load_text_encoder(path, dtype=torch.float32, tokenizer=tokenizer, quant=quant)
    assert [n for n, _ in unit_sizes(encoder.model)] == [f"layers.{i}" for i in range(4)]
    for case in ("none", "some", "all"):  # one model, attached and detached three times
        streamer = assert_streaming_is_exact(
            encoder.model, lambda i: encoder.encode(PROMPTS[i:]), case, activation=10**5
        )
    assert streamer.stats.h2d_bytes >= 2 * sum(b for _, b in streamer.plan.units)


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    from tests.factories.dit import make_tiny_diffusers_dit, save_diffusers_dit

    return save_diffusers_dit(make_tiny_diffusers_dit(seed=0), tmp_path_factory.mktemp("dit") / "transformer")


def sampler_calls(dit, cap_dim, size=8, batch=2, seed=3):
    """What a sampler does: the DiT called again and again on new latents and timesteps."""
    g = torch.Generator().manual_seed(seed)
    caps = [torch.randn(7, cap_dim, generator=g), torch.randn(40, cap_dim, generator=g)][:batch]
    latents = torch.randn(4, batch, 16, size, size, generator=g)

    @torch.no_grad()
    def call(i):
        return dit(latents[i], torch.tensor([0.1 + 0.2 * i, 0.5][:batch]), caps)

    return call


@pytest.mark.parametrize("quant", [None, "int8", "w8a8"])
def test_tiny_dit_streams_exactly(dit_folder, quant):
    from pascaline.formats.zimage_dit import load_dit

    dit = load_dit(dit_folder, dtype=torch.float32, quant=quant)
    assert [n for n, _ in unit_sizes(dit)][:3] == ["noise_refiner.0", "noise_refiner.1", "context_refiner.0"]
    call = sampler_calls(dit, dit.config.cap_feat_dim)
    for case, prefetch in (("none", 1), ("some", 1), ("all", 0), ("all", 1), ("all", 2)):
        streamer = assert_streaming_is_exact(dit, call, case, prefetch=prefetch, activation=10**6, calls=4)
    # 6 blocks, 3 slots, 4 sampler steps: every block copied once per step, plus 2 prefetched for step 5
    assert streamer.stats.copies == 4 * 6 + 2


@pytest.mark.slow
def test_real_width_dit_streams_exactly():
    from dataclasses import replace

    from pascaline.models.zimage_dit import VARIANTS, ZImageDiT

    # real widths (dim 3840, FFN 10240, 30 heads), 1 + 1 + 1 blocks: 2.2 GB in fp32
    dit = ZImageDiT(replace(VARIANTS["z-image-turbo"], n_layers=1, n_refiner_layers=1)).eval()
    with torch.no_grad():
        for p in dit.parameters():
            if p.ndim == 1 or "pad_token" in p.__class__.__name__:
                p.normal_(1.0, 0.1)
    assert max(b for _, b in unit_sizes(dit)) == 180_910_336 * 4  # one main block, fp32
    call = sampler_calls(dit, dit.config.cap_feat_dim, size=4, batch=1)
    for case in ("none", "some", "all"):  # one slot: at most 2.2 GB + 0.7 GB in memory
        assert_streaming_is_exact(dit, call, case, prefetch=0, activation=10**7, calls=1)
