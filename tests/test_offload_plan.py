import pytest
import torch
from torch import nn

from pascaline.errors import BudgetError, InvalidArgumentError
from pascaline.offload.plan import (
    ALIGN,
    other_nbytes,
    packed_nbytes,
    plan_for_model,
    plan_placement,
    unit_sizes,
)

GIB = 1 << 30
MIB = 1 << 20

# Z-Image Turbo parameter counts (zimage-turbo.md section 7).
MAIN_PARAMS = 180_910_336  # a noise_refiner or main block (modulated)
CONTEXT_PARAMS = 176_962_816  # a context_refiner block (no adaLN)
OTHER_PARAMS = 525_568 + 9_836_800 + 249_600 + 1_232_704 + 7_680  # embedders, final layer, pad tokens
LINEAR_PARAMS = 4 * 3840 * 3840 + 3 * 3840 * 10240  # attention + FFN weights: the quantized part
SCALE_ROWS = 4 * 3840 + 2 * 10240 + 3840  # one fp32 scale per output row of each Linear


def zimage_units(quant: bool) -> list[tuple[str, int]]:
    """30 + 2 + 2 blocks in execution order; int8 keeps norms and adaLN in bf16."""

    def size(params: int) -> int:
        if not quant:
            return 2 * params
        return LINEAR_PARAMS + 2 * (params - LINEAR_PARAMS) + 4 * SCALE_ROWS

    main, context = size(MAIN_PARAMS), size(CONTEXT_PARAMS)
    return (
        [(f"noise_refiner.{i}", main) for i in range(2)]
        + [(f"context_refiner.{i}", context) for i in range(2)]
        + [(f"layers.{i}", main) for i in range(30)]
    )


def test_real_sizes_add_up():
    bf16 = zimage_units(quant=False)
    assert sum(b for _, b in bf16) + 2 * OTHER_PARAMS == 2 * 6_154_908_736
    assert dict(bf16)["layers.0"] == 361_820_672
    assert abs(sum(b for _, b in zimage_units(quant=True)) - 6.28e9) < 0.01e9


# Expected resident counts by hand: (budget - 1 GiB activations - other - 2 slots) // block bytes.
# bf16 8 GiB: (8589934592 - 1073741824 - 23704704 - 2 * 361820672) // 361820672 = 18.
@pytest.mark.parametrize(
    ("quant", "budget_gib", "resident", "slots"),
    [
        (False, 6, 12, 2),
        (False, 8, 18, 2),
        (False, 11, 27, 2),
        (True, 6, 26, 2),
        (True, 8, 34, 0),
        (True, 11, 34, 0),
    ],
)
def test_plans_for_the_real_sizes(quant, budget_gib, resident, slots):
    units = zimage_units(quant)
    other = 2 * OTHER_PARAMS
    plan = plan_placement(units, budget_gib * GIB, GIB, prefetch=1, other_bytes=other)
    assert (len(plan.resident), plan.slots) == (resident, slots)
    assert len(plan.resident) + len(plan.streamed) == 34
    assert plan.expected_peak_bytes <= budget_gib * GIB
    by_name = dict(units)
    if slots:
        assert plan.slot_bytes == max(by_name[n] for n in plan.streamed)
        # maximal: keeping one more block resident would not fit
        smallest = min(by_name[n] for n in plan.streamed)
        assert plan.expected_peak_bytes + smallest - (plan.slot_bytes if len(plan.streamed) <= 2 else 0) > (
            budget_gib * GIB
        )
    assert plan.expected_peak_bytes == GIB + other + plan.resident_bytes + slots * plan.slot_bytes
    assert plan.streamed_bytes == sum(by_name[n] for n in plan.streamed)


def test_resident_units_are_spread_over_the_execution_order():
    plan = plan_placement(zimage_units(False), 8 * GIB, GIB, other_bytes=2 * OTHER_PARAMS)
    order = [n for n, _ in zimage_units(False)]
    positions = [order.index(n) for n in plan.streamed]
    gaps = [b - a for a, b in zip(positions, positions[1:], strict=False)]
    assert max(gaps) <= 3, positions  # never a long run of streamed blocks with nothing to hide under
    assert plan.resident == tuple(n for n in order if n in plan.resident)  # execution order kept


