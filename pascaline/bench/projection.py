"""Roofline projections of s/it on cards we cannot run here: a model, never a measurement.

Per strategy, the time of one full-depth forward (one sampler step: for SD3 a CFG step, a
batch of 2) of any family's diffusion model is the largest of three floors, each computed
from the work its bench kit counts (``bench.counters``, ``bench.counters_sd3``) and
published peak rates:

- compute: linear FLOPs at the rate of the linear's arithmetic (int8 for W8A8, else the
  compute dtype) plus attention and the rest at the compute-dtype rate; a W8A8 linear's
  quantize and rescale passes add ``GpuSpec.w8a8_overhead`` of its time where that share
  was measured on the card (``scripts/gpu_w8a8_check.py``), and nothing (the floor) where
  not;
- memory: every weight byte read once from VRAM;
- pcie: the bytes of the streamed blocks over pinned PCIe (copies overlap compute: both
  generations have >= 2 copy engines, legacy-gpus.md §7).

``bound`` names the largest. The compute dtype per card is ``runtime.device.compute_dtype``
(fp32 on Pascal and GTX 16xx, fp16 on tensor-core Turing), the streamed plan is the real
``plan_placement`` under ``default_budget`` with the family's own activation estimate.
Rates are peaks, so each figure is a floor.
"""

from __future__ import annotations

from dataclasses import dataclass

from pascaline.bench import counters
from pascaline.runtime.device import dtype_name

TERA = 1e12
GB = 1e9


@dataclass(frozen=True)
class GpuSpec:
    """Published peak rates of one card (TFLOP/s or TOPS, GB/s) and the preset that names it."""

    name: str
    preset: str  # runtime.device.DeviceCaps.preset name
    fp32_tflops: float
    fp16_tflops: float  # what torch's default fp16 GEMM (fp32 accumulate) gets
    int8_tops: float
    vram_gbs: float
    pcie_gbs: float  # pinned host -> device, measured-realistic, not theoretical
    # Measured share of a fused W8A8 linear's time outside the int8 GEMM (activation
    # quantization + rescale), from scripts/gpu_w8a8_check.py on this card; None until then.
    # For scale: Forge's unfused chain took 2.19 s next to 2.62 s of _int_mm per Flux step on a
    # GTX 1070 (0.46 of the linear time; legacy-gpus.md §5), which the fused kernels replace.
    w8a8_overhead: float | None = None


# legacy-gpus.md §6 (peak table) and §7 (PCIe): every number below is from there.
GPUS = (
    # GP104: 6.46 FP32; torch fp16 GEMM runs pseudo-fp16 at the FP32 rate (cublasGemmEx
    # fp32 compute, §6 notes); DP4A 25.9 TOPS; 256 GB/s; PCIe 3.0 x16 pinned ~12 GB/s.
    GpuSpec("GTX 1070", "gtx1070", 6.46, 6.46, 25.9, 256.0, 12.0),
    # TU116, no tensor cores. §6 lists the GTX 1660 (5.03 / 2x fp16 10.05 / 192 GB/s); the
    # Ti is derived the same way (§6: cores x 2 x clock): 1536 cores x 2 x 1.77 GHz = 5.44
    # FP32, DP4A 4x = 21.7 [UNCERTAIN, §6], 288 GB/s GDDR6; PCIe measured ~11.8 GB/s (§7,
    # vetter/shoc#79). fp16 GEMM is avoided on GTX 16xx (cuBLAS cliff, §6): fp32 rate.
    GpuSpec("GTX 1660 Ti", "gtx1660ti", 5.44, 5.44, 21.7, 288.0, 11.8),
    # TU106: 6.45 FP32; fp16 tensor cores 25.8 with fp32 accumulate (GeForce half rate,
    # torch's default); int8 tensor cores 103 TOPS; 336 GB/s; PCIe 3.0 x16 ~12 GB/s.
    GpuSpec("RTX 2060", "rtx2060", 6.45, 25.8, 103.0, 336.0, 12.0),
    # TU104 Tesla: datasheet 8.1 / 65 (fp32 accumulate at full rate) / 130; 320 GB/s; 70 W,
    # throttles; PCIe 3.0 x16 ~12 GB/s.
    GpuSpec("T4", "t4", 8.1, 65.0, 130.0, 320.0, 12.0),
)


@dataclass(frozen=True)
class Projection:
    """One projected s/it: ``s_per_it`` is None when the strategy does not fit the card."""

    gpu: str
    strategy: str
    compute_dtype: str
    quant: str | None
    s_per_it: float | None
    bound: str | None  # "compute" | "memory" | "pcie"; None when it does not fit
    compute_s: float
    memory_s: float
    pcie_s: float
    streamed_bytes: int
    fits: bool
    resolution: int
    label: str = "projected"
    model: str = ""  # the variant projected ("sd3.5-large")
    batch: int = 1  # samples per forward: 2 = one CFG step as a batch
    cond_tokens: int = 0  # caption / context tokens

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _rate(spec: GpuSpec, dtype: str) -> float:
    # bf16 is emulated below sm_80 (legacy-gpus.md §6): never the policy's pick there
    return {"fp32": spec.fp32_tflops, "fp16": spec.fp16_tflops}[dtype] * TERA


