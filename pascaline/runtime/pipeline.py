"""The one orchestrator: prompt -> conditioning -> latent -> image, stage by stage, for every family.

    pipe = load_pipeline("~/ComfyUI/models", device="cuda", vram_budget="7GiB", quant="int8")
    image = pipe.generate("a lighthouse at dusk", seed=42)  # PIL.Image

Each ``generate`` runs three stages in turn, each alone on the device and under the VRAM
budget: the encoder stage (each of the family's text encoders in turn, its layers streamed
when they do not fit, then freed), the diffusion model (blocks streamed through the
``BlockStreamer`` per ``plan_placement``), the VAE decode (tiled under the budget). A stage
places its model when it starts and frees it when it ends; a fresh ``MemoryLedger`` per
call records each stage's time and memory (``pipe.last_report``). Between calls the loaded
(possibly quantized) models stay in host RAM when they fit comfortably, else they are read
from disk again for every call. What differs between families (components, loaders,
conditioning, the model call, defaults) comes from the family declaration
(``pascaline.families``); nothing here names a family.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pascaline.errors import BudgetError, InvalidArgumentError
from pascaline.families.base import Family, LoadContext, Located, Variant
from pascaline.gguf.module import dequant_workspace_bytes
from pascaline.runtime import sampling
from pascaline.runtime.device import DeviceCaps, format_bytes
from pascaline.runtime.discovery import ModelFiles, find_model_files
from pascaline.runtime.options import OUTPUTS, GenerateOptions, GenerationReport

__all__ = ["OUTPUTS", "GenerateOptions", "GenerationReport", "Pipeline", "load_pipeline"]

Progress = Callable[[str, int, int], None]  # (phase, done, total): "load", "encode", "steps", "decode"
QUANT_NAMES = ("none", "int8", "w8a8", "w8a8-rot", "fp8-e4m3", "fp8-e5m2")
# Keep the models in host RAM between calls when they take at most this share of the RAM
# that was available when the pipeline was loaded.
KEEP_LOADED_SHARE = 0.5
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


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
    w8a8); an explicit request of another storage is refused by the loader. A GGUF file
    follows ``gguf.policy.gguf_run_quant`` (None: its blocks kept).
    """
    from pascaline.formats.safetensors_io import WeightSource
    from pascaline.gguf.reader import is_gguf_file
    from pascaline.quant.schemes import same_storage, scheme_from_metadata, scheme_from_name

    if is_gguf_file(path):
        from pascaline.gguf.policy import gguf_run_quant

        return gguf_run_quant(path, quant, auto)
    with WeightSource(path) as source:
        stored = scheme_from_metadata(source.metadata)
    if stored is None:
        return quant
    if quant is None or (auto and not same_storage(scheme_from_name(quant), stored)):
        return stored.name
    return quant


