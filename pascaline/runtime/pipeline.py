"""The one orchestrator: prompt -> caption features -> latent -> image, stage by stage.

    pipe = load_pipeline("~/ComfyUI/models", device="cuda", vram_budget="7GiB", quant="int8")
    image = pipe.generate("a lighthouse at dusk", seed=42)  # PIL.Image

Each ``generate`` runs three stages in turn, each alone on the device and under the VRAM
budget: the text encoder (its decoder layers streamed when they do not fit), the DiT
(blocks streamed through the ``BlockStreamer`` per ``plan_placement``), the VAE decode
(tiled under the budget). A stage places its model when it starts and frees it when it
ends; a fresh ``MemoryLedger`` per call records each stage's time and memory
(``pipe.last_report``). Between calls the loaded (possibly quantized) models stay in host
RAM when they fit comfortably, else they are read from disk again for every call.

This file is longer than the house 400 lines because the options, the stages and the
loader share one vocabulary and are only ever read together.
"""

from __future__ import annotations

import gc
import math
import secrets
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from pascaline.errors import InvalidArgumentError
from pascaline.runtime import sampling
from pascaline.runtime.device import DeviceCaps, format_bytes
from pascaline.runtime.discovery import ModelFiles, find_model_files
from pascaline.runtime.memory import dit_activation_bytes, encoder_activation_bytes, plan_dit, token_counts
from pascaline.runtime.sizing import validate_sampling, validate_size

Progress = Callable[[str, int, int], None]  # (phase, done, total): "load", "encode", "steps", "decode"
OUTPUTS = ("pil", "tensor", "latent")
QUANT_NAMES = ("none", "int8", "w8a8", "fp8-e4m3", "fp8-e5m2")
SEED_RANGE = 2**64
RANDOM_SEED_RANGE = 2**32  # random seeds stay short enough to type back
# Keep the models in host RAM between calls when they take at most this share of the RAM
# that was available when the pipeline was loaded.
KEEP_LOADED_SHARE = 0.5
_DTYPE_KEYS = {"text_encoder": "encoder", "dit": "dit", "vae": "vae"}
_COMPONENT_NAMES = {"text_encoder": "text encoder", "dit": "DiT", "vae": "VAE"}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class GenerateOptions:
    """Every setting of one image; validated on construction (one sentence per mistake).

    ``seed=None`` means "pick one at random when generating"; ``init_image`` is a path or a
    ``[1, 3, H, W]`` tensor in [-1, 1] and is needed for ``denoise < 1``.
    """

    prompt: str
    negative_prompt: str | None = None
    width: int = 1024
    height: int = 1024
    steps: int = 8
    seed: int | None = None
    sampler: str = "res_multistep"
    scheduler: str = "linear"
    shift: float = 3.0
    cfg: float = 1.0
    blind_start: int = 0
    init_image: str | Path | torch.Tensor | None = None
    denoise: float = 1.0
    output: str = "pil"

    def __post_init__(self):
        if not isinstance(self.prompt, str):
            raise InvalidArgumentError(f"the prompt must be text, not {type(self.prompt).__name__}.")
        validate_sampling(self.steps, self.cfg, self.denoise)  # the limits of runtime/sizing.py
        validate_size(self.width, self.height)
        if not _whole(self.steps) or self.steps < 1:
            raise InvalidArgumentError(f"steps must be a whole number of at least 1, not {self.steps!r}.")
        if self.seed is not None and (not _whole(self.seed) or not 0 <= self.seed < SEED_RANGE):
            raise InvalidArgumentError(
                f"seed {self.seed!r} is out of range; use a whole number from 0 to 2**64-1."
            )
        sampling.get_sampler(self.sampler)
        sampling.sigma_schedule(1, 1.0, scheduler=self.scheduler)
        if not _number(self.shift) or self.shift <= 0:
            raise InvalidArgumentError(f"shift must be a positive number, not {self.shift!r}.")
        if not _number(self.cfg) or self.cfg < 0:
            raise InvalidArgumentError(f"cfg must be a number of 0 or more (1 = off), not {self.cfg!r}.")
        if not _whole(self.blind_start) or not 0 <= self.blind_start < self.steps:
            raise InvalidArgumentError(
                f"blind start must be a whole number from 0 to steps - 1 ({self.steps - 1}), "
                f"not {self.blind_start!r}."
            )
        self._check_img2img()
        if self.output not in OUTPUTS:
            raise InvalidArgumentError(
                f"output {self.output!r} is unknown; choose one of {', '.join(OUTPUTS)}."
            )

    def _check_img2img(self) -> None:
        if not _number(self.denoise) or not 0 < self.denoise <= 1:
            raise InvalidArgumentError(f"denoise must be above 0 and at most 1, not {self.denoise!r}.")
        if self.denoise < 1 and self.init_image is None:
            raise InvalidArgumentError(
                f"denoise {self.denoise} needs an init image; give one, or set denoise 1."
            )
        if isinstance(self.init_image, (str, Path)) and not Path(self.init_image).is_file():
            raise InvalidArgumentError(f"init image {self.init_image} does not exist; check the path.")

    def with_seed(self, seed: int | None = None) -> GenerateOptions:
        """The same options with ``seed`` (a random one when None and none is set)."""
        if seed is None:
            seed = self.seed if self.seed is not None else secrets.randbelow(RANDOM_SEED_RANGE)
        return replace(self, seed=seed)


