"""GGUF figures for the README: dequantization throughput, load time and peak RSS, per-forward cost, SQNR.

    python scripts/gguf_measure.py dequant          # GB/s of float32 output per GGML type (CPU)
    python scripts/gguf_measure.py sqnr             # int8 requantization of GGUF weights, per type
    python scripts/gguf_measure.py forward          # one real-width linear: GGUF blocks vs int8 vs fp32
    python scripts/gguf_measure.py load             # real-width depth-reduced DiT: bf16 vs Q8_0 vs Q4_K
    python scripts/gguf_measure.py load-one PATH    # (internal) one load in a fresh process

Times are the least CPU time of a few runs on one thread (``process_time``). Needs the ``gguf``
extra (the reference writer and quantizer) and runs on a CPU. The K-quant
quantizers below are simple ones written for these measurements (one pass, no search, unlike
llama.cpp's), checked through ``gguf.quants.dequantize``; pascaline itself never quantizes to GGUF.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pascaline.gguf.dequant import dequantize, dequantize_chunked
from pascaline.gguf.ggml_types import type_named
from pascaline.gguf.module import GGUFLinear
from pascaline.quant.primitives import dequantize_int8_rows, quantize_int8_rows, sqnr_db

TYPES = ("F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K")


def _gguf():
    import gguf

    return gguf


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(*x.shape[:-1], -1)


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """Q4_K blocks of ``w`` [N, K] (K % 256 == 0): one pass of per-32 scale and min, 6-bit packed."""
    x = w.reshape(-1, 8, 32).astype(np.float32)  # superblocks of 8 sub-blocks
    lo = np.minimum(x.min(-1), 0)
    scale = (x.max(-1) - lo) / 15
    d = (scale.max(-1, keepdims=True) / 63).astype(np.float16).astype(np.float32)
    dmin = (-lo.min(-1, keepdims=True) / 63).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / np.where(d > 0, d, 1)), 0, 63).astype(np.uint8)
    mn = np.clip(np.round(-lo / np.where(dmin > 0, dmin, 1)), 0, 63).astype(np.uint8)
    step = (d * sc)[..., None]
    q = np.clip(np.round((x + (dmin * mn)[..., None]) / np.where(step > 0, step, 1)), 0, 15).astype(np.uint8)
    scales = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)], axis=1)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)
    out = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), scales, qs], axis=1)
    return out.reshape(w.shape[0], -1)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """Q6_K blocks of ``w`` [N, K]: per-16 int8 scales under one fp16 scale, 6-bit codes."""
    x = w.reshape(-1, 16, 16).astype(np.float32)
    scale = np.abs(x).max(-1) / 31
    d = (scale.max(-1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / np.where(d > 0, d, 1)), 1, 127).astype(np.int8)
    step = (d * sc)[..., None]
    q = (np.clip(np.round(x / step), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 128)  # halves
    low = q & 0x0F
    ql = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(-1, 128)
    hi = (q >> 4).reshape(-1, 2, 4, 32)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(-1, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), _f16_bytes(d)], axis=1)
    return out.reshape(w.shape[0], -1)


def to_gguf(w: np.ndarray, qtype: str) -> np.ndarray:
    """``w`` in ``qtype`` (Q5_K/Q3_K/Q2_K: random blocks of the same scale, no quantizer here)."""
    gguf = _gguf()
    if qtype == "Q4_K":
        return quantize_q4_k(w)
    if qtype == "Q6_K":
        return quantize_q6_k(w)
    if qtype in ("Q5_K", "Q3_K", "Q2_K"):
        from tests.factories.gguf import random_blocks

        t = type_named(qtype)
        return random_blocks(qtype, w.size // t.block_size, np.random.default_rng(0), 4 * float(w.std()))
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])


def _weight(n: int, k: int, seed: int = 0) -> np.ndarray:
    # Gaussian rows with a spread of row scales, like trained linear layers
    rng = np.random.default_rng(seed)
    rows = np.exp(rng.normal(0, 0.3, (n, 1))).astype(np.float32)
    return (rng.standard_normal((n, k)).astype(np.float32) * 0.02 * rows).astype(np.float32)


def _timed(fn, repeats: int = 5) -> float:
    """Least CPU time of ``repeats`` calls (one thread; on a shared machine wall time mostly
    measures the neighbours' jobs)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def cmd_dequant() -> dict:
    gguf = _gguf()
    w = _weight(10240, 3840)  # the FFN's w1: 39.3 M values
    out = {}
    for qtype in TYPES:
        raw = torch.from_numpy(np.ascontiguousarray(to_gguf(w, qtype)).view(np.uint8))
        t = type_named(qtype)
        ours = _timed(lambda raw=raw, t=t: dequantize(raw, t, w.shape))
        rows = raw.reshape(w.shape[0], -1)
        chunked = _timed(lambda rows=rows, t=t: dequantize_chunked(rows, t, w.shape, torch.float32))
        gq = gguf.GGMLQuantizationType[qtype]
        ref = _timed(lambda raw=raw, gq=gq: gguf.quants.dequantize(raw.numpy(), gq), 1)
        out[qtype] = {"ours_s": round(ours, 4), "ours_GBps_out": round(w.size * 4 / ours / 1e9, 2),
                      "chunked_s": round(chunked, 4), "chunked_Mvalues_per_s": round(w.size / chunked / 1e6),
                      "ours_Mvalues_per_s": round(w.size / ours / 1e6), "gguf_numpy_s": round(ref, 3),
                      "bytes_per_value": round(raw.numel() / w.size, 4)}
    return out


def cmd_sqnr() -> dict:
    gguf = _gguf()
    w = _weight(3840, 3840, seed=1)
    wt = torch.from_numpy(w)
    own_int8 = dequantize_int8_rows(*quantize_int8_rows(wt))
    x = torch.randn(256, 3840)
    out = {"bf16_to_int8_vs_float_dB": round(sqnr_db(wt, own_int8), 2)}
    for qtype in ("Q8_0", "Q6_K", "Q5_0", "Q4_K", "Q4_0"):
        data = to_gguf(w, qtype)
        held = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype])
        g = torch.from_numpy(np.array(held, np.float32))
        assert torch.equal(g, dequantize(torch.from_numpy(np.ascontiguousarray(data).view(np.uint8)),
                                         type_named(qtype), w.shape))
        q, s = quantize_int8_rows(g)
        r = dequantize_int8_rows(q, s)
        from pascaline.kernels.int8_matmul import w8a8_linear

        out[qtype] = {"gguf_vs_float_dB": round(sqnr_db(wt, g), 2),
                      "int8_vs_gguf_dB": round(sqnr_db(g, r), 2),
                      "int8_vs_float_dB": round(sqnr_db(wt, r), 2),
                      "w8a8_output_vs_gguf_output_dB": round(sqnr_db(x @ g.T, w8a8_linear(x, q, s, None)), 2)}
    return out


