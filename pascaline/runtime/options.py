"""The settings of one image (``GenerateOptions``) and the report of one run.

Options a caller leaves unset (``None``) take the variant's defaults when a pipeline runs
them (``GenerateOptions.resolved``): Z-Image Turbo's 8 steps at cfg 1 and SD3.5 Large's
40 steps at cfg 4.5 come from the family declarations, not from here. Every value given
is validated on construction, one sentence per mistake.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from pascaline.errors import InvalidArgumentError
from pascaline.runtime import sampling
from pascaline.runtime.sizing import validate_sampling, validate_size

OUTPUTS = ("pil", "tensor", "latent")
NEGATIVE_MODES = ("zero", "empty")
SEED_RANGE = 2**64
RANDOM_SEED_RANGE = 2**32  # random seeds stay short enough to type back
# options a variant's Defaults supply when left unset
DEFAULTED = ("width", "height", "steps", "sampler", "scheduler", "shift", "cfg", "slg_layers", "slg_scale",
             "slg_start", "slg_end")  # fmt: skip


def whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_fraction(name: str, value) -> None:
    if value is not None and (not number(value) or not 0 <= value <= 1):
        raise InvalidArgumentError(f"{name} must be a number from 0 to 1, not {value!r}.")


def normalize_loras(loras) -> tuple[tuple[str, float], ...]:
    """``[(path, strength)]`` or ``["path:strength"]`` (no strength: 1) as a tuple of (path, float)
    pairs; a missing file or a strength that is no finite number is one sentence."""
    from pascaline.lora.files import parse_lora_spec

    if loras is None:
        return ()
    if isinstance(loras, (str, Path)) or not isinstance(loras, (list, tuple)):
        raise InvalidArgumentError(f"loras must be a list of LoRA files (with strengths), not {loras!r}.")
    out = []
    for item in loras:
        if isinstance(item, (str, Path)):
            path, strength = parse_lora_spec(str(item))
        elif isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], (str, Path)):
            path, strength = Path(item[0]).expanduser(), item[1]
        else:
            raise InvalidArgumentError(f"a LoRA is a file and a strength, such as style.safetensors:0.8, not "
                                       f"{item!r}.")
        if not number(strength):
            raise InvalidArgumentError(f"LoRA strength {strength!r} of {path} is not a finite number.")
        if not Path(path).is_file():
            raise InvalidArgumentError(f"LoRA file {path} does not exist; check the path.")
        out.append((str(path), float(strength)))
    return tuple(out)


@dataclass(frozen=True)
class GenerateOptions:
    """Every setting of one image; validated on construction (one sentence per mistake).

    ``None`` means "the variant's default" (``seed=None``: a random seed when generating);
    ``init_image`` is a path or a ``[1, 3, H, W]`` tensor in [-1, 1] and is needed for
    ``denoise < 1``. ``negative_mode``: without a negative prompt, the unconditional branch
    is the zeroed positive (``"zero"``, ComfyUI's ConditioningZeroOut: Z-Image's template) or
    the empty prompt encoded (``"empty"``: SD3's examples); None = the family's choice; a
    negative prompt, when given, is always encoded. ``slg_*``: SD3.5's skip-layer guidance (the
    blocks skipped, the scale, and the window as fractions of the timestep range). ``rounding``
    is the 8-bit rule of a PIL image: ``"comfyui"`` (ComfyUI's pixels) or ``"round"`` (diffusers').
    ``enhance`` expands the prompt with the family's language model first (Z-Image's Qwen3-4B),
    greedily, or by seeded sampling with ``enhance_seed``. ``loras``: LoRAs for this image only,
    ``[(path, strength)]`` or ``["path:strength"]`` (run as low-rank branches beside the weights,
    so they change between images without reloading; ``load_pipeline(loras=...)`` merges fixed ones).
    """

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    seed: int | None = None
    sampler: str | None = None
    scheduler: str | None = None
    shift: float | None = None
    cfg: float | None = None
    blind_start: int = 0
    init_image: str | Path | torch.Tensor | None = None
    denoise: float = 1.0
    output: str = "pil"
    negative_mode: str | None = None
    slg_layers: tuple[int, ...] | None = None
    slg_scale: float | None = None
    slg_start: float | None = None
    slg_end: float | None = None
    rounding: str = "comfyui"
    enhance: bool = False
    enhance_seed: int | None = None
    loras: tuple = ()

    def __post_init__(self):
        if not isinstance(self.prompt, str):
            raise InvalidArgumentError(f"the prompt must be text, not {type(self.prompt).__name__}.")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            kind = type(self.negative_prompt).__name__
            raise InvalidArgumentError(f"the negative prompt must be text, not {kind}.")
        if self.width is not None or self.height is not None:
            validate_size(self.width or 1024, self.height or 1024)
        # the limits of runtime/sizing.py (unset values are the variant's, within them)
        validate_sampling(1 if self.steps is None else self.steps, 1.0 if self.cfg is None else self.cfg,
                          self.denoise)  # fmt: skip
        if self.seed is not None and (not whole(self.seed) or not 0 <= self.seed < SEED_RANGE):
            raise InvalidArgumentError(
                f"seed {self.seed!r} is out of range; use a whole number from 0 to 2**64-1."
            )
        self._check_sampling()
        if self.shift is not None and (not number(self.shift) or self.shift <= 0):
            raise InvalidArgumentError(f"shift must be a positive number, not {self.shift!r}.")
        self.check_blind_start()
        self._check_img2img()
        if self.output not in OUTPUTS:
            raise InvalidArgumentError(
                f"output {self.output!r} is unknown; choose one of {', '.join(OUTPUTS)}."
            )
        self._check_guidance()
        object.__setattr__(self, "loras", normalize_loras(self.loras))
        if not isinstance(self.enhance, bool):
            raise InvalidArgumentError(f"enhance must be true or false, not {self.enhance!r}.")
        seed = self.enhance_seed
        if seed is not None and (not whole(seed) or not 0 <= seed < SEED_RANGE):
            raise InvalidArgumentError(f"enhance seed {seed!r} is out of range; use a whole number "
                                       "from 0 to 2**64-1.")
        from pascaline.formats.flux_vae import ROUNDINGS

        if self.rounding not in ROUNDINGS:
            raise InvalidArgumentError(
                f"rounding {self.rounding!r} is unknown; choose one of {', '.join(ROUNDINGS)}."
            )

    def check_blind_start(self) -> None:
        steps, k = self.steps, self.blind_start
        if not whole(k) or k < 0 or (steps is not None and k >= steps):
            top = "steps - 1" if steps is None else f"steps - 1 ({steps - 1})"
            raise InvalidArgumentError(f"blind start must be a whole number from 0 to {top}, not {k!r}.")

    def _check_sampling(self) -> None:
        if self.sampler is not None:
            sampling.get_sampler(self.sampler)
        if self.scheduler is not None:
            from pascaline.families import all_families

            known = sorted({name for f in all_families() for name in f.schedulers})
            if self.scheduler not in known:
                raise InvalidArgumentError(
                    f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(known)}."
                )

    def _check_img2img(self) -> None:
        if not number(self.denoise) or not 0 < self.denoise <= 1:
            raise InvalidArgumentError(f"denoise must be above 0 and at most 1, not {self.denoise!r}.")
        if self.denoise < 1 and self.init_image is None:
            raise InvalidArgumentError(
                f"denoise {self.denoise} needs an init image; give one, or set denoise 1."
            )
        if isinstance(self.init_image, (str, Path)) and not Path(self.init_image).is_file():
            raise InvalidArgumentError(f"init image {self.init_image} does not exist; check the path.")

    def _check_guidance(self) -> None:
        if self.negative_mode is not None and self.negative_mode not in NEGATIVE_MODES:
            raise InvalidArgumentError(
                f"negative mode {self.negative_mode!r} is unknown; use {' or '.join(NEGATIVE_MODES)}."
            )
        layers = self.slg_layers
        if layers is not None and (not isinstance(layers, (tuple, list)) or not all(whole(i) and i >= 0
                                                                                    for i in layers)):
            raise InvalidArgumentError(f"skip-layer guidance layers must be block numbers such as 7,8,9, not "
                                       f"{self.slg_layers!r}.")
        if self.slg_scale is not None and (not number(self.slg_scale) or self.slg_scale < 0):
            raise InvalidArgumentError(
                f"the skip-layer guidance scale must be 0 or more, not {self.slg_scale!r}.")
        _check_fraction("the skip-layer guidance start", self.slg_start)
        _check_fraction("the skip-layer guidance end", self.slg_end)
        if self.slg_start is not None and self.slg_end is not None and self.slg_start > self.slg_end:
            raise InvalidArgumentError(f"skip-layer guidance starts ({self.slg_start}) after it ends "
                                       f"({self.slg_end}); the start must come first.")

    def with_seed(self, seed: int | None = None) -> GenerateOptions:
        """The same options with ``seed`` (a random one when None and none is set)."""
        if seed is None:
            seed = self.seed if self.seed is not None else secrets.randbelow(RANDOM_SEED_RANGE)
        return replace(self, seed=seed)

    def resolved(self, defaults) -> GenerateOptions:
        """Every option the caller left unset taken from ``defaults`` (a family's ``Defaults``)."""
        filled = {k: getattr(defaults, k) for k in DEFAULTED if getattr(self, k) is None}
        if self.negative_mode is None:
            filled["negative_mode"] = defaults.negative
        layers = filled.get("slg_layers", self.slg_layers)
        if layers is not None:
            filled["slg_layers"] = tuple(layers)
        return replace(self, **filled)

    def explicit(self) -> dict[str, Any]:
        """The options that were given (not None), for requests and logs."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


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
    cfg_batched: bool = False

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