def test_no_budget_or_ample_budget_keeps_everything_resident():
    units = [("a", 100), ("b", 200)]
    for budget in (None, 400):
        plan = plan_placement(units, budget, 50, other_bytes=50)
        assert plan.streamed == () and plan.slots == 0 and plan.expected_peak_bytes == 400


def test_everything_streams_with_two_slots_then_one():
    units = [("a", 100), ("b", 120), ("c", 100)]
    two = plan_placement(units, 10 + 240, 10)  # 2 slots of 120
    assert (two.resident, two.streamed, two.slots, two.slot_bytes) == ((), ("a", "b", "c"), 2, 120)
    one = plan_placement(units, 10 + 125, 10)  # cannot overlap: one slot, no prefetch
    assert (one.slots, one.prefetch, one.resident, one.slot_bytes) == (1, 0, (), 120)
    # two slots of 100 beside a resident b would need 330: one slot and b resident is better
    tight = plan_placement(units, 10 + 239, 10)
    assert (tight.slots, tight.resident, tight.slot_bytes, tight.expected_peak_bytes) == (1, ("b",), 100, 230)
    some = plan_placement([*units, ("d", 100)], 10 + 120 + 200, 10)
    assert (some.resident, some.slots, some.expected_peak_bytes) == (("b",), 2, 10 + 120 + 200)


def test_deeper_prefetch_uses_more_slots():
    units = [(f"u{i}", 10) for i in range(8)]
    plan = plan_placement(units, 45, 0, prefetch=2)
    assert (plan.slots, plan.prefetch) == (3, 2)
    assert plan.expected_peak_bytes <= 45 and len(plan.resident) == 1


def test_too_small_budget_names_both_numbers():
    units = zimage_units(quant=False)
    with pytest.raises(BudgetError) as err:
        plan_placement(units, 1 * GIB, 900 * MIB, other_bytes=2 * OTHER_PARAMS)
    message = str(err.value)
    assert "1.00 GiB" in message and "900.00 MiB" in message and "345.06 MiB" in message
    assert "1.24 GiB in all" in message  # 900 MiB + 22.61 MiB + 345.06 MiB
    assert message.count(".") >= 1 and "\n" not in message


def test_invalid_arguments():
    with pytest.raises(InvalidArgumentError):
        plan_placement([("a", 1)], 10, 0, prefetch=-1)
    with pytest.raises(InvalidArgumentError):
        plan_placement([("a", 1), ("a", 2)], 10, 0)
    with pytest.raises(InvalidArgumentError):
        plan_placement([("a", -1)], 10, 0)


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.register_buffer("table", torch.zeros(3, dtype=torch.int8))


class Model(nn.Module):
    offload_units = ("first", "rest")

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.first = nn.ModuleList([Block(8)])
        self.rest = nn.ModuleList([Block(8), Block(8)])
        self.register_buffer("freqs", torch.zeros(5, dtype=torch.complex64))


def test_unit_sizes_of_a_module_are_packed_and_aligned():
    model = Model()
    # proj.weight 256 B, proj.bias 32, norm.weight 32, norm.bias 32, table 3: each padded to ALIGN
    assert unit_sizes(model) == [("first.0", 5 * ALIGN), ("rest.0", 5 * ALIGN), ("rest.1", 5 * ALIGN)]
    assert packed_nbytes(model.first[0]) == 5 * ALIGN
    assert other_nbytes(model) == (4 * 8 + 8) * 4 + 5 * 8
    plan = plan_for_model(model, 100 + 200 + 3 * 5 * ALIGN - 1, 100)
    assert (plan.resident, plan.slots, plan.expected_peak_bytes) == ((), 2, 100 + 200 + 2 * 5 * ALIGN)
    assert plan_for_model(model, 100 + 200 + 3 * 5 * ALIGN, 100).slots == 0


def test_a_model_without_units_is_refused():
    with pytest.raises(InvalidArgumentError, match="offload_units"):
        unit_sizes(nn.Linear(2, 2))