def stage_dtypes(caps: DeviceCaps, dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """The compute dtype of each stage (``encoder``, ``dit``, ``vae``): the policy, or ``dtype``."""
    from pascaline.runtime.device import compute_dtype

    out = {c: compute_dtype(caps, c) for c in ("encoder", "dit", "vae")}
    if dtype is not None:
        out["encoder"] = out["dit"] = dtype
        if dtype != torch.float16:  # the 16-channel AEs turn black in fp16: keep the policy's
            out["vae"] = dtype
    return out


def estimated_host_bytes(where: Path | Located, dtype: torch.dtype, quantized: bool) -> int:
    """Host bytes of a component once loaded: 1 byte per weight of a large matrix when quantized.

    ``where`` with a key prefix (a component bundled in a checkpoint) counts that component only.
    """
    from pascaline.formats.safetensors_io import WeightSource

    where = where if isinstance(where, Located) else Located(Path(where))
    size = torch.empty((), dtype=dtype).element_size()
    with WeightSource(where.path) as source:
        total = 0
        for key, shape in source.shapes().items():
            if where.prefix and not key.startswith(where.prefix):
                continue
            n = math.prod(shape)
            total += n * (1 if quantized and len(shape) == 2 and n >= 1 << 20 else size)
    return total


def gguf_types(files: ModelFiles) -> dict[str, str]:
    """``{role: main GGML type}`` of the components ``files`` holds in GGUF files (headers only)."""
    from pascaline.gguf.names import inspect_gguf
    from pascaline.gguf.reader import is_gguf_file

    return {role: inspect_gguf(where.path).quant_type for role, where in files.located.items()
            if is_gguf_file(where.path)}  # fmt: skip


def _source_bytes(where: Located) -> int:
    """Bytes of a component's tensors in its file (those under its prefix in a bundled checkpoint)."""
    from pascaline.formats.safetensors_io import WeightSource

    if where.path.is_file() and where.path.suffix == ".gguf":
        return where.path.stat().st_size
    with WeightSource(where.path) as source:
        return sum(source.info(k).nbytes for k in source.shapes() if k.startswith(where.prefix))


def _available_ram() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


# ---------------------------------------------------------------------------- the pipeline


class Pipeline:
    """One family's text-to-image over one device; build it with ``load_pipeline``."""

    def __init__(
        self,
        files: ModelFiles,
        caps: DeviceCaps,
        *,
        budget_bytes: int | None,
        quant: str | None,
        dtypes: dict[str, torch.dtype],
        keep_loaded: bool,
        variant: Variant | None = None,
        quant_is_auto: bool = False,
        tokenizers: dict[str, Any] | None = None,
        progress: Progress | None = None,
        prefetch: int = 1,
        batch_cfg: bool | str = "auto",
        loras=(),
        lora_mode: str = "merge",
    ):
        self.files, self.caps, self.budget_bytes = files, caps, budget_bytes
        self.family: Family = files.family
        self.variant: Variant = variant or self.family.variant(None)
        self.quant, self.dtypes, self.keep_loaded = quant, dtypes, keep_loaded
        self.quant_is_auto = quant_is_auto
        # the main GGML type of each component held in a GGUF file ("Q4_K")
        self._gguf: dict[str, str] = gguf_types(files)
        # the scheme each component loads with, from the request and the files' own metadata
        self._schemes: dict[str, str | None] = {
            role: component_quant(files.where(role).path, quant if self.family.component(role).quantized
                                  else None, quant_is_auto)
            for role in files.roles
        }  # fmt: skip
        self._fits: set[tuple[int, int]] = set()  # image sizes whose DiT plan fits the budget
        self._dit_config = None
        self.tokenizers = tokenizers or {}
        self.progress, self.prefetch, self.batch_cfg = progress, prefetch, batch_cfg
        self.device = torch.device(caps.device)
        self.last_report: GenerationReport | None = None
        self.notes: list[str] = []  # decisions the caller should hear of (an automatic quantization)
        self._models: dict[str, Any] = {}
        self._streamers: dict[str, Any] = {}  # kept models' BlockStreamers, packed between calls
        self._captions: tuple[tuple, list] | None = None
        self._held: dict[tuple, list] = {}  # conditionings of encode_prompts_, by prompt texts
        self.encoder_stages = 0  # how often the encoder stage ran (each runs every text encoder once)
        self._enhanced: dict[tuple[str, int | None], str] = {}  # (prompt, enhance seed) -> expanded
        if lora_mode not in ("merge", "branch"):
            raise InvalidArgumentError(f"LoRA mode {lora_mode!r} is unknown; use merge or branch.")
        self.lora_mode = lora_mode
        self._lora_files: dict[str, Any] = {}  # path -> LoraFile, read once
        self._loras = self._read_loras(loras)  # the pipeline's own LoRAs (load_pipeline / set_loras)
        self._merged_at_load = False  # whether the loaded DiT has them merged in (irreversibly)
        # runtime.enhance.enhance_prompt's settings (max_new_tokens, temperature, top_p, top_k, system)
        self.enhance_options: dict[str, Any] = {}

    def __repr__(self) -> str:
        budget = "none" if self.budget_bytes is None else format_bytes(self.budget_bytes)
        return (
            f"Pipeline({self.variant.name}, device={self.device}, budget={budget}, "
            f"quant={self.quant or 'none'}, "
            f"dit={self.files.dit.name}, keep_loaded={self.keep_loaded})"
        )

    # --- public ---------------------------------------------------------------------------

    def generate(self, prompt: str, *, callback: sampling.StepCallback | None = None, **options):
        """One image for ``prompt``: a PIL image, or ``output="tensor"`` (fp32 ``[1, 3, H, W]``
        in [-1, 1]) or ``"latent"`` (fp32 ``[1, C, H/8, W/8]``, no decode).

        ``options`` are the fields of ``GenerateOptions`` (``negative_prompt``, ``width``,
        ``height``, ``steps``, ``seed``, ``sampler``, ``scheduler``, ``shift``, ``cfg``,
        ``blind_start``, ``init_image``, ``denoise``, ``output``, ``negative_mode``, ``slg_*``);
        those left out take the variant's defaults. ``seed=None`` picks a random seed
        (``pipe.last_report.seed`` tells which); the same seed gives the same starting noise as
        ComfyUI and diffusers. ``callback(step, total, sigma, latent)`` runs after every sampler
        step; returning False cancels the run (``sampling.Cancelled`` is raised, the models are
        freed as usual).
        """
        try:
            spec = GenerateOptions(prompt, **options)
        except TypeError as exc:
            raise InvalidArgumentError(f"generate got an option it does not know ({exc}).") from None
        return self.run(spec, callback=callback)

    def resolve(self, options: GenerateOptions) -> GenerateOptions:
        """``options`` with the variant's defaults filled in and checked against the family."""
        options = options.resolved(self.variant.defaults)
        self.family.check_sampling(options.sampler, options.scheduler)
        options.check_blind_start()
        if options.slg_scale and options.slg_layers:
            self.family.check_skip_layers(self.dit_config(), options.slg_layers)
        return options

    def run(self, options: GenerateOptions, *, callback: sampling.StepCallback | None = None):
        """``generate`` from a ``GenerateOptions``; a None seed becomes a random one."""
        from pascaline.offload.ledger import LIBRARY_WORKSPACE_BYTES, MemoryLedger

        options = self.resolve(options).with_seed()
        ledger = MemoryLedger(self.device, cuda_slack_bytes=LIBRARY_WORKSPACE_BYTES)
        report = GenerationReport(options.seed, options.width, options.height, options.steps)
        self.last_report = report
        start = time.perf_counter()
        try:
            self._check_host_ram(skip_encoders=self._cached_conds(options) is not None)
            self._check_dit_fits(options)
            self._check_loras(self._read_loras(options.loras))
            if options.enhance:
                options = replace(options, prompt=self._enhance(options.prompt, options.enhance_seed, ledger))
            conds = self._encode_stage(options, ledger, report)
            init = self._vae_encode_stage(options, ledger) if options.init_image is not None else None
            latent = self._dit_stage(options, conds, init, ledger, report, callback)
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
        o = self.resolve(options)
        models = {role: where.path for role, where in self.files.located.items()}
        dit_path = self.files.where(self.family.dit.role).path
        extra = {
            # what the unconditional branch was: the negative text (or "" encoded), or the zeroed positive
            "negative_mode": "text" if len(self._prompts(o)) > 1 else "zero",
        }
        extra["dit_kind"] = ("checkpoint" if sum(w.path == dit_path for w in self.files.located.values()) > 1
                             else "diffusion_model")
        if self.family.supports_skip_layers:
            extra |= {"slg_layers": list(o.slg_layers or ()), "slg_scale": o.slg_scale,
                      "slg_start": o.slg_start, "slg_end": o.slg_end}  # fmt: skip
        enhanced = self._enhanced.get((o.prompt, o.enhance_seed)) if o.enhance else None
        meta = generation_metadata(
            prompt=enhanced or o.prompt, original_prompt=o.prompt if enhanced else None,
            negative=o.negative_prompt, seed=o.seed, width=o.width, height=o.height,
            models=models, sampler=o.sampler, scheduler=o.scheduler, steps=o.steps, shift=o.shift, cfg=o.cfg,
            quant=self.quant_label, blind_start=o.blind_start, denoise=o.denoise, family=self.family.name,
            variant=self.variant.name, extra=extra, rounding=o.rounding, loras=self.lora_records(o),
            init_image=o.init_image if isinstance(o.init_image, (str, Path)) else None,
            without=[c.role for c in self.family.components if c.role not in self.files.located],
        )  # fmt: skip
        for role, gtype in self._gguf.items():  # a GGUF model's record names its type
            meta["models"][role]["gguf"] = gtype
        return meta

    def enhance_prompt(self, text: str, *, seed: int | None = None) -> str:
        """``text`` expanded by the family's language model (Z-Image: the full Qwen3-4B of the text
        encoder file), greedily or by seeded sampling; the same (text, seed) gives the same words.
        ``pipe.enhance_options`` passes settings to ``runtime.enhance.enhance_prompt``
        (``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``system``)."""
        from pascaline.offload.ledger import LIBRARY_WORKSPACE_BYTES, MemoryLedger

        if not isinstance(text, str):
            raise InvalidArgumentError(f"the prompt must be text, not {type(text).__name__}.")
        return self._enhance(text, seed, MemoryLedger(self.device, cuda_slack_bytes=LIBRARY_WORKSPACE_BYTES))

    def _enhance(self, text: str, seed: int | None, ledger) -> str:
        key = (text, seed)
        if key in self._enhanced:
            return self._enhanced[key]
        from pascaline.runtime.enhance import enhance_streamed

        ctx = LoadContext(self.dtypes["encoder"], self._schemes.get(self.family.encoder_roles[0]), "cpu",
                          self.tokenizers)  # fmt: skip
        with ledger.stage("enhance"):
            lm = self._models.get("enhancer") or self._load_enhancer(ctx)
            def progress(done: int, total: int) -> None:
                self._report("enhance", done, total)

            try:
                expanded = enhance_streamed(lm, text, device=self.device, budget_bytes=self.budget_bytes,
                                            prefetch=self.prefetch, ledger=ledger, seed=seed,
                                            callback=progress, **self.enhance_options)  # fmt: skip
            finally:
                if self.keep_loaded:
                    self._models["enhancer"] = lm
                del lm
                gc.collect()
        self._enhanced[key] = expanded
        return expanded

    def _load_enhancer(self, ctx: LoadContext):
        role = self.family.encoder_roles[0]
        need = estimated_host_bytes(self.files.where(role).path, ctx.dtype, ctx.quant is not None)
        available = _available_ram()
        if available is not None and need > available:
            from pascaline.errors import HostMemoryError

            raise HostMemoryError(f"prompt enhancement needs the whole language model, about "
                                  f"{format_bytes(need)} of RAM, but only {format_bytes(available)} is "
                                  "available; leave --enhance out.")
        lm = self.family.load_enhancer(self.files, ctx)
        if lm is None:
            raise InvalidArgumentError(f"{self.family.label} has no language model to enhance prompts with; "
                                       "leave --enhance out.")
        return lm

    @property
    def quant_label(self) -> str:
        """What the diffusion model runs: its scheme (a pre-quantized file's own when none was asked),
        ``"gguf Q4_K"`` for GGUF blocks kept, ``"w8a8 (from Q8_0)"`` for a GGUF requantized."""
        role = self.family.dit.role
        scheme, gtype = self._schemes[role], self._gguf.get(role)
        if gtype is None:
            return scheme or "none"
        return f"gguf {gtype}" if scheme is None else f"{scheme} (from {gtype})"

    def load_(self) -> Pipeline:
        """Load every component into host RAM now (what ``keep_loaded`` keeps between calls)."""
        self._check_host_ram()
        roles = self.files.roles
        for i, role in enumerate(roles):
            self._report("load", i, len(roles))
            self._model(role)
        self._report("load", len(roles), len(roles))
        return self

    def encode_prompts_(self, options: Sequence[GenerateOptions]) -> int:
        """Encode the prompts of every ``options`` (the positive and, where guidance needs it, the
        negative text) in ONE encoder stage and hold the conditionings, so that runs of those
        options encode nothing: a sweep over checkpoints or LoRAs encodes once (``encoder_stages``
        counts the stages). They stay valid across ``set_dit_`` and are dropped by
        ``release_prompts_``. Returns how many prompt lists were encoded (0: all held already)."""
        from pascaline.offload.ledger import LIBRARY_WORKSPACE_BYTES, MemoryLedger

        ledger = MemoryLedger(self.device, cuda_slack_bytes=LIBRARY_WORKSPACE_BYTES)
        keys = []
        for o in options:
            o = self.resolve(o)
            if o.enhance:
                o = replace(o, prompt=self._enhance(o.prompt, o.enhance_seed, ledger))
            key = tuple(self._prompts(o))
            if key not in self._held and key not in keys:
                keys.append(key)
        if keys:
            self._check_host_ram()
            self._held.update(self._run_encoders(keys, ledger, None))
        return len(keys)

    def release_prompts_(self) -> None:
        """Drop the conditionings ``encode_prompts_`` holds."""
        self._held.clear()

    def set_dit_(self, dit: str | Path) -> None:
        """Run another diffusion model of the same family and shape (a fine-tune's checkpoint: a file
        or a diffusers ``transformer/`` folder) from the next image on. The one loaded now is freed
        first, so two never share the RAM; the encoders, the VAE, held conditionings and the
        pipeline's LoRAs stay. Another family's model, or one of another size, is one sentence."""
        from pascaline.errors import WrongModelError
        from pascaline.runtime.discovery import ModelFiles, locate

        role = self.family.dit.role
        located = locate(dit, self.family.dit)
        if located == self.files.where(role):
            return
        config, current = self.family.dit_config(located), self.dit_config()
        if config != current:
            difference = _config_difference(current, config)
            raise WrongModelError(f"{located.path} is a {self.family.dit.label} of another shape than "
                                  f"{self.files.where(role).path.name} ({difference}); give diffusion models "
                                  "of one model.")  # fmt: skip
        if role in self._models or "dit" in self._streamers:
            self._drop_dit()
        self._merged_at_load = False
        self.files = ModelFiles(self.family, {**self.files.located, role: located}, self.files.tokenizer,
                                self.files.root)  # fmt: skip
        self._gguf = gguf_types(self.files)
        self._schemes[role] = component_quant(located.path, self.quant, self.quant_is_auto)
        self._fits.clear()  # the plan depends on the new file's storage

    def check_loras(self, loras) -> None:
        """Refuse LoRAs (``[(path, strength)]`` or ``["path:strength"]``) that do not fit this pipeline's
        diffusion model, before any weight is read (one sentence, ``LoraError``)."""
        self._check_loras(self._read_loras(loras))

    def unload_(self) -> None:
        """Drop the host copies (the next call reads the files again)."""
        for streamer in self._streamers.values():
            streamer.release_host_()
        self._streamers.clear()
        self._models.clear()
        self._merged_at_load = False
        self._captions = None
        gc.collect()

    # --- models ---------------------------------------------------------------------------

    def _stage_dtype(self, role: str) -> torch.dtype:
        return self.dtypes[self.family.component(role).stage]

    def _model(self, role: str):
        if role not in self._models:
            ctx = LoadContext(self._stage_dtype(role), self._schemes[role], "cpu", self.tokenizers)
            if role == self.family.dit.role:
                merge = self.lora_mode == "merge"
                self._merged_at_load = bool(self._loras) and merge and self._dit_mergeable()
                ctx.loras = self._loras if self._merged_at_load else ()
            self._models[role] = self._load_with_progress(role, ctx)
        return self._models[role]

    def _load_with_progress(self, role: str, ctx: LoadContext):
        """``family.load_component`` with ``progress("load:<role>", bytes read, bytes in the file)``."""
        from pascaline.formats.materialize import reading

        where = self.files.where(role)
        total = max(1, _source_bytes(where))
        done = [0]

        def heard(nbytes: int) -> None:
            done[0] += nbytes
            self._report(f"load:{role}", min(done[0], total), total)

        self._report(f"load:{role}", 0, total)
        with reading(heard):
            model = self.family.load_component(role, where, ctx)
        self._report(f"load:{role}", total, total)
        return model

    # --- LoRAs ----------------------------------------------------------------------------

    def _read_loras(self, loras) -> list:
        """``[(LoraFile, strength)]`` of ``loras`` (paths with strengths, or "path:strength")."""
        from pascaline.lora import read_lora
        from pascaline.runtime.options import normalize_loras

        out = []
        for path, strength in normalize_loras(loras):
            stamp = (path, Path(path).stat().st_mtime_ns)
            if stamp not in self._lora_files:
                self._lora_files[stamp] = read_lora(path)
            out.append((self._lora_files[stamp], strength))
        return out

    def _check_loras(self, loras: list) -> None:
        """Every LoRA key maps onto the diffusion model (checked on meta, before any weight is read)."""
        from pascaline.lora import resolve, weight_shapes

        if loras:
            meta = self.family.meta_dit(self.dit_config(), torch.float32)
            targets = self.family.lora_targets(weight_shapes(meta))
            for lora, _ in loras:
                resolve(lora, targets)

    def _dit_mergeable(self) -> bool:
        """A float safetensors source: LoRAs merge while it streams in (one rounding, no run-time cost)."""
        from pascaline.formats.safetensors_io import WeightSource
        from pascaline.quant.schemes import scheme_from_metadata

        where = self.files.where(self.family.dit.role).path
        if where.is_file() and where.suffix == ".gguf":
            return False
        with WeightSource(where) as source:
            return scheme_from_metadata(source.metadata) is None

    def set_loras(self, loras) -> None:
        """Replace the pipeline's LoRAs (``[(path, strength)]`` or ``["path:strength"]``) without
        reloading the base model: from now on they run as low-rank branches beside the weights
        (strengths change in place). A DiT that had LoRAs merged in while loading is read again once."""
        new = self._read_loras(loras)
        self._check_loras(new)
        if self._merged_at_load:
            self._drop_dit()
        self._loras, self.lora_mode = new, "branch"
        model = self._models.get(self.family.dit.role)
        if model is not None:
            model.__dict__["_pascaline_lora_key"] = None  # applied afresh before the next image

    def _drop_dit(self) -> None:
        role = self.family.dit.role
        streamer = self._streamers.pop("dit", None)
        if streamer is not None:
            streamer.release_host_()
        self._models.pop(role, None)
        gc.collect()

    def _use_loras(self, model, options: GenerateOptions) -> None:
        """The pipeline's LoRAs (unless merged at load) and the image's own, as the model runs them."""
        from pascaline.lora import apply_loras_, lora_state, remove_loras_

        image = self._read_loras(options.loras)
        own = [] if self._merged_at_load else self._loras
        key = tuple((lora.path, s) for lora, s in own + image) + (self.lora_mode,)
        if model.__dict__.get("_pascaline_lora_key", ()) == key or (not own and not image and
                                                                      lora_state(model) is None):
            return
        streamer = self._streamers.pop("dit", None)  # the blocks' tensors change: pack them afresh
        if streamer is not None:
            streamer.release_host_()
        if lora_state(model) is not None:
            remove_loras_(model)
        if own:  # merge: float layers merged, quantized ones as branches (a pre-quantized or GGUF file)
            mode = "auto" if self.lora_mode == "merge" else "branch"
            apply_loras_(model, own, self.family.lora_targets, mode=mode)
        if image:
            apply_loras_(model, image, self.family.lora_targets, mode="branch")
        model.__dict__["_pascaline_lora_key"] = key

    def lora_records(self, options: GenerateOptions) -> list[dict]:
        """``[{name, hash, strength, file}]`` of every LoRA an image made with ``options`` ran with."""
        from pascaline.lora import lora_records

        return lora_records(self._loras + self._read_loras(options.loras))

    def host_needs(self) -> dict[str, int]:
        """Estimated host bytes of each model not loaded yet, as it will be loaded (a GGUF model:
        the bytes of its skeleton, the GGUF blocks and every tensor it widens)."""
        from pascaline.offload.plan import module_nbytes

        def need(role: str) -> int:
            if role in self._gguf:
                return module_nbytes(self._gguf_skeleton(role))
            return estimated_host_bytes(self.files.where(role), self._stage_dtype(role),
                                        self._schemes[role] is not None)  # fmt: skip

        return {role: need(role) for role in self.files.roles if role not in self._models}

    def _gguf_skeleton(self, role: str):
        """The GGUF model of ``role`` on ``meta``, as it will be loaded."""
        where = self.files.where(role)
        return self.family.gguf_skeleton(role, where, self._stage_dtype(role), self._schemes[role])

    def _check_host_ram(self, skip_encoders: bool = False) -> None:
        """Refuse a run that would exhaust the RAM available now, before any weight is read.

        Models not loaded yet are needed one at a time, or all together when they are kept;
        ``skip_encoders``: the run's conditionings are at hand, so no encoder loads.
        """
        available = _available_ram()
        if available is None:
            return
        needs = self.host_needs()
        if skip_encoders:
            needs = {role: n for role, n in needs.items() if role not in self.family.encoder_roles}
        need = sum(needs.values()) if self.keep_loaded else max(needs.values(), default=0)
        if need <= available:
            return
        from pascaline.errors import HostMemoryError

        largest = max(needs, key=needs.get)
        quant, gtype = self._schemes[largest], self._gguf.get(largest)
        label = self.family.component(largest).label
        what = quant or (f"gguf {gtype}" if gtype else str(self._stage_dtype(largest)).removeprefix("torch."))
        held = "the models kept together" if self.keep_loaded else f"the {label} ({what})"
        counted = [r for r in (needs if self.keep_loaded else [largest]) if r not in self._gguf]
        quantized = sum(estimated_host_bytes(self.files.where(r), self._stage_dtype(r),
                                             self.family.component(r).quantized)
                        for r in counted)  # fmt: skip
        hint = ("" if quant or gtype or quantized >= need
                else f"; with --quant w8a8 that is about {format_bytes(quantized)}")
        raise HostMemoryError(
            f"{held} would need about {format_bytes(need)} of RAM but only {format_bytes(available)} is "
            f"available; close other programs{hint}."
        )

    @contextmanager
    def _loaded(self, role: str):
        """The component's model for one stage; dropped afterwards unless kept in host RAM."""
        try:
            yield self._model(role)
        finally:
            if not self.keep_loaded:
                self._models.pop(role, None)
                gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _report(self, phase: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(phase, done, total)

    @contextmanager
    def _placed(self, module, name: str, activation_bytes: int, ledger, report: GenerationReport | None):
        """``module`` on the device for the stage: resident, or with its units streamed.

        A model kept between calls keeps its streamer too (``keep_host``): its streamed blocks
        stay packed in pinned host memory, so the next call pins and copies nothing on the host.
        """
        from pascaline.offload.plan import plan_for_model
        from pascaline.offload.streamer import BlockStreamer

        plan = plan_for_model(module, self.budget_bytes, activation_bytes, self.prefetch)
        if report is not None:
            report.plans[name] = plan.describe()
        streamer = self._streamers.pop(name, None)
        if streamer is not None and (streamer.model is not module or not self.keep_loaded):
            streamer.release_host_()
            streamer = None
        if streamer is None:
            streamer = BlockStreamer(module, plan, self.device, ledger=ledger, name=name,
                                     keep_host=self.keep_loaded)  # fmt: skip
        streamer.ledger = ledger
        streamer.attach_(plan)
        if self.keep_loaded:
            self._streamers[name] = streamer
        try:
            yield plan
        finally:
            streamer.detach_()

    def dit_config(self):
        """The diffusion model's config, read from its file's shapes once."""
        if self._dit_config is None:
            self._dit_config = self.family.dit_config(self.files.where(self.family.dit.role))
        return self._dit_config

    def _check_dit_fits(self, options: GenerateOptions) -> None:
        """Plan the diffusion model on ``meta`` before the encoder runs, so a budget too small fails first."""
        size = (options.width, options.height)
        if size in self._fits:
            return
        self.family.check_size(self.dit_config(), *size)
        if self.budget_bytes is not None:
            self.plan_dit(*size)  # raises BudgetError
        self._fits.add(size)

    def plan_dit(self, width: int, height: int, cond_tokens: int | None = None, batch: int = 1):
        """The diffusion model's ``OffloadPlan`` at ``width x height``, planned on ``meta`` from its
        file's header (a GGUF's skeleton, blocks and dequantization workspace counted) before any
        weight is read; ``cond_tokens`` defaults to the shortest conditioning (a longer one only
        adds its tokens to the real plan's estimate). Raises ``BudgetError`` like the real plan."""
        from pascaline.runtime.memory import plan_dit

        cfg, role = self.dit_config(), self.family.dit.role
        skeleton = self._gguf_skeleton(role) if role in self._gguf else None
        tokens = self.family.min_cond_tokens(cfg) if cond_tokens is None else cond_tokens
        return plan_dit(self.family, cfg, self.dtypes["dit"], self._schemes[role], width, height, tokens,
                        self.budget_bytes, self.prefetch, batch, model=skeleton)  # fmt: skip

    # --- stages ---------------------------------------------------------------------------

    def _prompts(self, options: GenerateOptions) -> list[str]:
        """The prompts the encoders run: the positive, then the negative when guidance needs one."""
        if options.cfg == 1.0:
            return [options.prompt]
        if options.negative_prompt:
            return [options.prompt, options.negative_prompt]
        # without a negative prompt: the empty prompt encoded, or nothing (the sampler zeroes the positive)
        return [options.prompt, ""] if options.negative_mode == "empty" else [options.prompt]

    def _cached_conds(self, options: GenerateOptions) -> list | None:
        """The conditionings of ``options``' prompts when no encoder needs to run for them."""
        key = tuple(self._prompts(options))
        if key in self._held:
            return self._held[key]
        if self._captions is not None and self._captions[0] == key:
            return self._captions[1]  # same prompts as the last call
        return None

    def _encode_stage(self, options: GenerateOptions, ledger, report) -> list:
        conds = self._cached_conds(options)
        if conds is not None:
            return conds  # no encoder stage at all
        key = tuple(self._prompts(options))
        conds = self._run_encoders([key], ledger, report)[key]
        self._captions = (key, conds)
        return conds

    def _run_encoders(self, keys: Sequence[tuple], ledger, report) -> dict[tuple, list]:
        """One encoder stage: each text encoder loaded and placed once, run on every prompt list of
        ``keys`` in turn (each list as ``generate`` runs it), then freed."""
        roles = [r for r in self.family.encoder_roles if r in self.files.located]
        outputs: dict[tuple, dict[str, list]] = {key: {} for key in keys}
        self.encoder_stages += 1
        with ledger.stage("encoder"):
            self._report("encode", 0, len(roles))
            for i, role in enumerate(roles):
                with self._loaded(role) as encoder:
                    act = max(self.family.encoder_activation_bytes(role, encoder, key, self.dtypes["encoder"],
                                                                   self._schemes[role]) for key in keys)
                    act += dequant_workspace_bytes(encoder.model, self.dtypes["encoder"])
                    with self._placed(encoder.model, role, act, ledger, report):
                        for key in keys:
                            outputs[key][role] = self.family.encode(role, encoder, key)
                self._report("encode", i + 1, len(roles))
        return {key: self.family.assemble(outputs[key], len(key), self.dit_config()) for key in keys}

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

    def _cfg_batch(self, model, options: GenerateOptions, conds: list, act_one: int, act_two: int) -> bool:
        """Whether positive and negative run as one batch of 2: when the family allows it and the
        batch-2 plan streams at most twice the bytes of two batch-1 passes (one pass, not two)."""
        from pascaline.offload.plan import plan_for_model

        if options.cfg == 1.0 or self.batch_cfg is False:
            return False
        if self.batch_cfg is True:
            return True
        if not self.family.cfg_batching:
            return False
        from pascaline.runtime.memory import cfg_batch_pays

        one = plan_for_model(model, self.budget_bytes, act_one, self.prefetch)
        try:
            two = plan_for_model(model, self.budget_bytes, act_two, self.prefetch)
        except BudgetError:
            two = None
        return cfg_batch_pays(one, two)

    def _dit_stage(self, options, conds, init, ledger, report, callback) -> torch.Tensor:
        noise = sampling.initial_noise(options.seed, options.height, options.width,
                                       channels=self.family.latent.channels)  # fmt: skip
        role = self.family.dit.role
        dtype, quant = self.dtypes["dit"], self._schemes[role]
        with ledger.stage("dit"), self._loaded(role) as model:
            self._use_loras(model, options)  # before planning: branch tensors stream with their blocks
            tokens = max(self.family.cond_tokens(c) for c in conds)
            size = (options.width, options.height)
            workspace = dequant_workspace_bytes(model, dtype)  # 0 unless GGUF blocks are kept
            act = [workspace + self.family.dit_activation_bytes(model.config, *size, tokens, dtype, quant, b)
                   for b in (1, 2)]
            batch = self._cfg_batch(model, options, conds, *act)
            report.cfg_batched = batch
            with self._placed(model, "dit", act[1] if batch else act[0], ledger, report):
                latent = self._sample(model, noise, conds, init, options, report, callback, batch)
        return latent

    def _guidance(self, model, options: GenerateOptions):
        """SD3.5's skip-layer guidance for this run, or None."""
        if not (options.slg_scale and options.slg_layers):
            return None
        start = sampling.percent_to_sigma(options.slg_start, options.shift)
        end = sampling.percent_to_sigma(options.slg_end, options.shift)
        skip_fn = self.family.model_fn(model, options.slg_layers)
        return sampling.SkipLayerGuidance(skip_fn, options.slg_scale, start, end)

    def _sample(self, model, noise, conds, init, options, report, callback, batch: bool) -> torch.Tensor:
        """The sampler on the device; everything it put there is gone when it returns."""

        def on_step(step: int, total: int, sigma: float, latent: torch.Tensor):
            self._report("steps", step, total)
            return None if callback is None else callback(step, total, sigma, latent)

        dtype, family = self.dtypes["dit"], self.family
        cond = [family.cond_to(conds[0], self.device, dtype)]
        negative = [family.cond_to(conds[1], self.device, dtype)] if len(conds) > 1 else None
        self._report("steps", 0, options.steps)
        start = time.perf_counter()
        latent = sampling.sample(
            family.model_fn(model), noise.to(self.device), cond, steps=options.steps, shift=options.shift,
            sampler=options.sampler, scheduler=family.schedulers[options.scheduler], negative=negative,
            cfg=options.cfg, blind_start=options.blind_start, denoise=options.denoise, callback=on_step,
            init_latent=None if init is None else init.to(self.device), dtype=dtype,
            prediction=family.prediction, batch_cfg=batch, slg=self._guidance(model, options),
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

        return to_pil(images, rounding=options.rounding)[0]

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


def _config_difference(a, b) -> str:
    """``"dim 3840 vs 2560"``: the first field two model configs (dataclasses) differ in."""
    from dataclasses import fields

    name = next((f.name for f in fields(a) if getattr(a, f.name) != getattr(b, f.name)), None)
    return "another config" if name is None else f"{name} {getattr(a, name)} vs {getattr(b, name)}"


# ---------------------------------------------------------------------------- loading


def _probe(device: str, caps: DeviceCaps | None) -> DeviceCaps:
    from pascaline.runtime.device import check_torch_supports

    caps = caps or DeviceCaps.probe(device)
    check_torch_supports(caps)
    return caps


def _decide_keep(keep_loaded: bool | str, pipe: Pipeline) -> bool:
    if keep_loaded != "auto":
        return bool(keep_loaded)
    available = _available_ram()
    if available is None:
        return False
    return sum(pipe.host_needs().values()) <= KEEP_LOADED_SHARE * available


def _family_and_variant(model: str | None, models, dit) -> tuple[Family, Variant | None]:
    from pascaline.families import resolve_variant
    from pascaline.runtime.discovery import choose_family

    if model is not None:
        return resolve_variant(model)
    return choose_family(models, dit), None


def _check_without(family: Family, without: tuple[str, ...]) -> tuple[str, ...]:
    optional = [c.role for c in family.components if c.optional]
    for role in without:
        if role not in optional:
            names = ", ".join(optional) or "none"
            raise InvalidArgumentError(
                f"{family.label} has no {role} to leave out (its optional components: {names}).")
    return tuple(without)


def load_pipeline(
    models: str | Path | None = None,
    *,
    model: str | None = None,
    dit: str | Path | None = None,
    text_encoder: str | Path | None = None,
    vae: str | Path | None = None,
    components: dict[str, str | Path] | None = None,
    without: tuple[str, ...] = (),
    tokenizer=None,
    device: str = "auto",
    vram_budget: str | int | None = "auto",
    quant: str | None = "auto",
    dtype: str | torch.dtype | None = None,
    progress: Progress | None = None,
    keep_loaded: bool | str = "auto",
    prefetch: int = 1,
    batch_cfg: bool | str = "auto",
    loras=(),
    lora_mode: str = "merge",
    caps: DeviceCaps | None = None,
) -> Pipeline:
    """A ready ``Pipeline`` for the model files in ``models`` (or given one by one).

    ``models``: a ComfyUI ``models/`` folder (the right files are picked by content) or a
    diffusers snapshot. ``model``: a variant name (``"z-image-turbo"``, ``"sd3.5-large"``, ...)
    that picks the family and the default settings; left out, the folder's (or ``dit``'s) one
    family is used, with the variant that suits its diffusion model. ``dit``, ``text_encoder``,
    ``vae`` and ``components`` (``{"clip_l": path, ...}``) override single parts; ``without``
    leaves optional parts out (``("t5",)``); ``tokenizer``: a tokenizer folder or object.
    ``device``: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
    ``vram_budget``: ``"auto"`` (the card's VRAM minus a desktop headroom; no limit on the
    CPU), a size such as ``"7GiB"``, or None for no limit. ``quant``: ``"auto"`` (the device
    policy: int8 on 8 GB cards, none on the CPU), ``"none"``, ``"int8"``, ``"w8a8"``,
    ``"fp8-e4m3"``, ``"fp8-e5m2"``. ``dtype`` overrides the compute dtype of the diffusion model
    and the encoders. ``keep_loaded``: keep the models in host RAM between calls (``"auto"``:
    when they take at most half the available RAM). ``batch_cfg``: run guidance's two branches
    as one batch (``"auto"``: when the budget allows). ``loras``: ``[(path, strength)]`` (or
    ``"path:strength"``) for every image; ``lora_mode="merge"`` merges them into the weights while
    the diffusion model loads (one rounding, no run-time cost; a pre-quantized or GGUF file runs
    them as branches), ``"branch"`` runs them as low-rank branches (``pipe.set_loras`` and per-image
    ``loras`` always do). ``progress(phase, done, total)`` hears of loading, encoding, steps and
    decoding. ``caps`` replaces the device probe.
    """
    caps = _probe(device, caps)
    budget = resolve_budget(vram_budget, caps)
    quant_name = resolve_quant(quant, caps)
    family, variant = _family_and_variant(model, models, dit)
    explicit = {"dit": dit, "text_encoder": text_encoder, "vae": vae, **(components or {})}
    files = find_model_files(models, family=family, tokenizer=tokenizer, quant=quant_name,
                             skip=_check_without(family, tuple(without)), **explicit)  # fmt: skip
    pipe = Pipeline(
        files, caps, budget_bytes=budget, quant=quant_name, quant_is_auto=quant == "auto",
        dtypes=stage_dtypes(caps, parse_dtype(dtype)), keep_loaded=False,
        variant=variant, progress=progress, prefetch=prefetch, batch_cfg=batch_cfg, loras=loras,
        lora_mode=lora_mode,
    )  # fmt: skip
    pipe.tokenizers = family.load_tokenizers(files, tokenizer)  # after the files' schemes are checked
    if variant is None:
        pipe.variant = family.variant(family.guess_variant(pipe.dit_config()))
    pipe._check_loras(pipe._loras)
    if quant == "auto" and quant_name is None:
        pipe = _quantized_if_short_of_ram(pipe, models, tokenizer, without, explicit)
    pipe.keep_loaded = _decide_keep(keep_loaded, pipe)
    return pipe.load_() if pipe.keep_loaded else pipe


def _quantized_if_short_of_ram(pipe: Pipeline, models, tokenizer, without, explicit) -> Pipeline:
    """``--quant auto`` where the device policy quantizes nothing (the CPU, a large card): when a
    component would not fit in the RAM available unquantized, run int8 weights instead (a
    pre-quantized file beside the float one first), and say why in ``pipe.notes``."""
    available = _available_ram()
    needs = pipe.host_needs()
    if available is None or not needs or max(needs.values()) <= available:
        return pipe
    role = max(needs, key=needs.get)
    files = find_model_files(models, family=pipe.family, tokenizer=tokenizer, quant="int8",
                             skip=tuple(without), **explicit)  # fmt: skip
    quantized = Pipeline(
        files, pipe.caps, budget_bytes=pipe.budget_bytes, quant="int8", quant_is_auto=True,
        dtypes=pipe.dtypes, keep_loaded=False, variant=pipe.variant, tokenizers=pipe.tokenizers,
        progress=pipe.progress, prefetch=pipe.prefetch, batch_cfg=pipe.batch_cfg, loras=(),
        lora_mode=pipe.lora_mode,
    )  # fmt: skip
    quantized._loras, quantized._lora_files = pipe._loras, pipe._lora_files
    label = pipe.family.component(role).label
    dtype = str(pipe._stage_dtype(role)).removeprefix("torch.")
    picked = [f"{files.where(r).path.name}" for r in files.roles
              if files.where(r).path != pipe.files.where(r).path]  # fmt: skip
    also = f", using the pre-quantized {', '.join(picked)}" if picked else ""
    quantized.notes.append(
        f"--quant auto picked int8 weights: the {label} in {dtype} would need about "
        f"{format_bytes(needs[role])} of RAM and {format_bytes(available)} is available{also}."
    )
    return quantized
