"""The bench report: one JSON-ready dict (schema below) and the table printed from it.

Schema (every key always present; a figure that does not apply is ``null``)::

    pascaline_version, torch,
    device {name, capability, total_vram_bytes},
    config {model, model_label, family, batch, depth_measured, resolution, caption_tokens,
            iterations, warmup, full_depth, stage_resolution, dim, synthetic},
    results [ {strategy, compute_dtype, quant, s_per_it {median, min, max},
               s_per_it_full_depth, full_depth_label, peak_vram_bytes, peak_vram_kind,
               peak_rss_bytes, budget_bytes, h2d_bytes_per_it, h2d_gbps, overlap} ],
    baseline {diffusers: {<strategy>: {...same fields...}} | null, ratio: {<our strategy>: x},
              version, max_abs_diff, note},
    stages [ {name, seconds, peak_vram_bytes, peak_rss_bytes, freed} ],
    projection [ {gpu, strategy, s_per_it, bound, ..., model, batch, cond_tokens} ]

``model`` is the variant benchmarked (``z-image-turbo``, ``sd3.5-large``...), ``family`` its
family; ``depth_measured`` and ``full_depth`` count the blocks per group that the family's
bench kit times apart (Z-Image: layers, noise_refiner, context_refiner; SD3: joint, last
and, for SD3.5 Medium, dual). ``batch`` is the samples of one iteration: one sampler step,
2 for a CFG step run as one batch (SD3), 1 otherwise; ``caption_tokens`` the conditioning
length (SD3: context tokens).

``s_per_it_full_depth`` is extrapolated from per-block times when the measured depth is
reduced (``full_depth_label`` says "extrapolated" or "measured"). ``peak_vram_kind`` is
"measured" on CUDA (torch allocator peak) and "own-accounted" on the CPU (the bytes our
code placed on the compute device). ``overlap`` is the share of copy time hidden under
compute (CUDA only). Projections are a model: every entry is labelled "projected".
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from pascaline.runtime.device import dtype_name

GIB = 1 << 30


def build_report(
    *,
    version: str,
    torch_version: str,
    device: dict,
    config: dict,
    results: list[dict],
    baseline: dict,
    stages: list[dict],
    projection: list[dict],
) -> dict:
    """The report dict, with the keys in schema order."""
    return {
        "pascaline_version": version,
        "torch": torch_version,
        "device": device,
        "config": config,
        "results": results,
        "baseline": baseline,
        "stages": stages,
        "projection": projection,
    }


def write_json(report: dict, path: str | Path) -> Path:
    """Write ``report`` to ``path`` atomically (temporary file, then rename)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _rows(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]


def _result_row(label: str, r: dict, h2d: str, overlap: str, vs: str) -> list[str]:
    s = r["s_per_it"]
    return [
        label, dtype_name(r["compute_dtype"]), _s(s["median"]), _s(s["min"]),
        _s(s["max"]), _s(r["s_per_it_full_depth"]), _gib(r["peak_vram_bytes"]), _gib(r["peak_rss_bytes"]),
        h2d, overlap, vs,
    ]  # fmt: skip


def _results_table(report: dict) -> list[str]:
    ratio = report["baseline"]["ratio"]
    header = [
        "strategy",
        "dtype",
        "median s/it",
        "min",
        "max",
        "full depth s/it",
        "peak VRAM GiB",
        "peak RSS GiB",
        "H2D GiB/it",
        "overlap",
        "vs diffusers",
    ]
    rows = []
    for r in report["results"]:
        overlap = "-" if r["overlap"] is None else f"{100 * r['overlap']:.0f}%"
        vs = "-" if ratio.get(r["strategy"]) is None else f"{ratio[r['strategy']]:.2f}x"
        rows.append(_result_row(r["strategy"], r, _gib(r["h2d_bytes_per_it"]), overlap, vs))
    for name, r in (report["baseline"]["diffusers"] or {}).items():
        rows.append(_result_row(f"diffusers {name}", r, "-", "-", "1.00x"))
    return _rows(header, rows)


def _model_line(cfg: dict) -> str:
    from pascaline.bench.kits import get_kit

    kit, res = get_kit(cfg["family"]), cfg["resolution"]
    label = f"{cfg['model_label']} {kit.model_label}"
    batch = f"batch {cfg['batch']} (one CFG step), " if cfg["batch"] > 1 else ""
    return (f"{label}: {kit.describe_blocks(cfg['depth_measured'], cfg['full_depth'])}, width {cfg['dim']}, "
            f"{res}x{res}, {batch}{cfg['caption_tokens']} {kit.cond_name} tokens, "
            f"{cfg['warmup']} warm-up + {cfg['iterations']} timed iterations"
            + ("" if cfg["synthetic"] else " (real weights)"))  # fmt: skip


def format_table(report: dict) -> str:
    """The human-readable report: measured results, baseline, stages, projections."""
    cfg, dev = report["config"], report["device"]
    lines = [
        f"pascaline {report['pascaline_version']} bench | torch {report['torch']} | {dev['name']}"
        + (
            f" (sm_{dev['capability'].replace('.', '')}, {_gib(dev['total_vram_bytes'])} GiB)"
            if dev["capability"]
            else ""
        ),
        _model_line(cfg),
        "",
    ]
    lines += _results_table(report)
    if cfg["batch"] > 1:
        lines.append(f"s/it: one CFG step, the positive and negative prompts as one batch of {cfg['batch']} "
                     "(what the pipeline runs when it fits)")
    lines.append(
        "full depth s/it: extrapolated from per-block times of the measured blocks"
        if report["results"] and report["results"][0]["full_depth_label"] == "extrapolated"
        else ""
    )
    if report["results"] and report["results"][0]["peak_vram_kind"] == "own-accounted":
        lines.append("peak VRAM on the CPU: the bytes our code placed on the compute device (own accounting)")
    if report["baseline"]["note"]:
        lines.append(f"baseline: {report['baseline']['note']}")
    if report["stages"]:
        what = "synthetic pipeline, one pass each" if cfg["synthetic"] else "the timed image, real weights"
        lines += ["", f"stages ({what}):"]
        lines += _rows(
            ["stage", "seconds", "peak VRAM GiB", "peak RSS GiB", "freed"],
            [
                [
                    s["name"],
                    _s(s["seconds"]),
                    _gib(s["peak_vram_bytes"]),
                    _gib(s["peak_rss_bytes"]),
                    "yes" if s["freed"] else "NO",
                ]
                for s in report["stages"]
            ],
        )
    if report["projection"]:
        first = report["projection"][0]
        res, batch = first["resolution"], first["batch"]
        step = f", batch {batch} (one CFG step)" if batch > 1 else ""
        lines += [
            "",
            f"PROJECTED full-depth s/it at {res}x{res}{step}, {first['cond_tokens']} text tokens (roofline "
            "at published peak rates: a model, not a measurement):",
        ]
        lines += _rows(
            ["gpu", "strategy", "dtype", "projected s/it", "bound"],
            [
                [
                    p["gpu"],
                    p["strategy"],
                    p["compute_dtype"],
                    "does not fit" if p["s_per_it"] is None else _s(p["s_per_it"]),
                    p["bound"] or "-",
                ]
                for p in report["projection"]
            ],
        )
    return "\n".join(lines)
