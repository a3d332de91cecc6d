"""The `pascaline` command: generate | models | bench | quantize | info | serve | batch | sweep.

This is the only module that reads argv or environment variables. A user mistake
(any ``PascalineError``) prints one sentence and exits with code 2; a bug keeps its
traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import warnings
from contextlib import contextmanager

from pascaline.errors import PascalineError, PascalineWarning

# --- info ----------------------------------------------------------------------------------

INFO_SIZE = 1024  # the image side of the placement line: Z-Image Turbo's native resolution


def _add_info(sub) -> None:
    p = sub.add_parser(
        "info",
        help="show versions, the GPU and what pascaline would do on it",
        description="Show versions, the device's capabilities and quirks, the policies pascaline "
        f"applies there (compute dtypes, default quantization, attention, VRAM budget) and, on a CUDA "
        f"card, how the DiT is placed at {INFO_SIZE}x{INFO_SIZE} under the default budget. "
        "With --models, the files generate would use from a folder and the placement of that DiT. "
        "No weights are read.",
    )
    p.add_argument("--model", metavar="NAME", help=f"the placement of this model only ({_variants_help()})")
    p.add_argument("--models", metavar="DIR", help="also the files generate would use from DIR (a ComfyUI "
                   "models/ folder or a diffusers snapshot): storage (a GGUF's type), size, RAM, placement")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    where.add_argument(
        "--card",
        metavar="NAME",
        help="a card this machine need not have: gtx1070, gtx1080, gtx1660, gtx1660ti, rtx2060, "
        "rtx2070, t4, rtx3060, h100 or cpu (kernels are checked against the installed torch)",
    )
    p.set_defaults(func=_cmd_info)


def _cmd_info(args: argparse.Namespace) -> int:
    import platform

    import torch

    import pascaline
    from pascaline.runtime.device import DeviceCaps

    # a preset is checked first, so a misspelt name fails before anything is printed
    caps = _preset_caps(args.card) if args.card else None
    print(f"pascaline {pascaline.__version__}")
    print(f"python    {platform.python_version()} ({platform.system()} {platform.machine()})")
    print(f"torch     {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i}    {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB")
    else:
        print("cuda      not available (CPU only)")
    caps = caps or DeviceCaps.probe(args.device)
    print()
    models = [] if args.models else _info_models(args.model)
    for line in (*_caps_lines(caps, preset=bool(args.card)), *_policy_lines(caps, models)):
        print(line)
    if args.models:
        for line in _folder_lines(caps, args.models, args.model):
            print(line)
    return 0


def _variants_help() -> str:
    from pascaline.families import variant_names

    return ", ".join(variant_names())


def _info_models(name: str | None) -> list[str]:
    """The variants whose placement ``info`` prints: the one asked for, else every one."""
    from pascaline.families import resolve_variant, variant_names

    if name is None:
        return list(variant_names())
    resolve_variant(name)  # an unknown name is one sentence
    return [name]


def _preset_caps(name: str):
    """A preset card, with ``torch_has_kernels`` answered for the installed torch when it can be."""
    from dataclasses import replace

    from pascaline.runtime.device import DeviceCaps, arch_supported

    platform = DeviceCaps.probe("cpu").platform  # this machine's: the budget headroom depends on it
    caps = DeviceCaps.preset(name, platform=platform)
    arch_list = _torch_arch_list()
    if not caps.is_cuda or arch_list is None:
        return caps
    return replace(caps, torch_has_kernels=arch_supported(caps.capability, arch_list))


def _torch_arch_list() -> list[str] | None:
    """The CUDA archs the installed torch was built for; None when it cannot be told."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_arch_list()
    if torch.version.cuda is None:
        return []  # a CPU-only build has kernels for no card
    # get_arch_list() answers [] whenever no GPU is visible, even on a CUDA build
    flags = getattr(torch._C, "_cuda_getArchFlags", None)
    return flags().split() if flags is not None else None


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _caps_lines(caps, preset: bool) -> list[str]:
    from pascaline.errors import DeviceError
    from pascaline.runtime.device import check_torch_supports, format_bytes

    if not caps.is_cuda:
        return [f"device    {caps.name} (CPU), {format_bytes(caps.total_vram_bytes)} RAM"]
    lines = [
        f"device    {caps.name}{' (preset)' if preset else ''}: {caps.sm}, "
        f"{format_bytes(caps.total_vram_bytes)} VRAM, {caps.platform}",
        f"          int8 path {caps.int8_path}, native bf16 {_yes(caps.native_bf16)}, "
        f"fp16 tensor cores {_yes(caps.fp16_tensor_cores)}, "
        f"installed torch has kernels {_yes(caps.torch_has_kernels)}",
    ]
    try:
        check_torch_supports(caps)
    except DeviceError as exc:
        lines.append(f"          {exc}")
    quirks = [f"{q.key}: {q.reason}" for q in caps.quirks] or ["none"]
    return [*lines, f"quirks    {quirks[0]}", *(f"          {q}" for q in quirks[1:])]