def cmd_forward(tokens: int = 1024) -> dict:
    from pascaline.quant import Int8Dynamic, Int8WeightOnly, QLinear

    torch.manual_seed(0)
    w = _weight(10240, 3840)
    x = torch.randn(tokens, 3840)
    dense = torch.nn.Linear(3840, 10240, bias=False)
    dense.weight.data = torch.from_numpy(w)
    layers = {"fp32 nn.Linear": dense,
              "int8 weight-only QLinear": QLinear.from_linear(dense, Int8WeightOnly()),
              "w8a8 QLinear (CPU exact-f32 int8 path)": QLinear.from_linear(dense, Int8Dynamic())}
    for qtype in ("Q8_0", "Q4_K"):
        layer = GGUFLinear(3840, 10240, type_named(qtype), bias=False)
        layer.qweight = torch.from_numpy(np.ascontiguousarray(to_gguf(w, qtype))).reshape(10240, -1)
        layers[f"GGUFLinear {qtype}"] = layer
    out = {"tokens": tokens, "threads": torch.get_num_threads()}
    with torch.no_grad():
        for name, layer in layers.items():
            out[name] = round(_timed(lambda layer=layer: layer(x), 3), 3)
            if isinstance(layer, GGUFLinear | QLinear):
                weight = _timed(lambda layer=layer: layer.dequantize(torch.float32), 3)
                out[name + ": weight only"] = round(weight, 3)
    return out