def int8_compute(quant: str | None) -> bool:
    """Whether ``quant`` runs its linears as int8 GEMMs (``w8a8``, ``w8a8-rot``)."""
    return quant is not None and (quant == "w8a8" or quant.startswith("w8a8-"))


def _compute_seconds(spec: GpuSpec, flops: counters.ForwardFlops, dtype: str, quant: str | None) -> float:
    if int8_compute(quant):
        linear = flops.linear / (spec.int8_tops * TERA) / (1.0 - (spec.w8a8_overhead or 0.0))
    else:
        linear = flops.linear / _rate(spec, dtype)
    return linear + (flops.attention + flops.per_sample) / _rate(spec, dtype)


@dataclass(frozen=True)
class _Work:
    """What is projected: the model of ``cfg`` (its kit and family) at a size, batch and text length."""

    kit: object
    cfg: object
    resolution: int
    cond_tokens: int
    batch: int

    def activations(self, dtype: str, quant: str | None) -> int:
        res, family = self.resolution, self.kit.family
        return family.dit_activation_bytes(self.cfg, res, res, self.cond_tokens, dtype, quant, self.batch)


def _placement(work: _Work, storage: str, dtype: str, budget: int, streamed: bool):
    """(fits, streamed bytes per forward) under ``budget`` with the real planner."""
    from pascaline.errors import BudgetError
    from pascaline.offload.plan import plan_placement

    units = work.kit.unit_bytes(work.cfg, storage, dtype)
    other = work.kit.other_bytes(work.cfg, dtype)
    activations = work.activations(dtype, None if storage == dtype else storage)
    if not streamed:
        return other + activations + sum(b for _, b in units) <= budget, 0
    try:
        plan = plan_placement(units, budget, activations, 1, other_bytes=other)
    except BudgetError:
        return False, 0
    return True, plan.streamed_bytes


def _work(cfg, resolution: int, caption_tokens: int | None, batch: int | None) -> _Work:
    """The kit of ``cfg``; unset text length and batch from the variant that suits ``cfg``."""
    from pascaline.bench.kits import kit_of_config, step_batch

    kit = kit_of_config(cfg)
    family = kit.family
    tokens = caption_tokens or family.typical_cond_tokens(cfg)
    batch = batch or step_batch(family, family.variant(family.guess_variant(cfg)))
    return _Work(kit, cfg, resolution, tokens, batch)


def project(
    cfg, spec: GpuSpec, strategy: str, quant: str | None, *, resolution: int = 1024,
    caption_tokens: int | None = None, batch: int | None = None, model: str = "",
) -> Projection:
    """Projected s/it of a full-depth forward of ``cfg`` on ``spec``; ``strategy``: resident | streamed.

    ``caption_tokens`` and ``batch`` default to the family's typical prompt and its step's batch
    (2 for a CFG step of a family that batches guidance: SD3)."""
    from pascaline.runtime.device import DeviceCaps, compute_dtype, default_budget

    work = _work(cfg, resolution, caption_tokens, batch)
    caps = DeviceCaps.preset(spec.preset)
    dtype = dtype_name(compute_dtype(caps, "dit"))
    storage = quant or dtype
    flops = work.kit.forward_flops(cfg, resolution, work.cond_tokens, work.batch)
    fits, streamed_bytes = _placement(work, storage, dtype, default_budget(caps), strategy == "streamed")
    times = {
        "compute": _compute_seconds(spec, flops, dtype, quant),
        "memory": work.kit.weight_bytes(cfg, storage, dtype) / (spec.vram_gbs * GB),
        "pcie": streamed_bytes / (spec.pcie_gbs * GB),
    }
    bound = max(times, key=times.get) if fits else None
    return Projection(
        spec.name,
        strategy if quant is None else f"{strategy}-{quant}",
        dtype,
        quant,
        times[bound] if fits else None,
        bound,
        times["compute"],
        times["memory"],
        times["pcie"],
        streamed_bytes,
        fits,
        resolution,
        model=model,
        batch=work.batch,
        cond_tokens=work.cond_tokens,
    )


def project_all(
    cfg, strategies: list[tuple[str, str | None]], *, resolution: int = 1024,
    caption_tokens: int | None = None, batch: int | None = None, model: str = "",
) -> list[Projection]:
    """``project`` for every card in ``GPUS`` and every ``(strategy, quant)`` pair."""
    kw = {"resolution": resolution, "caption_tokens": caption_tokens, "batch": batch, "model": model}
    return [project(cfg, spec, s, q, **kw) for spec in GPUS for s, q in strategies]