def _policy_lines(caps, models: list[str]) -> list[str]:
    from pascaline.runtime.device import (
        attention_backend,
        compute_dtype,
        default_budget,
        default_quant,
        dtype_name,
        format_bytes,
    )

    dtypes = {c: dtype_name(compute_dtype(caps, c)) for c in ("dit", "encoder", "vae")}
    quant, budget = default_quant(caps), default_budget(caps)
    if budget is None:
        budget_text = "none (no VRAM limit on the CPU)"
    else:
        headroom = caps.total_vram_bytes - budget
        budget_text = (
            f"{format_bytes(budget)} ({format_bytes(caps.total_vram_bytes)} minus "
            f"{format_bytes(headroom)} for the desktop and the CUDA context)"
        )
    lines = [
        f"compute   DiT {dtypes['dit']}, text encoder {dtypes['encoder']}, VAE {dtypes['vae']}",
        f"quant     {quant or 'none'} (what --quant auto picks)",
        f"attention {attention_backend(caps)}",
        f"budget    {budget_text}",
    ]
    if caps.is_cuda:
        lines += [_dit_placement(compute_dtype(caps, "dit"), quant, budget, m) for m in models]
    return lines


def _dit_placement(dtype, quant: str | None, budget: int, model: str) -> str:
    """How ``generate`` places ``model``'s published diffusion model at INFO_SIZE² under ``budget``,
    planned on ``meta`` with the conditioning length of a typical prompt; with the variant's
    default guidance, the two branches as one batch of 2 when the pipeline would do so."""
    from pascaline.families import resolve_variant
    from pascaline.runtime.device import format_bytes
    from pascaline.runtime.memory import plan_dit

    family, variant = resolve_variant(model)
    cfg, tokens = variant.dit_config, family.typical_cond_tokens(variant.dit_config)
    head = f"{model}: DiT at {INFO_SIZE}x{INFO_SIZE} ({quant or 'unquantized'}) under {format_bytes(budget)}"

    def plan_of(batch: int):  # the pipeline's own build, estimate (W8A8/dequant workspace included), planner
        return plan_dit(family, cfg, dtype, quant, INFO_SIZE, INFO_SIZE, tokens, budget, batch=batch)

    return _placement_line(head, plan_of, variant.defaults.cfg != 1.0 and family.cfg_batching)


def _host_ram_line(family, needs: dict[str, int]) -> str:
    """Host RAM the models take: one at a time (reloaded per image) and all kept loaded, and
    without each optional component (SD3's T5)."""
    from pascaline.runtime.device import format_bytes

    line = (f"host RAM  {format_bytes(max(needs.values()))} with one model loaded at a time, "
            f"{format_bytes(sum(needs.values()))} with all kept loaded")  # fmt: skip
    for c in family.components:
        if c.optional and c.role in needs:
            rest = {r: n for r, n in needs.items() if r != c.role}
            line += (f"; without the {c.role}: {format_bytes(max(rest.values()))} and "
                     f"{format_bytes(sum(rest.values()))}")  # fmt: skip
    return line


def _placement_line(head: str, plan_of, guided: bool) -> str:
    """``head: N of M blocks resident...`` from ``plan_of(batch)``; ``guided``: whether the two
    guidance branches may run as one batch of 2 (then the plan the pipeline would pick)."""
    from pascaline.errors import BudgetError
    from pascaline.runtime.device import format_bytes
    from pascaline.runtime.memory import cfg_batch_pays

    try:
        plan = plan_of(1)
    except BudgetError as exc:
        return f"{head}: does not fit. {exc}"
    guidance = ""
    if guided:
        try:
            two = plan_of(2)
        except BudgetError:
            two = None
        if cfg_batch_pays(plan, two):
            plan, guidance = two, ", guidance as a batch of 2"
        else:
            guidance = ", guidance one branch at a time"
    slots = f", {plan.slots} slots of {format_bytes(plan.slot_bytes)}" if plan.streamed else ""
    return (
        f"{head}: {len(plan.resident)} of {len(plan.units)} blocks resident, {len(plan.streamed)} "
        f"streamed{slots}, expected peak {format_bytes(plan.expected_peak_bytes)}{guidance}"
    )