def _write_files(root: Path) -> dict[str, Path]:
    from tests.factories.dit import diffusers_to_comfy, make_real_width_diffusers_dit, save_comfy_dit
    from tests.factories.gguf import write_gguf

    model = make_real_width_diffusers_dit()
    bf16 = save_comfy_dit(model, root / "dit_bf16.safetensors", prefix=False, stray_norm_final=False)
    files = {"bf16": bf16}
    comfy = diffusers_to_comfy(model.state_dict())
    del model
    for qtype in ("Q8_0", "Q4_K"):  # sd.cpp's form: every block tensor quantized (x/t embedders, final F16)
        tensors = {}
        for name, t in comfy.items():
            keep = name.startswith(("x_embedder.", "t_embedder.", "final_layer.")) or t.ndim == 1
            tensors[name] = (t.float().numpy(), ("F32" if t.ndim == 1 else "F16") if keep else qtype)
        path = files[qtype] = root / f"dit_{qtype}.gguf"
        if qtype == "Q4_K":  # our one-pass quantizer (write_gguf would write random K blocks)
            _write_q4k(path, tensors)
        else:
            write_gguf(path, tensors, arch="lumina2")
    return files


def _write_q4k(path: Path, tensors: dict) -> None:
    gguf = _gguf()
    writer = gguf.GGUFWriter(str(path), "lumina2")
    for name, (v, qtype) in tensors.items():
        gq = gguf.GGMLQuantizationType[qtype]
        data = quantize_q4_k(v) if qtype == "Q4_K" else gguf.quants.quantize(v, gq)
        writer.add_tensor(name, data, raw_dtype=gq)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _peak_rss() -> int:
    """This process's peak RSS: VmHWM (ru_maxrss would include the parent's, kept across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cmd_load_one(path: str, dtype: str, quant: str) -> dict:
    from pascaline.formats.zimage_dit import load_dit

    before = _peak_rss()
    t0, c0 = time.perf_counter(), time.process_time()
    model = load_dit(path, dtype=getattr(torch, dtype), quant=None if quant == "none" else quant)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    loaded = _peak_rss()
    t0 = time.perf_counter()
    tensors = list(model.state_dict().values())
    for t in tensors:  # one byte of every 4 KiB page, as the first forward reads them: mapped pages come in
        t.reshape(-1).view(torch.uint8)[::4096].sum()
    touch = time.perf_counter() - t0
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    return {"load_wall_s": round(wall, 2), "load_cpu_s": round(cpu, 2),
            "rss_before_GB": round(before / 1e9, 2),
            "peak_rss_loaded_GB": round(loaded / 1e9, 2), "first_read_s": round(touch, 2),
            "peak_rss_after_read_GB": round(_peak_rss() / 1e9, 2), "model_GB": round(nbytes / 1e9, 3)}


def cmd_load() -> dict:
    out = {}
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        files = _write_files(Path(tmp))
        for name, path in files.items():
            for dtype, quant in (("bfloat16", "none"), ("float32", "none"), ("float32", "w8a8")):
                run = subprocess.check_output([sys.executable, __file__, "load-one", str(path), dtype, quant])
                key = f"{name} -> {dtype}, quant {quant}"
                out[key] = {"file_GB": round(path.stat().st_size / 1e9, 3), **json.loads(run)}
    return out


def main() -> None:
    torch.set_num_threads(1)
    cmd = sys.argv[1] if len(sys.argv) > 1 else "dequant"
    if cmd == "load-one":
        print(json.dumps(cmd_load_one(sys.argv[2], sys.argv[3], sys.argv[4])))
        return
    result = {"dequant": cmd_dequant, "sqnr": cmd_sqnr, "forward": cmd_forward, "load": cmd_load}[cmd]()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' factories
    main()