@dataclass
class GenerationReport:
    """Time and memory of one ``generate`` call (``Pipeline.last_report``)."""

    seed: int
    width: int
    height: int
    steps: int
    seconds: float = 0.0
    sampling_seconds: float = 0.0
    stages: list[dict] = field(default_factory=list)
    plans: dict[str, str] = field(default_factory=dict)

    @property
    def s_per_it(self) -> float:
        return self.sampling_seconds / max(self.steps, 1)

    @property
    def peak_vram_bytes(self) -> int | None:
        """Largest measured (CUDA) or own-accounted device peak of a stage; None on the CPU."""
        if not self.stages or self.stages[0].get("cuda_peak_allocated_bytes") is None:
            return None
        return max(s["peak_vram_bytes"] for s in self.stages)

    @property
    def peak_rss_bytes(self) -> int | None:
        peaks = [s["peak_rss_bytes"] for s in self.stages if s.get("peak_rss_bytes") is not None]
        return max(peaks) if peaks else None

    @property
    def all_freed(self) -> bool:
        return all(s["freed"] for s in self.stages)


# ---------------------------------------------------------------------------- settings


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() not in _DTYPES:
        raise InvalidArgumentError(f"dtype {dtype!r} is unknown; use float32, bfloat16 or float16.")
    return _DTYPES[str(dtype).lower()]


def resolve_budget(vram_budget: str | int | None, caps: DeviceCaps) -> int | None:
    """``"auto"`` -> the policy's budget (None on the CPU); a size such as ``"7GiB"``; None = no limit."""
    from pascaline.runtime.device import default_budget, parse_bytes

    if vram_budget is None:
        return None
    if vram_budget == "auto":
        return default_budget(caps)
    budget = parse_bytes(vram_budget)
    if caps.is_cuda and budget > caps.total_vram_bytes:
        raise InvalidArgumentError(
            f"the VRAM budget {format_bytes(budget)} is more than the {caps.name}'s "
            f"{format_bytes(caps.total_vram_bytes)}; give a smaller --vram-budget or 'auto'."
        )
    return budget


def resolve_quant(quant: str | None, caps: DeviceCaps) -> str | None:
    """``"auto"`` -> the device policy; ``"none"``/None -> no quantization; else a scheme name."""
    from pascaline.runtime.device import default_quant

    if quant is None or quant == "none":
        return None
    if quant == "auto":
        return default_quant(caps)
    if quant not in QUANT_NAMES:
        raise InvalidArgumentError(
            f"quantization {quant!r} is unknown; use one of auto, {', '.join(QUANT_NAMES)}."
        )
    return quant