def _folder_lines(caps, folder: str, name: str | None) -> list[str]:
    """What ``generate`` would run from ``folder`` on ``caps`` under ``--quant auto``: each file with
    its storage (a GGUF's type), size and the host RAM its model takes loaded, and on a CUDA card
    the placement of that diffusion model at INFO_SIZE², planned from the file (no weights read)."""
    from pascaline.families import resolve_variant
    from pascaline.runtime.device import default_budget, default_quant, format_bytes
    from pascaline.runtime.discovery import find_model_files
    from pascaline.runtime.inventory import used_rows
    from pascaline.runtime.pipeline import Pipeline, stage_dtypes

    family = resolve_variant(name)[0] if name else None
    quant = default_quant(caps)
    files = find_model_files(folder, family=family, quant=quant)
    pipe = Pipeline(files, caps, budget_bytes=default_budget(caps), quant=quant, quant_is_auto=True,
                    dtypes=stage_dtypes(caps, None), keep_loaded=False)  # fmt: skip
    cfg = pipe.dit_config()
    variant = resolve_variant(name)[1] if name else files.family.variant(files.family.guess_variant(cfg))
    pipe.variant = variant
    lines = [f"models    {folder}: {files.family.label}, runs as --model {variant.name}"]
    needs = pipe.host_needs()
    for role, row in used_rows(files).items():
        size, ram = format_bytes(row.nbytes), format_bytes(needs[role])
        lines.append(f"          {role:<13} {row.path.name}: {row.storage}, {size} on disk, {ram} in RAM")
    lines.append(_host_ram_line(files.family, needs))
    encoders = {r: needs[r] for r in files.family.encoder_roles if r in needs}
    if caps.is_cuda and encoders and pipe.budget_bytes is not None:
        largest = max(encoders, key=encoders.get)
        how = "whole" if encoders[largest] < pipe.budget_bytes else "with its layers streamed"
        lines.append(f"          encoders run one at a time; the largest, {largest} "
                     f"({format_bytes(encoders[largest])}), on the card {how}")  # fmt: skip
    if caps.is_cuda:
        tokens = files.family.typical_cond_tokens(cfg)
        head = (f"{variant.name}: DiT at {INFO_SIZE}x{INFO_SIZE} ({pipe.quant_label}) under "
                f"{format_bytes(pipe.budget_bytes)}")  # fmt: skip
        lines.append(_placement_line(head, lambda batch: pipe.plan_dit(INFO_SIZE, INFO_SIZE, tokens, batch),
                                     variant.defaults.cfg != 1.0 and files.family.cfg_batching))  # fmt: skip
    return lines


# --- generate ------------------------------------------------------------------------------

_PHASES = {
    "load": "loading models",
    "encode": "encoding prompt",
    "enhance": "enhancing prompt",
    "steps": "sampling",
    "decode": "decoding",
    "quantize": "quantizing",
}


def _component_flags() -> dict[str, str]:
    """``{role: help}`` of every component role beside the diffusion model, across the families."""
    from pascaline.families import all_families

    labels: dict[str, list[str]] = {}
    for family in all_families():
        for c in family.components:
            if c.stage != "dit":
                labels.setdefault(c.role, []).append(c.label)
    return {role: " or ".join(dict.fromkeys(names)) for role, names in labels.items()}


def _optional_roles() -> dict[str, str]:
    from pascaline.families import all_families

    return {c.role: f"{f.label}: run without the {c.label}" for f in all_families() for c in f.components
            if c.optional}  # fmt: skip


