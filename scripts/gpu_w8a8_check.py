"""W8A8 on a lent GPU (H100/H200): per-linear times and SQNR, a profile, a streamed full-depth Z-Image step.

One run prints one JSON document (``--out`` also writes it):

- ``environment``: device, torch, NVRTC, the W8A8 path taken, the kernels' compile time;
- ``exact``: the fused kernels against their ``_ref`` twins, bit for bit, at the real shapes;
- ``linears``: at M = 4128 tokens (1024² + 32 caption tokens), K = 3840 and N = 3840 / 10240 /
  11520 (plus the FFN's K = 10240, N = 3840): median ms of bf16 and fp16 ``F.linear``, int8
  weight-only, W8A8 through the torch ops and through the fused kernels, rotated and not,
  ``_int_mm`` alone and each fused kernel alone; the SQNR of each against the float32 layer on
  Gaussian activations and on activations with 1 % of the channels 30x larger; the transient
  device bytes each call allocated (what ``runtime.memory.quant_workspace_bytes`` estimates);
- ``profiles``: a torch.profiler table of the fused W8A8 linear wherever it does not beat bf16;
- ``block_sqnr``: one real-width DiT block, bf16 / w8a8 / w8a8-rot against float32;
- ``step``: a full-depth (30 + 2 + 2 blocks) streamed DiT forward at 1024² under an emulated 8 GiB
  card (``scripts/gpu_stream_check.py``'s build, plan and runner): bf16, w8a8 (fused, then the
  torch ops on the same model), w8a8-rot; and the keep_host re-attach times.

    python scripts/gpu_w8a8_check.py --out w8a8.json    # everything: about 5 minutes on an H100
    python scripts/gpu_w8a8_check.py --skip-step        # linears, profile, block: under a minute
    python scripts/gpu_w8a8_check.py --dry-run          # on the CPU, tiny shapes: checks the script

Needs only torch and pascaline (NVRTC comes with torch's CUDA wheels).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_stream_check as stream_check  # noqa: E402  (the sibling script: build, plan, run)

from pascaline.kernels.int8_matmul import _int_mm_padded  # noqa: E402
from pascaline.kernels.nvrtc import nvrtc_status, nvrtc_version  # noqa: E402
from pascaline.kernels.w8a8 import (  # noqa: E402
    epilogue_fused,
    epilogue_ref,
    fused_kernels,
    hadamard_block,
    quantize_rows_fused,
    quantize_rows_ref,
    w8a8_linear,
    w8a8_path,
)
from pascaline.quant import QLinear, quantize_, scheme_from_name  # noqa: E402
from pascaline.quant.primitives import sqnr_db  # noqa: E402

REAL_SHAPES = [(4128, 3840, 3840), (4128, 3840, 10240), (4128, 3840, 11520), (4128, 10240, 3840)]
DRY_SHAPES = [(64, 256, 128), (20, 320, 96)]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes and the tiny DiT")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--skip-step", action="store_true", help="no full-depth streamed step")
    parser.add_argument("--step-schemes", default="bf16,w8a8,w8a8-rot")
    parser.add_argument("--card-gib", type=float, default=8.0)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.warmup, args.reps, args.iterations = "cpu", 1, 2, 1
    return args


# --- helpers ------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn, device: torch.device, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def transient_bytes(fn, device: torch.device) -> int | None:
    """Device bytes ``fn()`` allocated beyond its result at its peak."""
    if device.type != "cuda":
        return None
    _sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base - out.numel() * out.element_size()


def activations(m: int, k: int, device, dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    gauss = torch.randn(m, k, generator=g)
    outliers = gauss.clone()
    outliers[:, torch.randperm(k, generator=g)[: max(1, k // 100)]] *= 30
    return {"gauss": gauss.to(device, dtype), "outlier": outliers.to(device, dtype)}


# --- sections -----------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "cuda": torch.version.cuda, "nvrtc_error": nvrtc_status()}
    report["nvrtc"] = None if report["nvrtc_error"] else ".".join(map(str, nvrtc_version()))
    if device.type == "cuda":
        began = time.perf_counter()
        found = fused_kernels(device.index or 0)
        report["kernel_compile_s"], report["kernel_error"] = time.perf_counter() - began, found.error
    report["w8a8_path"] = w8a8_path(device)
    return report


def exact(shapes, device: torch.device) -> dict:
    """Fused kernels == their refs, bit for bit, per shape, dtype and rotation."""
    if w8a8_path(device) != "fused":
        return {"skipped": f"path is {w8a8_path(device)!r}"}
    results = {}
    for m, k, n in shapes:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for block in (0, hadamard_block(k, 128)):
                x = torch.randn(m, k, device=device).to(dtype) * 3
                q, s = quantize_rows_fused(x, block)
                q_ref, s_ref = quantize_rows_ref(x, block)
                acc = torch.randint(-(2**24), 2**24, (m, n), device=device, dtype=torch.int32)
                ws = torch.rand(n, device=device) * 1e-3
                y, y_ref = epilogue_fused(acc, s, ws, None, dtype), epilogue_ref(acc, s[:m], ws, None, dtype)
                same = torch.equal(q[:m, :k], q_ref) and torch.equal(s[:m], s_ref) and torch.equal(y, y_ref)
                results[f"{m}x{k}x{n} {str(dtype)[6:]} block {block}"] = same
    return {"all_equal": all(results.values()), "cases": results}


def linear_variants(m: int, k: int, n: int, device: torch.device) -> tuple[dict, torch.Tensor, QLinear]:
    """``{name: (fn(x) -> y, input dtype)}`` for one shape, the float32 weight, and the w8a8 layer."""
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(n, k, generator=g) * 0.02).to(device)
    lin = torch.nn.Linear(k, n, bias=False).to(device)
    with torch.no_grad():
        lin.weight.copy_(weight)
    w_bf16, w_fp16 = weight.bfloat16(), weight.half()
    int8 = QLinear.from_linear(lin, scheme_from_name("int8"))
    plain, rot = (QLinear.from_linear(lin, scheme_from_name(s)) for s in ("w8a8", "w8a8-rot"))
    fused = w8a8_path(device) == "fused"
    bf16 = torch.bfloat16
    variants = {
        "bf16_linear": (lambda x: F.linear(x, w_bf16), bf16),
        "fp16_linear": (lambda x: F.linear(x, w_fp16), torch.float16),
        "int8_weight_only": (int8, bf16),
        "w8a8_torch": (lambda x: w8a8_linear(x, plain.qweight, plain.scale, None, 0, "torch"), bf16),
        "w8a8_rot_torch": (lambda x: w8a8_linear(x, rot.qweight, rot.scale, None, 128, "torch"), bf16),
    }
    if fused:
        variants["w8a8_fused"] = (lambda x: w8a8_linear(x, plain.qweight, plain.scale, None, 0, "fused"),
                                  bf16)
        variants["w8a8_rot_fused"] = (lambda x: w8a8_linear(x, rot.qweight, rot.scale, None, 128, "fused"),
                                      bf16)
    return variants, weight, plain


def linears(shapes, device: torch.device, args) -> tuple[list, list]:
    rows, profiles = [], []
    with torch.inference_mode():
        for m, k, n in shapes:
            variants, weight, plain = linear_variants(m, k, n, device)
            xs = activations(m, k, device, torch.bfloat16)
            x = xs["gauss"]
            row = {"m": m, "k": k, "n": n, "ms": {}, "sqnr_db": {}, "transient_bytes": {}}
            for name, (fn, dtype) in variants.items():
                x_in = x.to(dtype)
                row["ms"][name] = timed_ms(lambda fn=fn, x_in=x_in: fn(x_in), device, args.warmup, args.reps)
                row["transient_bytes"][name] = transient_bytes(lambda fn=fn, x_in=x_in: fn(x_in), device)
                row["sqnr_db"][name] = {kind: sqnr_db(a.float() @ weight.T, fn(a.to(dtype)).float())
                                        for kind, a in xs.items()}
            row["ms"].update(_pieces(x, plain, device, args))
            if "w8a8_fused" in row["ms"]:
                row["fused_over_int_mm"] = row["ms"]["w8a8_fused"] / row["ms"]["int_mm_only"]
                row["fused_speedup_vs_bf16"] = row["ms"]["bf16_linear"] / row["ms"]["w8a8_fused"]
            target = "w8a8_fused" if "w8a8_fused" in variants else "w8a8_torch"  # the torch ops on a CPU
            if row["ms"][target] >= row["ms"]["bf16_linear"]:
                profiles.append(profile(variants[target][0], x, device, f"{target} {m}x{k}x{n}"))
            rows.append(row)
    return rows, profiles


def _pieces(x: torch.Tensor, plain: QLinear, device: torch.device, args) -> dict:
    """The fused path's parts alone: _int_mm, the quantize kernel (plain, rotated) and the epilogue."""
    q, s = quantize_rows_ref(x, 0)
    pad = torch.zeros(max(q.shape[0], 17), -(-q.shape[1] // 8) * 8, dtype=torch.int8, device=device)
    pad[: q.shape[0], : q.shape[1]] = q
    if device.type != "cuda":
        return {"int_mm_only": None}
    def ms(fn) -> float:
        return timed_ms(fn, device, args.warmup, args.reps)

    out = {"int_mm_only": ms(lambda: _int_mm_padded(pad, plain.qweight))}
    if w8a8_path(device) == "fused":
        acc = _int_mm_padded(pad, plain.qweight)[: x.shape[0]]
        block = hadamard_block(x.shape[1], 128)
        out["quantize_kernel"] = ms(lambda: quantize_rows_fused(x, 0))
        out["quantize_rot_kernel"] = ms(lambda: quantize_rows_fused(x, block))
        out["epilogue_kernel"] = ms(lambda: epilogue_fused(acc, s, plain.scale, None, x.dtype))
    return out


def profile(fn, x: torch.Tensor, device: torch.device, label: str) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(10):
            fn(x)
        _sync(device)
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        rows.append({"name": event.key, "calls": event.count, "device_us_total": device_us,
                     "cpu_us_total": event.cpu_time_total})
    rows.sort(key=lambda r: (r["device_us_total"], r["cpu_us_total"]), reverse=True)
    return {"shape": label, "calls": 10, "top": rows[:15]}


def block_sqnr(device: torch.device, dry: bool) -> dict:
    """One real-width modulated block: bf16, w8a8 and w8a8-rot against float32 (random weights)."""
    from pascaline.models.zimage_dit import VARIANTS, ZImageBlock
    from pascaline.offload.plan import module_tensors

    cfg = VARIANTS["tiny" if dry else "z-image-turbo"]
    tokens = 64 if dry else 4128
    with torch.device("meta"):
        block = ZImageBlock(cfg, modulated=True)
    block.to_empty(device=device)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for owner, name, _, t in module_tensors(block):
            t.copy_(stream_check._random_like(t, name, type(owner).__name__, g, device))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, tokens, cfg.dim, generator=gen).to(device)
    angles = torch.rand(1, tokens, 1, cfg.head_dim // 2, generator=gen) * 6.28
    rope = torch.polar(torch.ones_like(angles), angles).to(device)  # [1, S, 1, Dh/2] complex
    c = torch.randn(1, cfg.adaln_dim, generator=gen).to(device)
    with torch.inference_mode():
        ref = block(x, rope, None, c)
        out = {}
        for scheme in ("bf16", "w8a8", "w8a8-rot"):
            twin = copy.deepcopy(block)
            if scheme != "bf16":
                quantize_(twin, scheme_from_name(scheme))
            out[scheme] = sqnr_db(ref, twin.bfloat16()(x.bfloat16(), rope, None, c.bfloat16()).float())
    return {"tokens": tokens, "sqnr_db": out}


def step(args, device: torch.device) -> dict:
    """Full-depth streamed forwards under the emulated card, per scheme; keep_host re-attach times."""
    from pascaline.offload.plan import plan_for_model
    from pascaline.offload.streamer import BlockStreamer

    stream_args = stream_check.parse_args(["--device", str(device), "--card-gib", str(args.card_gib),
                                           "--iterations", str(args.iterations), "--skip-resident"]
                                          + (["--tiny"] if args.dry_run else []))
    card, budget = stream_check.emulate_card(stream_args, device)
    results = []
    for scheme in args.step_schemes.split(","):
        model = stream_check.build_dit(stream_args, scheme, device)
        scheme_budget = budget if budget is not None else stream_check._cpu_budget(model)
        overrides = [None, "torch"] if scheme == "w8a8" else [None]  # then the same model, unfused ops
        for override in overrides:
            for module in model.modules():
                if isinstance(module, QLinear):
                    module.w8a8_path = override
            result = stream_check.run_streamed(model, stream_args, scheme, device, scheme_budget)
            result["w8a8_ops"] = None if scheme == "bf16" else (override or w8a8_path(device))
            results.append(result)
        activation = 1 << 20 if args.dry_run else int(stream_check.ACTIVATION_GIB[scheme] * stream_check.GIB)
        plan = plan_for_model(model, scheme_budget, activation, 1)
        results[-1]["keep_host"] = _keep_host_times(BlockStreamer(model, plan, device, keep_host=True),
                                                    stream_args, device)
        del model
        stream_check._reset_peaks(device)
    return {"card_bytes": card, "budget_bytes": budget, "results": results}


def _keep_host_times(streamer, stream_args, device: torch.device) -> dict:
    """Seconds of a first and a second attach/detach of a keep_host streamer, and of the release."""
    model = streamer.model
    x, t, caps = stream_check.inputs(stream_args, device)
    times = {}
    for attempt in ("first", "again"):
        began = time.perf_counter()
        streamer.attach_()
        _sync(device)
        times[f"attach_{attempt}_s"] = time.perf_counter() - began
        with torch.inference_mode():
            model(x, t, caps)
        began = time.perf_counter()
        streamer.detach_()
        times[f"detach_{attempt}_s"] = time.perf_counter() - began
        times[f"pinned_bytes_{attempt}"] = streamer.pool.pinned_bytes
    began = time.perf_counter()
    streamer.release_host_()
    times["release_s"] = time.perf_counter() - began
    return times


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    shapes = DRY_SHAPES if args.dry_run else REAL_SHAPES
    report = {"environment": environment(device), "exact": exact(shapes, device)}
    report["linears"], report["profiles"] = linears(shapes, device, args)
    report["block_sqnr"] = block_sqnr(device, args.dry_run)
    if not args.skip_step:
        report["step"] = step(args, device)
    return report


if __name__ == "__main__":
    text = json.dumps(main(sys.argv[1:]), indent=2, default=str)
    print(text)
    out = parse_args(sys.argv[1:]).out
    if out:
        with open(out + ".partial", "w") as f:
            f.write(text)
        os.replace(out + ".partial", out)