def component_quant(path: Path, quant: str | None, auto: bool) -> str | None:
    """The scheme a component file is loaded with.

    A pascaline pre-quantized file runs as itself when no scheme was asked for, or when
    ``"auto"`` asked for one of another storage (an fp8 file on a card whose policy is
    w8a8); an explicit request of another storage is refused by the loader.
    """
    from pascaline.formats.safetensors_io import WeightSource
    from pascaline.quant.schemes import same_storage, scheme_from_metadata, scheme_from_name

    with WeightSource(path) as source:
        stored = scheme_from_metadata(source.metadata)
    if stored is None:
        return quant
    if quant is None or (auto and not same_storage(scheme_from_name(quant), stored)):
        return stored.name
    return quant


def _dtypes(caps: DeviceCaps, dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    from pascaline.runtime.device import compute_dtype

    out = {c: compute_dtype(caps, c) for c in ("encoder", "dit", "vae")}
    if dtype is not None:
        out["encoder"] = out["dit"] = dtype
        if dtype != torch.float16:  # the FLUX VAE turns black in fp16: keep the policy's
            out["vae"] = dtype
    return out


def estimated_host_bytes(path: Path, dtype: torch.dtype, quantized: bool) -> int:
    """Host bytes of a component once loaded: 1 byte per weight of a large matrix when quantized."""
    from pascaline.formats.safetensors_io import WeightSource

    size = torch.empty((), dtype=dtype).element_size()
    with WeightSource(path) as source:
        total = 0
        for shape in source.shapes().values():
            n = math.prod(shape)
            total += n * (1 if quantized and len(shape) == 2 and n >= 1 << 20 else size)
    return total


def _available_ram() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


# ---------------------------------------------------------------------------- the pipeline


class Pipeline:
    """Z-Image Turbo text-to-image over one device; build it with ``load_pipeline``."""

    def __init__(
        self,
        files: ModelFiles,
        caps: DeviceCaps,
        *,
        budget_bytes: int | None,
        quant: str | None,
        dtypes: dict[str, torch.dtype],
        keep_loaded: bool,
        quant_is_auto: bool = False,
        tokenizer,
        progress: Progress | None = None,
        prefetch: int = 1,
    ):
        self.files, self.caps, self.budget_bytes = files, caps, budget_bytes
        self.quant, self.dtypes, self.keep_loaded = quant, dtypes, keep_loaded
        self.quant_is_auto = quant_is_auto
        # the scheme each component loads with, from the request and the files' own metadata
        self._schemes: dict[str, str | None] = {
            "text_encoder": component_quant(files.text_encoder, quant, quant_is_auto),
            "dit": component_quant(files.dit, quant, quant_is_auto),
            "vae": None,
        }
        self._fits: set[tuple[int, int]] = set()  # image sizes whose DiT plan fits the budget
        self.tokenizer, self.progress, self.prefetch = tokenizer, progress, prefetch
        self.device = torch.device(caps.device)
        self.last_report: GenerationReport | None = None
        self._models: dict[str, Any] = {}
        self._captions: tuple[tuple, list[torch.Tensor]] | None = None

    def __repr__(self) -> str:
        budget = "none" if self.budget_bytes is None else format_bytes(self.budget_bytes)
        return (
            f"Pipeline(device={self.device}, budget={budget}, quant={self.quant or 'none'}, "
            f"dit={self.files.dit.name}, keep_loaded={self.keep_loaded})"
        )

    # --- public ---------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        width: int = 1024,
        height: int = 1024,
        steps: int = 8,
        seed: int | None = None,
        sampler: str = "res_multistep",
        scheduler: str = "linear",
        shift: float = 3.0,
        cfg: float = 1.0,
        blind_start: int = 0,
        init_image=None,
        denoise: float = 1.0,
        output: str = "pil",
        callback: sampling.StepCallback | None = None,
    ):
        """One image for ``prompt``: a PIL image, or ``output="tensor"`` (fp32 ``[1, 3, H, W]``
        in [-1, 1]) or ``"latent"`` (fp32 ``[1, 16, H/8, W/8]``, no decode).

        ``seed=None`` picks a random seed (``pipe.last_report.seed`` tells which); the same
        seed gives the same starting noise as ComfyUI and diffusers. ``callback(step, total,
        sigma, latent)`` runs after every sampler step; returning False cancels the run
        (``sampling.Cancelled`` is raised, the models are freed as usual).
        """
        options = GenerateOptions(
            prompt,
            negative_prompt,
            width,
            height,
            steps,
            seed,
            sampler,
            scheduler,
            shift,
            cfg,
            blind_start,
            init_image,
            denoise,
            output,
        )
        return self.run(options, callback=callback)

    def run(self, options: GenerateOptions, *, callback: sampling.StepCallback | None = None):
        """``generate`` from a ``GenerateOptions``; a None seed becomes a random one."""
        from pascaline.offload.ledger import LIBRARY_WORKSPACE_BYTES, MemoryLedger

        options = options.with_seed()
        ledger = MemoryLedger(self.device, cuda_slack_bytes=LIBRARY_WORKSPACE_BYTES)
        report = GenerationReport(options.seed, options.width, options.height, options.steps)
        self.last_report = report
        start = time.perf_counter()
        try:
            self._check_host_ram()
            self._check_dit_fits(options)
            captions = self._encode_stage(options, ledger, report)
            init = self._vae_encode_stage(options, ledger) if options.init_image is not None else None
            latent = self._dit_stage(options, captions, init, ledger, report, callback)
            result = latent if options.output == "latent" else self._decode_stage(latent, options, ledger)
        finally:
            report.seconds = time.perf_counter() - start
            report.stages = [r.as_dict() for r in ledger.records]
        return result

    def metadata(self, options: GenerateOptions) -> dict:
        """The PNG settings of an image made with ``options`` (seed set) by this pipeline."""
        from pascaline.runtime.images import generation_metadata

        if options.seed is None:
            raise InvalidArgumentError("metadata needs the seed the image was made with.")
        models = {"dit": self.files.dit, "text_encoder": self.files.text_encoder, "vae": self.files.vae}
        return generation_metadata(
            prompt=options.prompt, negative=options.negative_prompt, seed=options.seed, width=options.width,
            height=options.height, models=models, sampler=options.sampler, scheduler=options.scheduler,
            steps=options.steps, shift=options.shift, cfg=options.cfg, quant=self.quant_label,
            blind_start=options.blind_start, denoise=options.denoise)  # fmt: skip

    @property
    def quant_label(self) -> str:
        """The scheme the DiT runs with (a pre-quantized file's own when nothing else was asked)."""
        return self._schemes["dit"] or "none"

    def load_(self) -> Pipeline:
        """Load the three models into host RAM now (what ``keep_loaded`` keeps between calls)."""
        self._check_host_ram()
        for i, component in enumerate(("text_encoder", "dit", "vae")):
            self._report("load", i, 3)
            self._model(component)
        self._report("load", 3, 3)
        return self

    def unload_(self) -> None:
        """Drop the host copies (the next call reads the files again)."""
        self._models.clear()
        self._captions = None
        gc.collect()

    # --- models ---------------------------------------------------------------------------

    def _model(self, component: str):
        if component not in self._models:
            self._models[component] = self._load(component)
        return self._models[component]

    def _load(self, component: str):
        quant = self._schemes[component]
        if component == "text_encoder":
            from pascaline.formats.qwen3 import load_text_encoder

            return load_text_encoder(
                self.files.text_encoder, dtype=self.dtypes["encoder"], tokenizer=self.tokenizer, quant=quant
            )
        if component == "dit":
            from pascaline.formats.zimage_dit import load_dit

            return load_dit(self.files.dit, dtype=self.dtypes["dit"], quant=quant)
        from pascaline.formats.flux_vae import load_vae

        return load_vae(self.files.vae, dtype=self.dtypes["vae"])

    def host_needs(self) -> dict[str, int]:
        """Estimated host bytes of each model not loaded yet, as it will be loaded."""
        needs = {}
        for c in ("text_encoder", "dit", "vae"):
            if c not in self._models:
                dtype, quantized = self.dtypes[_DTYPE_KEYS[c]], self._schemes[c] is not None
                needs[c] = estimated_host_bytes(getattr(self.files, c), dtype, quantized)
        return needs

    def _check_host_ram(self) -> None:
        """Refuse a run that would exhaust the RAM available now, before any weight is read.

        Models not loaded yet are needed one at a time, or all together when they are kept.
        """
        available = _available_ram()
        if available is None:
            return
        needs = self.host_needs()
        need = sum(needs.values()) if self.keep_loaded else max(needs.values(), default=0)
        if need <= available:
            return
        from pascaline.errors import HostMemoryError

        largest = max(needs, key=needs.get)
        quant = self._schemes[largest]
        what = quant or str(self.dtypes[_DTYPE_KEYS[largest]]).removeprefix("torch.")
        held = "the models kept together" if self.keep_loaded else f"the {_COMPONENT_NAMES[largest]} ({what})"
        quantized = sum(estimated_host_bytes(getattr(self.files, c), self.dtypes[_DTYPE_KEYS[c]], c != "vae")
                        for c in (needs if self.keep_loaded else [largest]))  # the VAE is never quantized
        hint = f"; with --quant w8a8 that is about {format_bytes(quantized)}" if quantized < need else ""
        raise HostMemoryError(
            f"{held} would need about {format_bytes(need)} of RAM but only {format_bytes(available)} is "
            f"available; close other programs{hint}."
        )

    @contextmanager
    def _loaded(self, component: str):
        """The component's model for one stage; dropped afterwards unless kept in host RAM."""
        try:
            yield self._model(component)
        finally:
            if not self.keep_loaded:
                self._models.pop(component, None)
                gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _report(self, phase: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(phase, done, total)

    @contextmanager
    def _placed(self, module, name: str, activation_bytes: int, ledger, report: GenerationReport | None):
        """``module`` on the device for the stage: resident, or with its units streamed."""
        from pascaline.offload.plan import plan_for_model
        from pascaline.offload.streamer import BlockStreamer

        plan = plan_for_model(module, self.budget_bytes, activation_bytes, self.prefetch)
        if report is not None:
            report.plans[name] = plan.describe()
        streamer = BlockStreamer(module, plan, self.device, ledger=ledger, name=name).attach_()
        try:
            yield plan
        finally:
            streamer.detach_()

    def _check_dit_fits(self, options: GenerateOptions) -> None:
        """Plan the DiT on ``meta`` before the encoder runs, so a budget too small fails first."""
        size = (options.width, options.height)
        if self.budget_bytes is None or size in self._fits:
            return
        from pascaline.formats.zimage_dit import infer_dit_config, open_dit_source

        with open_dit_source(self.files.dit) as source:
            cfg = infer_dit_config(source.shapes())
        quant = self._schemes["dit"]
        # the shortest caption: a longer one only adds its tokens to the real plan's estimate
        plan_dit(cfg, self.dtypes["dit"], quant, *size, cfg.seq_multiple, self.budget_bytes, self.prefetch)
        self._fits.add(size)

    # --- stages ---------------------------------------------------------------------------

    def _encode_stage(self, options: GenerateOptions, ledger, report) -> list[torch.Tensor]:
        # A negative prompt only matters with guidance; without one the negative branch is the
        # zeroed positive (ComfyUI's ConditioningZeroOut), so there is nothing to encode.
        negative = options.negative_prompt if options.cfg != 1.0 and options.negative_prompt else None
        key = (options.prompt, negative)
        if self._captions is not None and self._captions[0] == key:
            return self._captions[1]  # same prompt as the last call: no encoder stage at all
        prompts = [options.prompt] if negative is None else [options.prompt, negative]
        with ledger.stage("encoder"):
            self._report("encode", 0, 1)
            with self._loaded("text_encoder") as encoder:
                tokens = max(len(ids) for ids in encoder.tokenize(prompts))
                act = encoder_activation_bytes(
                    encoder.model.config, tokens, self.dtypes["encoder"], self._schemes["text_encoder"]
                )
                with self._placed(encoder.model, "encoder", act, ledger, report):
                    features = [f.to("cpu") for f in encoder.encode(prompts)]
            self._report("encode", 1, 1)
        self._captions = (key, features)
        return features

    def _vae_encode_stage(self, options: GenerateOptions, ledger) -> torch.Tensor:
        from pascaline.runtime.images import load_init_image

        image = options.init_image
        if not isinstance(image, torch.Tensor):
            image = load_init_image(image, options.width, options.height)
        elif tuple(image.shape) != (1, 3, options.height, options.width):
            raise InvalidArgumentError(
                f"the init image tensor has shape {tuple(image.shape)}; give [1, 3, {options.height}, "
                f"{options.width}] in [-1, 1]."
            )
        with (
            ledger.stage("vae_encode"),
            self._loaded("vae") as vae,
            self._vae_on_device(vae, "encoder", ledger),
        ):
            latent = vae.encode(image, budget_bytes=self.budget_bytes).to("cpu")
        return latent

    def _dit_stage(self, options, captions, init, ledger, report, callback) -> torch.Tensor:
        noise = sampling.initial_noise(options.seed, options.height, options.width)
        with ledger.stage("dit"):
            dtype = self.dtypes["dit"]
            with self._loaded("dit") as model:
                cap = max(c.shape[0] for c in captions)
                tokens = token_counts(model.config, options.height, options.width, cap)
                act = dit_activation_bytes(model.config, tokens, dtype, self._schemes["dit"])
                with self._placed(model, "dit", act, ledger, report):
                    latent = self._sample(model, noise, captions, init, options, report, callback)
        return latent

    def _sample(self, model, noise, captions, init, options, report, callback) -> torch.Tensor:
        """The sampler on the device; everything it put there is gone when it returns."""

        def on_step(step: int, total: int, sigma: float, latent: torch.Tensor):
            self._report("steps", step, total)
            return None if callback is None else callback(step, total, sigma, latent)

        dtype = self.dtypes["dit"]
        cond = [captions[0].to(self.device, dtype)]
        negative = [captions[1].to(self.device, dtype)] if len(captions) > 1 else None
        self._report("steps", 0, options.steps)
        start = time.perf_counter()
        latent = sampling.sample(
            model, noise.to(self.device), cond, steps=options.steps, shift=options.shift,
            sampler=options.sampler, scheduler=options.scheduler, negative=negative, cfg=options.cfg,
            blind_start=options.blind_start, denoise=options.denoise, callback=on_step,
            init_latent=None if init is None else init.to(self.device), dtype=self.dtypes["dit"],
        )  # fmt: skip
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        report.sampling_seconds = time.perf_counter() - start
        return latent.to("cpu")

    def _decode_stage(self, latent: torch.Tensor, options: GenerateOptions, ledger):
        with ledger.stage("vae"):
            self._report("decode", 0, 1)
            with self._loaded("vae") as vae, self._vae_on_device(vae, "decoder", ledger):
                images = vae.decode(latent, budget_bytes=self.budget_bytes).to("cpu")
            self._report("decode", 1, 1)
        if options.output == "tensor":
            return images
        from pascaline.formats.flux_vae import to_pil

        return to_pil(images)[0]

    @contextmanager
    def _vae_on_device(self, vae, part: str, ledger):
        """The VAE's ``part`` ("encoder" or "decoder") on the device for one stage: the tile
        planner counts that half's weights only, so the other half stays on the host."""
        module = getattr(vae.model, part)
        from pascaline.offload.plan import module_nbytes

        ledger.place("vae", module_nbytes(module))
        try:  # a move that fails half-way (out of memory) is undone below too
            module.to(self.device)
            yield vae
        finally:
            module.to("cpu")
            ledger.release("vae")


# ---------------------------------------------------------------------------- loading


def _probe(device: str, caps: DeviceCaps | None) -> DeviceCaps:
    from pascaline.runtime.device import check_torch_supports

    caps = caps or DeviceCaps.probe(device)
    check_torch_supports(caps)
    return caps


def _tokenizer(files: ModelFiles, tokenizer):
    from pascaline.formats.tokenizer import load_tokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    if files.tokenizer is not None:
        return load_tokenizer(files.tokenizer)
    encoder = files.text_encoder
    return load_tokenizer(
        models_dir=files.root or (encoder.parent if encoder.is_dir() else encoder.parent.parent)
    )


def _decide_keep(keep_loaded: bool | str, pipe: Pipeline) -> bool:
    if keep_loaded != "auto":
        return bool(keep_loaded)
    available = _available_ram()
    if available is None:
        return False
    return sum(pipe.host_needs().values()) <= KEEP_LOADED_SHARE * available


def load_pipeline(
    models: str | Path | None = None,
    *,
    dit: str | Path | None = None,
    text_encoder: str | Path | None = None,
    vae: str | Path | None = None,
    tokenizer=None,
    device: str = "auto",
    vram_budget: str | int | None = "auto",
    quant: str | None = "auto",
    dtype: str | torch.dtype | None = None,
    progress: Progress | None = None,
    keep_loaded: bool | str = "auto",
    prefetch: int = 1,
    caps: DeviceCaps | None = None,
) -> Pipeline:
    """A ready ``Pipeline`` for the Z-Image Turbo files in ``models`` (or given one by one).

    ``models``: a ComfyUI ``models/`` folder (the right files are picked by content) or a
    diffusers snapshot; ``dit``/``text_encoder``/``vae``/``tokenizer`` override single parts.
    ``device``: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
    ``vram_budget``: ``"auto"`` (the card's VRAM minus a desktop headroom; no limit on the
    CPU), a size such as ``"7GiB"``, or None for no limit. ``quant``: ``"auto"`` (the device
    policy: int8 on 8 GB cards, none on the CPU), ``"none"``, ``"int8"``, ``"w8a8"``,
    ``"fp8-e4m3"``, ``"fp8-e5m2"``. ``dtype`` overrides the compute dtype of the DiT and the
    encoder. ``keep_loaded``: keep the models in host RAM between calls (``"auto"``: when they
    take at most half the available RAM). ``progress(phase, done, total)`` hears of loading,
    steps and decoding. ``caps`` replaces the device probe (tests, frontends that probed).
    """
    caps = _probe(device, caps)
    budget = resolve_budget(vram_budget, caps)
    quant_name = resolve_quant(quant, caps)
    tokenizer_path = tokenizer if isinstance(tokenizer, (str, Path)) else None
    files = find_model_files(
        models, dit=dit, text_encoder=text_encoder, vae=vae, tokenizer=tokenizer_path, quant=quant_name
    )
    pipe = Pipeline(
        files,
        caps,
        budget_bytes=budget,
        quant=quant_name,
        quant_is_auto=quant == "auto",
        dtypes=_dtypes(caps, parse_dtype(dtype)),
        keep_loaded=False,
        tokenizer=_tokenizer(files, tokenizer),
        progress=progress,
        prefetch=prefetch,
    )
    pipe.keep_loaded = _decide_keep(keep_loaded, pipe)
    return pipe.load_() if pipe.keep_loaded else pipe