def add_model_arguments(p, *, device_help: str = "auto, cpu, cuda or cuda:N (default auto)") -> None:
    """The options that pick and load the model, shared by generate, serve, batch and sweep."""
    p.add_argument("--models", metavar="DIR", help="a ComfyUI models/ folder or a diffusers snapshot")
    p.add_argument("--model", metavar="NAME", help=f"which model and its defaults: {_variants_help()} "
                   "(default: the one family the folder holds)")
    p.add_argument("--dit", metavar="PATH", help="the diffusion model file or folder (a fine-tune, say), "
                   "instead of the one in DIR")
    for role, label in _component_flags().items():
        p.add_argument(f"--{role.replace('_', '-')}", metavar="PATH", dest=f"component_{role}",
                       help=f"the {label} file or folder, instead of the one in DIR")
    for role, text in _optional_roles().items():
        p.add_argument(f"--no-{role.replace('_', '-')}", action="append_const", const=role, dest="without",
                       help=text)
    p.set_defaults(without=None)
    p.add_argument("--tokenizer", metavar="DIR", help="a tokenizer folder (default: found offline)")
    p.add_argument("--quant", default="auto",
                   help="auto (default), none, int8, w8a8, w8a8-rot, fp8-e4m3, fp8-e5m2")
    p.add_argument("--vram-budget", default="auto", metavar="SIZE", help="such as 7GiB (default auto)")
    p.add_argument("--device", default="auto", help=device_help)


def component_paths(args: argparse.Namespace) -> dict[str, str]:
    """``{role: path}`` of the component files given one by one (``--text-encoder``, ``--vae``...)."""
    return {k.removeprefix("component_"): v for k, v in vars(args).items()
            if k.startswith("component_") and v is not None}  # fmt: skip


def model_settings(args: argparse.Namespace) -> dict:
    """``load_pipeline``'s keywords from the options ``add_model_arguments`` added."""
    return dict(models=args.models, model=args.model, dit=args.dit,
                components=component_paths(args), without=tuple(args.without or ()),
                tokenizer=args.tokenizer, device=args.device, vram_budget=args.vram_budget,
                quant=args.quant)  # fmt: skip


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="make images from a prompt",
        description="Make images from a prompt and write them as PNG files that carry their settings. "
        "Options left out take the model's defaults (pascaline models DIR shows them).",
    )
    p.add_argument("prompt", help="what the image shows")
    add_model_arguments(p)
    p.add_argument("--out", default="out.png", metavar="FILE.png", help="output file (default: out.png)")
    p.add_argument("--count", type=int, default=1, help="images to make, seeds SEED..SEED+N-1 (default 1)")
    add_image_options(p)
    add_lora_option(p)
    p.add_argument("--enhance", action="store_true", help="expand the prompt first with the text "
                   "encoder's own language model (Z-Image's Qwen3-4B); printed, and kept in the PNG")
    p.add_argument("--enhance-seed", type=int, metavar="N", help="sample the expansion with this seed "
                   "(default: greedy, the same words every time)")
    p.set_defaults(func=_cmd_generate)


def add_lora_option(p, *, more: str = "") -> None:
    """``--lora FILE[:STRENGTH]`` (generate's and sweep's): fixed LoRAs, merged as the weights load."""
    p.add_argument("--lora", action="append", metavar="FILE[:STRENGTH]", help="apply a LoRA (repeatable; "
                   f"strength default 1), merged into the weights as they load{more}")


def add_image_options(p, *, seed_default: str = "random, printed") -> None:
    """The settings of an image (generate's and sweep's): size, sampling, guidance, img2img."""
    p.add_argument("--width", type=int, help="width in pixels, a multiple of 16 (default: the model's)")
    p.add_argument("--height", type=int, help="height in pixels, a multiple of 16 (default: the model's)")
    p.add_argument("--aspect", metavar="W:H", help="aspect ratio such as 3:2, instead of --width/--height")
    p.add_argument("--megapixels", type=float, metavar="MP", help="image area with --aspect (default 1.0)")
    p.add_argument("--steps", type=int, help="sampler steps (default: the model's, e.g. 8 for Z-Image Turbo)")
    p.add_argument("--seed", type=int, help=f"seed of the starting noise (default: {seed_default})")
    p.add_argument("--sampler", help="res_multistep, euler or dpmpp_2m (default: the model's)")
    p.add_argument("--scheduler", help="linear (diffusers' sigmas), simple, or for SD3 also normal and "
                   "sgm_uniform (ComfyUI's) (default: the model's)")
    p.add_argument("--shift", type=float, help="time shift of the schedule (default: the model's, 3.0)")
    p.add_argument("--cfg", type=float, help="guidance scale as in ComfyUI, 1 = off (default: the model's)")
    p.add_argument("--negative", metavar="TEXT", help="negative prompt (used only when --cfg is not 1)")
    p.add_argument("--zero-negative", action="store_const", const="zero", dest="negative_mode",
                   help="without --negative, guide against the zeroed prompt (ComfyUI's ConditioningZeroOut) "
                   "instead of the model's default")
    p.add_argument("--slg-layers", metavar="LIST", help="SD3.5 skip-layer guidance: blocks, e.g. 7,8,9")
    p.add_argument("--slg-scale", type=float, help="skip-layer guidance scale (0 = off)")
    p.add_argument("--slg-start", type=float, help="skip-layer guidance starts at this share of the schedule")
    p.add_argument("--slg-end", type=float, help="skip-layer guidance ends at this share of the schedule")
    p.add_argument("--blind-start", type=int, default=0, metavar="K", help="first K steps unconditioned")
    p.add_argument("--init-image", metavar="FILE", help="start from this image (img2img, with --denoise)")
    p.add_argument("--denoise", type=float, default=1.0, help="share of the schedule to run (default 1)")
    p.add_argument("--rounding", default="comfyui", help="8-bit pixels: comfyui (default) or round")


