"""Block streaming on a GPU, emulating an 8 GB card: does it stay in budget, and how fast is it?

Builds a real-width, full-depth Z-Image DiT (30 + 2 + 2 blocks) with random weights made
on the host (filled through the GPU, chunk by chunk: no weight files), caps the caching
allocator at ``--card-gib`` with ``torch.cuda.set_per_process_memory_fraction``, plans
under the budget of such a card (its total minus the desktop headroom) and runs DiT
forwards at 1024² streamed, then resident where the real GPU holds the model. Prints
one JSON document: max_memory_allocated against the budget, s/it streamed and
resident, H2D GB/s and the share of copy time hidden under compute, per storage scheme.

    python scripts/gpu_stream_check.py                      # bf16 and w8a8, 1024², 8 GiB card
    python scripts/gpu_stream_check.py --tiny --device cpu  # dry run of the same code on a CPU

Needs only torch and pascaline. On an H100 the default run takes about two minutes.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import replace

import torch

from pascaline.models.zimage_dit import VARIANTS, ZImageDiT
from pascaline.offload.plan import module_tensors, plan_for_model
from pascaline.offload.streamer import BlockStreamer
from pascaline.runtime.device import GIB, DeviceCaps, default_budget

# Activations of one DiT forward at 1024² in bf16 (S = 4096 image + 64 caption tokens):
# the residual stream, q/k/v, the FFN's two 10240-wide products and their product, plus
# int8 copies and int32 results for w8a8. The measured peak is reported beside it.
ACTIVATION_GIB = {"bf16": 1.5, "int8": 1.75, "w8a8": 2.0, "w8a8-rot": 2.0}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--schemes", default="bf16,w8a8", help="comma list of bf16, int8, w8a8")
    parser.add_argument("--card-gib", type=float, default=8.0, help="VRAM of the emulated card")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--caption-tokens", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--skip-resident", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="the tiny DiT at 64², for a dry run")
    return parser.parse_args(argv)


def build_dit(args, scheme: str, fill_device: torch.device) -> ZImageDiT:
    """A DiT on the host with random weights: built on meta, quantized there, then filled."""
    cfg = VARIANTS["tiny"] if args.tiny else replace(VARIANTS["z-image-turbo"])
    with torch.device("meta"):
        model = ZImageDiT(cfg).to(torch.bfloat16).eval()
    if scheme != "bf16":
        from pascaline.quant import quantize_, scheme_from_name

        quantize_(model, scheme_from_name(scheme))
    model.to_empty(device="cpu")
    generator = torch.Generator(fill_device).manual_seed(0)
    with torch.no_grad():
        for owner, name, _, tensor in module_tensors(model):
            tensor.copy_(_random_like(tensor, name, type(owner).__name__, generator, fill_device))
    return model


def _random_like(t: torch.Tensor, name: str, owner: str, g: torch.Generator, device) -> torch.Tensor:
    """Weights that keep activations finite: 1 +- 0.1 for norms, N(0, 1/fan_in) for matrices."""
    if t.dtype == torch.int8:
        return torch.randint(-127, 128, t.shape, generator=g, device=device, dtype=torch.int8)
    if name == "scale":  # per-row int8 scale: dequantized rows of std about 1/sqrt(K)
        return torch.full(t.shape, 1.0 / 73.0, device=device, dtype=t.dtype) / max(1, t.numel()) ** 0.5
    if t.is_floating_point() and t.element_size() == 1:  # float8 storage
        return torch.randn(t.shape, generator=g, device=device).to(t.dtype)
    if t.ndim == 1 or "Norm" in owner:
        base = 1.0 if ("Norm" in owner and name == "weight") else 0.0
        return (base + 0.1 * torch.randn(t.shape, generator=g, device=device)).to(t.dtype)
    fan_in = t.shape[-1]
    return (torch.randn(t.shape, generator=g, device=device) / fan_in**0.5).to(t.dtype)


def inputs(args, device: torch.device):
    size = 64 if args.tiny else args.resolution
    cfg = VARIANTS["tiny"] if args.tiny else VARIANTS["z-image-turbo"]
    dtype = torch.bfloat16  # the storage and compute dtype of the float weights
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, size // 8, size // 8, generator=g).to(device, dtype)
    caps = [torch.randn(args.caption_tokens, cfg.cap_feat_dim, generator=g).to(device, dtype)]
    return x, torch.tensor([0.5], device=device), caps


def timed_forwards(model, args, device) -> list[float]:
    x, t, caps = inputs(args, device)
    times = []
    with torch.inference_mode():
        model(x, t, caps)  # warm-up
        for _ in range(args.iterations):
            _sync(device)
            start = time.perf_counter()
            model(x, t + 0.01 * len(times), caps)
            _sync(device)
            times.append(time.perf_counter() - start)
    return times


def run_streamed(model, args, scheme: str, device: torch.device, budget: int) -> dict:
    activation = int(ACTIVATION_GIB[scheme] * GIB) if not args.tiny else 1 << 20
    plan = plan_for_model(model, budget, activation, args.prefetch)
    streamer = BlockStreamer(model, plan, device, name=f"dit-{scheme}")
    _reset_peaks(device)
    with streamer:
        x, t, caps = inputs(args, device)
        with torch.inference_mode():
            model(x, t, caps)  # warm-up: the first call also fills the slots
        streamer.reset_stats()
        times = timed_forwards(model, args, device)
        stats = streamer.stats
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    n_calls = args.iterations + 1  # timed_forwards warms up once more
    return {
        "scheme": scheme,
        "mode": "streamed",
        "plan": {
            "resident": len(plan.resident),
            "streamed": len(plan.streamed),
            "slots": plan.slots,
            "slot_bytes": plan.slot_bytes,
            "activation_bytes_assumed": activation,
            "expected_peak_bytes": plan.expected_peak_bytes,
        },
        **_times(times),
        "own_accounted_peak_bytes": stats.peak_device_bytes,
        "max_memory_allocated": peak,
        "max_memory_reserved": torch.cuda.max_memory_reserved(device) if peak is not None else None,
        "activation_bytes_measured": None if peak is None else peak - stats.peak_device_bytes,
        "within_budget": None if peak is None else peak <= budget,
        "h2d_bytes_per_it": stats.h2d_bytes // n_calls,
        "h2d_gbps": stats.h2d_gbps,
        "copy_seconds_per_it": stats.copy_seconds / n_calls,
        "stall_seconds_per_it": stats.stall_seconds / n_calls,
        "hidden_copy_share": stats.hidden_copy_share,
        "pinned_bytes": stats.pinned_bytes,
        "pageable_bytes": stats.pageable_bytes,
    }


def run_resident(model, args, scheme: str, device: torch.device) -> dict:
    """The model moved whole to the device (it is not moved back: it is dropped next)."""
    _reset_peaks(device)
    model.to(device)
    times = timed_forwards(model, args, device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"scheme": scheme, "mode": "resident", **_times(times), "max_memory_allocated": peak}


def raw_h2d_gbps(device: torch.device, nbytes: int = 1 << 30) -> float | None:
    """Pinned host -> device bandwidth of one large copy, for comparison with the streamer's."""
    if device.type != "cuda":
        return None
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=True)
    _sync(device)
    start = time.perf_counter()
    for _ in range(3):
        dev.copy_(host, non_blocking=True)
    _sync(device)
    return 3 * nbytes / (time.perf_counter() - start) / 1e9


