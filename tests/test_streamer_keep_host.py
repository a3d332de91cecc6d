"""BlockStreamer(keep_host=True): a model kept between runs stays packed on the host, nothing re-pinned."""

import pytest
import torch
from torch import nn

from pascaline.offload.ledger import MemoryLedger
from pascaline.offload.plan import plan_for_model, unit_sizes
from pascaline.offload.streamer import BlockStreamer, HostPool
from tests.test_streamer import StandIn, X, budgets, run, snapshot


@pytest.fixture
def model():
    return StandIn().eval()


def _kept_streamer(model, case="some", **kwargs):
    """A keep_host streamer whose 'pinned' arenas are pageable stand-ins, counted."""
    streamer = BlockStreamer(model, budgets(model)[case], "cpu", activation_bytes=1000, keep_host=True,
                             **kwargs)
    arenas, packs = [], []
    streamer.pool = HostPool(pin=True, pin_limit_bytes=1 << 30, arena_bytes=1 << 16,
                             allocator=lambda n: arenas.append(n) or torch.empty(n, dtype=torch.uint8))
    pack = streamer._pack_
    streamer._pack_ = lambda unit: packs.append(unit.name) or pack(unit)
    return streamer, arenas, packs


def _ptrs(model):
    return {k: v.data_ptr() for k, v in model.state_dict(keep_vars=True).items()}


def test_a_second_attach_pins_and_packs_nothing_and_computes_the_same(model):
    reference = run(model, X)
    before = _ptrs(model)
    ledger = MemoryLedger()
    streamer, arenas, packs = _kept_streamer(model, ledger=ledger, name="dit")
    streamed = set(streamer.plan.streamed)
    assert streamed and streamer.plan.resident
    with streamer:
        first = run(model, X)
    assert sorted(packs) == sorted(streamed) and arenas
    pinned, made = streamer.pool.pinned_bytes, list(arenas)
    assert streamer.packed and streamer.stats.device_bytes == 0
    assert ledger.placed_bytes == 0 and ledger.peak_placed_bytes > 0
    # between runs: streamed units are views of the packing, resident ones their original host tensors
    ranges = [(a.buffer.data_ptr(), a.buffer.data_ptr() + a.buffer.numel()) for a in streamer.pool._arenas]
    after = _ptrs(model)
    for key, ptr in after.items():
        unit = ".".join(key.split(".")[:2])  # "layers.3.fc1.weight" -> "layers.3"
        assert any(lo <= ptr < hi for lo, hi in ranges) == (unit in streamed), key
        if unit not in streamed:
            assert ptr == before[key], key  # not copied back: the very tensor it was moved from
    packs.clear()
    with streamer:
        second = run(model, X)
    assert packs == [] and arenas == made and streamer.pool.pinned_bytes == pinned  # nothing new
    assert _ptrs(model) == after
    for want, got_1, got_2 in zip(reference, first, second, strict=True):
        assert torch.equal(want, got_1) and torch.equal(want, got_2)


def test_another_plan_reuses_the_packing_and_packs_only_new_units(model):
    reference = run(model, X)
    streamer, arenas, packs = _kept_streamer(model, "some")
    with streamer:
        run(model, X)
    first = set(packs)
    packs.clear()
    everything = plan_for_model(model, budgets(model)["all"], 1000)
    streamer.attach_(everything)
    got = run(model, X)
    streamer.detach_()
    assert set(packs) == set(everything.streamed) - first and streamer.plan is everything
    for a, b in zip(reference, got, strict=True):
        assert torch.equal(a, b)


def test_release_host_restores_the_module_exactly(model):
    before = snapshot(model)
    params = dict(model.named_parameters())
    streamer, _, _ = _kept_streamer(model)
    for _ in range(2):
        with streamer:
            run(model, X)
    assert streamer.pool.pinned_bytes > 0
    streamer.release_host_()
    assert not streamer.packed and streamer.pool.pinned_bytes == 0
    after = snapshot(model)
    for key, (value, stride, dtype, device) in before.items():
        assert torch.equal(value, after[key][0]) and (stride, dtype, device) == after[key][1:], key
    assert all(p is params[n] for n, p in model.named_parameters())
    assert model.layers[0].fc1.weight.stride() == (1, 32)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_a_tensor_replaced_between_runs_is_packed_afresh(model):
    streamer, _, packs = _kept_streamer(model, "all")
    with streamer:
        run(model, X)
    with torch.no_grad():  # e.g. a LoRA merged between two runs, by assignment
        model.layers[2].fc1.weight = nn.Parameter(model.layers[2].fc1.weight.detach() * 2)
    reference = run(model, X)  # the kept model still runs on the host, as it is
    packs.clear()
    with streamer:
        got = run(model, X)
    assert set(packs) == set(streamer.plan.streamed)
    for a, b in zip(reference, got, strict=True):
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_keep_host_repins_nothing(model):
    reference = run(model, X)
    sizes = dict(unit_sizes(model))
    streamer = BlockStreamer(model, budgets(model)["some"], "cuda", activation_bytes=1000, keep_host=True)
    with streamer:
        run(model, X.cuda())
    pinned = streamer.pool.pinned_bytes
    assert pinned > 0 and all(not t.is_cuda for t in model.state_dict().values())
    with streamer:
        got = run(model, X.cuda())
    assert streamer.pool.pinned_bytes == pinned and streamer.stats.pageable_bytes == 0
    for a, b in zip(reference, got, strict=True):
        torch.testing.assert_close(a, b.cpu())
    streamer.release_host_()
    assert streamer.pool.pinned_bytes == 0 and sum(sizes.values()) > 0