class _ProgressBars:
    """tqdm bars per phase on a terminal; silent when stderr is not one."""

    def __init__(self):
        self.enabled = sys.stderr.isatty()
        self.bars: dict = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self.bars.get(phase)
        if bar is None:
            if phase.startswith("load:"):  # one component's file, in bytes read
                label = f"loading {phase.removeprefix('load:').replace('_', ' ')}"
                bar = tqdm(total=total, desc=label, leave=False, file=sys.stderr, unit="B", unit_scale=True)
            else:
                bar = tqdm(total=total, desc=_PHASES.get(phase, phase), leave=False, file=sys.stderr)
            self.bars[phase] = bar
        bar.update(done - bar.n)
        if done >= total:
            self.bars.pop(phase).close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def _summary(reports, seconds: float, memory) -> str:
    """The closing line; ``memory`` is the command's ``HostMemoryPeak``: RAM is the real
    (anonymous) figure, RSS adds the pages of the weight files mapped while they were read."""
    from pascaline.errors import plural
    from pascaline.runtime.device import format_bytes

    steps = sum(r.steps for r in reports)
    s_per_it = sum(r.sampling_seconds for r in reports) / max(steps, 1)
    vram = [r.peak_vram_bytes for r in reports if r.peak_vram_bytes is not None]
    ram = "peak RAM n/a"
    if memory.peak_rss_bytes:
        ram = (f"peak RAM {format_bytes(memory.peak_real_bytes)} "
               f"(RSS with mapped files {format_bytes(memory.peak_rss_bytes)})")  # fmt: skip
    return (
        f"{plural(len(reports), 'image')}, {plural(steps, 'step')}: {s_per_it:.2f} s/it, "
        f"total {seconds:.1f} s, peak VRAM {format_bytes(max(vram)) if vram else 'n/a (CPU)'}, {ram}"
    )


def _slg_layers(text: str | None) -> tuple[int, ...] | None:
    from pascaline.errors import InvalidArgumentError

    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InvalidArgumentError(f"--slg-layers takes block numbers such as 7,8,9, not {text!r}.") from None


def _options_from_args(args: argparse.Namespace):
    from pascaline.formats.tokenizer import clean_prompt
    from pascaline.runtime.images import check_init_image
    from pascaline.runtime.pipeline import GenerateOptions
    from pascaline.runtime.sizing import resolve_size

    if args.init_image is not None:
        check_init_image(args.init_image)
    prompt = clean_prompt(args.prompt)
    negative = None if args.negative is None else clean_prompt(args.negative, "the negative prompt")
    sized = any(v is not None for v in (args.width, args.height, args.aspect, args.megapixels))
    size = (args.width, args.height, args.aspect, args.megapixels)
    width, height = resolve_size(*size) if sized else (None, None)
    return GenerateOptions(
        prompt, negative, width, height, args.steps, args.seed, args.sampler, args.scheduler,
        args.shift, args.cfg, args.blind_start, args.init_image, args.denoise,
        negative_mode=args.negative_mode, slg_layers=_slg_layers(args.slg_layers), slg_scale=args.slg_scale,
        slg_start=args.slg_start, slg_end=args.slg_end, rounding=args.rounding, enhance=args.enhance,
        enhance_seed=args.enhance_seed,
    ).with_seed()  # fmt: skip