def _times(times: list[float]) -> dict:
    return {"s_per_it": statistics.median(times), "s_per_it_min": min(times), "s_per_it_max": max(times)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peaks(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def emulate_card(args, device: torch.device) -> tuple[int, int | None]:
    """Cap the allocator at the card's VRAM; the plan's budget is that card's default budget."""
    card = int(args.card_gib * GIB)
    if device.type != "cuda":
        return card, None
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, card / total), device)
    emulated = DeviceCaps.for_cuda(f"emulated {args.card_gib:g} GiB card", (6, 1), card)
    return card, default_budget(emulated)


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    caps = DeviceCaps.probe(args.device)
    device = torch.device(caps.device)  # "cuda" -> "cuda:0": the memory calls want an index
    real_total = caps.total_vram_bytes
    card, budget = emulate_card(args, device)
    report = {
        "device": caps.name,
        "torch": torch.__version__,
        "config": "tiny" if args.tiny else "z-image-turbo (30 + 2 + 2 blocks)",
        "resolution": 64 if args.tiny else args.resolution,
        "caption_tokens": args.caption_tokens,
        "iterations": args.iterations,
        "card_bytes": card,
        "raw_pinned_h2d_gbps": raw_h2d_gbps(device),
        "results": [],
    }
    for scheme in args.schemes.split(","):
        start = time.perf_counter()
        model = build_dit(args, scheme, device)
        weights = sum(t.numel() * t.element_size() for *_, t in module_tensors(model))
        scheme_budget = budget if budget is not None else _cpu_budget(model)
        result = run_streamed(model, args, scheme, device, scheme_budget)
        result["budget_bytes"], result["weight_bytes"] = scheme_budget, weights
        result["build_and_stream_seconds"] = time.perf_counter() - start
        report["results"].append(result)
        if not args.skip_resident and (device.type == "cpu" or weights + 3 * GIB < real_total):
            if device.type == "cuda":
                torch.cuda.set_per_process_memory_fraction(1.0, device)  # the real card, not the emulated one
            report["results"].append(run_resident(model, args, scheme, device))
            emulate_card(args, device)
        del model
        _reset_peaks(device)
    return report


def _cpu_budget(model) -> int:
    """On the CPU dry run: a budget that streams every block through two slots."""
    plan = plan_for_model(model, None, 0)
    return (1 << 20) + plan.other_bytes + 2 * max(b for _, b in plan.units)


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=2))