def _cmd_generate(args: argparse.Namespace) -> int:
    import time

    from pascaline.offload.ledger import HostMemoryPeak
    from pascaline.runtime.images import output_paths, save_png
    from pascaline.runtime.pipeline import load_pipeline

    start = time.perf_counter()
    # Every option is checked before any weights are read.
    paths = output_paths(args.out, args.count)
    options = _options_from_args(args)
    options.with_seed(options.seed + args.count - 1)  # the last seed must be in range too
    bars = _ProgressBars()
    memory = HostMemoryPeak(interval=0.02).__enter__()
    try:
        pipe = load_pipeline(**model_settings(args), progress=bars, loras=args.lora or ())
        for note in pipe.notes:
            print(f"pascaline: {note}", file=sys.stderr)
        options = pipe.resolve(options)  # the model's defaults, checked before any image is made
        reports = []
        for i, path in enumerate(paths):
            image_options = options.with_seed(options.seed + i) if i else options
            image = pipe.run(image_options)
            meta = pipe.metadata(image_options)
            if options.enhance and i == 0:
                print(f"enhanced prompt: {meta['prompt']}", flush=True)
            save_png(image, path, meta)
            reports.append(pipe.last_report)
            bars.close()
            print(f"{path}  seed {image_options.seed}  {options.width}x{options.height}", flush=True)
    finally:
        bars.close()
        memory.__exit__()
    print(_summary(reports, time.perf_counter() - start, memory))
    return 0


# --- models ----------------------------------------------------------------------------------


def _add_models(sub) -> None:
    p = sub.add_parser(
        "models",
        help="list the models a folder holds and what pascaline would run from it",
        description="List every component pascaline recognises in a ComfyUI models/ folder or a diffusers "
        "snapshot (family, kind, storage dtype, size; a bundled checkpoint shows each part), then, per "
        "model family, the files generate would use and the model's default settings. Reads headers only.",
    )
    p.add_argument("folder", metavar="DIR", help="a ComfyUI models/ folder or a diffusers snapshot")
    p.set_defaults(func=_cmd_models)


def _cmd_models(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pascaline.families import resolve_variant
    from pascaline.formats.detect import KIND_NAMES
    from pascaline.runtime.device import format_bytes
    from pascaline.runtime.inventory import inventory, runnable

    root = Path(args.folder).expanduser()
    rows, skipped = inventory(root)
    width = max((len(str(r.path.relative_to(root))) for r in rows), default=4)
    kind_width = max((len(KIND_NAMES[r.kind]) for r in rows), default=9)
    head = f"{'file':<{width}}  {'family':<20} {'component':<{kind_width}} {'storage':<14} {'size':>10}"
    print(f"{head}  variant")
    for r in rows:
        family = " / ".join(r.families) or "(not run)"
        name = str(r.path.relative_to(root))
        print(f"{name:<{width}}  {family:<20} {KIND_NAMES[r.kind]:<{kind_width}} {r.storage:<14} "
              f"{format_bytes(r.nbytes):>10}  {r.variant or ''}")
    if skipped:
        print(f"not recognised: {', '.join(skipped)}")
    print()
    for label, variant, found in runnable(root):
        if isinstance(found, str):
            print(f"{label}: cannot run: {found}")
            continue
        d = resolve_variant(variant)[1].defaults
        print(f"{label}: runs as --model {variant} ({d.steps} steps, cfg {d.cfg}, {d.sampler}/{d.scheduler}, "
              f"shift {d.shift}, {d.width}x{d.height})")
        for role, where in found.items():
            print(f"  {role:<13} {where}")
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="measure s/it, stage memory and the diffusers baseline (no weights needed)",
        description="Benchmark real-width blocks of a model (Z-Image Turbo, SD3/SD3.5...) with random "
        "weights: s/it per strategy, peak VRAM and RAM, bytes streamed, a diffusers baseline on the same "
        "weights, per-stage memory, and projections (a model, not a measurement) for GTX 1070, GTX 1660 Ti, "
        "RTX 2060 and T4.",
    )
    p.add_argument("--model", metavar="NAME", help=f"the model to benchmark (default z-image-turbo): "
                   f"{_variants_help()}")
    p.add_argument(
        "--strategies",
        metavar="LIST",
        help="comma-separated: resident, streamed, resident-int8, streamed-w8a8, "
        "streamed-fp8-e4m3, ... or 'all' (default: resident,streamed on CPU, all on CUDA)",
    )
    p.add_argument(
        "--depth",
        metavar="N|full",
        help="blocks to build (Z-Image: main layers, 1 on CPU, 4 on CUDA, 'full' = 30 + 2 + 2; SD3: "
        "joint blocks incl. the last, at least one of each kind, 2 or 3 on CPU, 4 on CUDA); s/it at "
        "full depth is extrapolated from per-block times",
    )
    p.add_argument("--resolution", type=int, metavar="PX", help="square image side (512 CPU, 1024 CUDA)")
    p.add_argument("--iterations", type=int, metavar="N", help="timed iterations per strategy")
    p.add_argument("--warmup", type=int, metavar="N", help="untimed iterations before them")
    p.add_argument(
        "--vram-budget",
        metavar="SIZE",
        help="budget of the streamed strategies, e.g. 7GiB (default: the smallest that streams)",
    )
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--json", metavar="PATH", help="also write the full report as JSON")
    p.add_argument("--quick", action="store_true", help="a short run (well under a minute on a CPU)")
    p.add_argument("--no-baseline", action="store_true", help="skip the diffusers baseline")
    p.add_argument("--no-stages", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dim", type=int, help=argparse.SUPPRESS)  # test-size width
    p.add_argument("--models", metavar="DIR", help="benchmark the real pipeline on the weights in DIR")
    p.set_defaults(func=_cmd_bench)


BENCH_MAX_DEPTH = 30  # the real DiT's main layers ('full' adds the 2 + 2 refiners)
BENCH_MAX_ITERATIONS = 1000


def _cmd_bench(args: argparse.Namespace) -> int:
    from pascaline.bench.report import format_table, write_json
    from pascaline.bench.runner import BenchOptions, run_bench
    from pascaline.errors import InvalidArgumentError
    from pascaline.runtime.device import parse_bytes
    from pascaline.runtime.sizing import MAX_SIDE, validate_whole

    depth = args.depth
    if depth is not None and depth != "full":
        if not depth.isdigit() or len(depth) > 4:
            raise InvalidArgumentError(f"--depth takes a number of layers or 'full', got {depth[:20]!r}.")
        depth = validate_whole("--depth", int(depth), 1, BENCH_MAX_DEPTH)
    for name, value, low, high in (("--resolution", args.resolution, 64, MAX_SIDE),
                                   ("--iterations", args.iterations, 1, BENCH_MAX_ITERATIONS),
                                   ("--warmup", args.warmup, 0, BENCH_MAX_ITERATIONS)):  # fmt: skip
        if value is not None:
            validate_whole(name, value, low, high)
    strategies = tuple(s for s in (args.strategies or "").split(",") if s.strip()) or None
    options = BenchOptions(
        strategies=strategies, depth=depth, resolution=args.resolution, iterations=args.iterations,
        warmup=args.warmup, vram_budget=parse_bytes(args.vram_budget) if args.vram_budget else None,
        device=args.device, quick=args.quick, baseline=not args.no_baseline, stages=not args.no_stages,
        models=args.models, model=args.model, dim=args.dim,
    )  # fmt: skip

    def progress(msg: str) -> None:
        print(f"bench: {msg}", file=sys.stderr, flush=True)

    progress = progress if sys.stderr.isatty() else None
    report = run_bench(options, progress=progress)
    print(format_table(report))
    if args.json:
        print(f"wrote {write_json(report, args.json)}")
    return 0


# --- quantize --------------------------------------------------------------------------------

QUANTIZE_SCHEMES = ("int8", "w8a8", "w8a8-rot", "fp8-e4m3", "fp8-e5m2")


def _add_quantize(sub) -> None:
    p = sub.add_parser(
        "quantize",
        help="write a pre-quantized DiT or text encoder file",
        description="Quantize a Z-Image DiT or the Qwen3 text encoder (bf16, fp32 or fp8; a file, a "
        "diffusers folder, or a snapshot root, which stands for its DiT) into one safetensors file "
        "that generate --dit / --text-encoder load without quantizing again. The scheme is recorded "
        "in the file's metadata, not in its name.",
    )
    p.add_argument("source", metavar="SRC", help="the DiT or text encoder file or folder")
    p.add_argument(
        "--scheme",
        choices=QUANTIZE_SCHEMES,
        default="int8",
        help="int8 (default) and w8a8 write the same int8 weights per output channel and record "
        "how they compute where a run asks for no scheme (weights dequantized, or int8 activations "
        "too); with --quant auto, GeForce Pascal and Turing cards run w8a8 either way (see pascaline info). "
        "w8a8-rot stores int8 weights rotated by a 128-wide Hadamard (robust to outlier activation "
        "channels) and runs only as w8a8-rot; "
        "fp8-e4m3 and fp8-e5m2 store float8 weights, widened for compute; run such a file with the "
        "same --quant",
    )
    p.add_argument(
        "--out",
        metavar="DST",
        help="output file (default: <name>_<scheme>.safetensors next to SRC, <name> being the file's "
        "name without its extension, or the folder's name for a folder)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=_cmd_quantize)


def _default_out(src, scheme: str):
    """Where ``pascaline quantize`` writes by default: beside the source file or folder."""
    from pathlib import Path

    src = Path(src).expanduser()
    if src.is_dir():
        folder = src.resolve()  # "." and "snapshot/" have a name once resolved
        return folder.parent / f"{folder.name}_{scheme}.safetensors"
    return src.with_name(f"{src.stem}_{scheme}.safetensors")


def _cmd_quantize(args: argparse.Namespace) -> int:
    import time
    from functools import partial
    from pathlib import Path

    from pascaline.errors import InvalidArgumentError, MissingFileError
    from pascaline.runtime.device import format_bytes
    from pascaline.runtime.quantize import quantize_file

    start = time.perf_counter()
    src = Path(args.source).expanduser()
    if not src.exists():
        raise MissingFileError(f"{src} does not exist.")
    dst = Path(args.out).expanduser() if args.out else _default_out(src, args.scheme)
    # the output being the source itself is quantize_file's to refuse, with its own sentence
    if dst.is_file() and not args.overwrite and dst.resolve() != src.resolve():
        raise InvalidArgumentError(
            f"{dst} already exists; pass --overwrite to replace it, or choose another --out."
        )
    bars = _ProgressBars()
    try:
        result = quantize_file(src, dst, args.scheme, progress=partial(bars, "quantize"))
    finally:
        bars.close()
    print(
        f"{result.path}  {result.model}, {result.scheme}, {result.tensors} tensors, "
        f"{format_bytes(result.source_bytes)} -> {format_bytes(result.output_bytes)}, "
        f"{time.perf_counter() - start:.1f} s"
    )
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors in one line (sub-commands inherit the class)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pascaline",
        description="Z-Image Turbo and Stable Diffusion 3 / 3.5 on 8 GB Pascal/Turing GPUs.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_info(sub)
    _add_generate(sub)
    _add_models(sub)
    _add_bench(sub)
    _add_quantize(sub)
    from pascaline.batch.command import add_parser as add_batch
    from pascaline.serve.command import add_parser as add_serve
    from pascaline.sweep.command import add_parser as add_sweep

    add_serve(sub)
    add_batch(sub)
    add_sweep(sub)
    return parser


def _version() -> str:
    import pascaline

    return f"pascaline {pascaline.__version__}"


def _line(text) -> str:
    """``text`` as one line: what a message quotes (a path, a library's reason) may hold newlines."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line: ``pascaline: warning: ...`` for ours, Python's own form otherwise."""
    if issubclass(category, PascalineWarning):
        print(f"pascaline: warning: {_line(message)}", file=sys.stderr)
    else:
        print(_line(warnings.formatwarning(message, category, filename, lineno, "")), file=sys.stderr)


@contextmanager
def _interrupt_deferred():
    """Ctrl-C held back while the block runs, then raised as usual (main thread only).

    torch's import runs C++ that calls back into Python: a KeyboardInterrupt raised there is
    cleared (torch's import of numpy: the Ctrl-C is lost and the run goes on) or ends the
    process in ``std::terminate`` (its c10d init). Held back, it costs at most the import.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (2 for a user mistake, 130 for Ctrl-C)."""
    with _interrupt_deferred():
        # the families' variant names (the --model choices) come with torch: Ctrl-C waits for it
        parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():  # restores the warnings machinery on the way out
        warnings.showwarning = _show_warning
        try:
            with _interrupt_deferred():
                import torch  # noqa: F401 - every command needs it; imported here, where Ctrl-C waits
            return int(args.func(args) or 0)
        except PascalineError as exc:
            print(f"pascaline: error: {_line(exc)}", file=sys.stderr)
            return 2
        except BrokenPipeError:
            raise  # the reader went away: the entry point ends quietly
        except OSError as exc:  # the machine's, not ours: a full disk, a folder we may not write
            where = f" ({exc.filename})" if exc.filename else ""
            print(f"pascaline: error: {_line(exc.strerror or exc)}{where}.", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("pascaline: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    from pascaline._entry import main as entry

    sys.exit(entry())
