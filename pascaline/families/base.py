"""What the rest of the runtime knows of a model family, declared in one place per family.

A family (Z-Image; SD3/SD3.5) says:
- its components (``Component``): the diffusion model, one or more text encoders, the VAE;
  which tensor kinds fit each (``formats.detect`` kinds), where a ComfyUI folder or a
  diffusers snapshot keeps them, which stage runs them and whether they may be left out;
- its latent format (channels, the VAE's scale and shift) and its prediction convention
  (the timestep the model is fed for a noise level σ, and the sign of its output);
- its named variants with their default settings (``Defaults``) and published configs;
- hooks (methods) that load a component, tokenize and encode prompts, assemble the
  conditioning, call the diffusion model, estimate activation bytes for the plans, and
  build a GGUF component on ``meta`` from its header (``gguf_skeletons``).

Everything else (discovery, the staged pipeline, the samplers, quantization, streaming,
``info``, the bench, the PNG metadata) works from this declaration, so a new family adds
its own files (``families/<name>.py`` plus its models and formats) and no shared module
grows an ``if family == ...`` branch. ``families.__init__`` finds families by scanning this
package.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pascaline.errors import InvalidArgumentError
from pascaline.runtime.sampling import Prediction  # noqa: F401 - part of a family's declaration

STAGES = ("encoder", "dit", "vae")
NEGATIVE_MODES = ("zero", "empty")


@dataclass(frozen=True)
class LatentFormat:
    """The diffusion model's latents: ``model latent = (VAE latent - shift) * scale``."""

    channels: int
    scale: float
    shift: float


@dataclass(frozen=True)
class Defaults:
    """A variant's default settings: what ``generate`` uses for every option left unset."""

    steps: int
    cfg: float
    shift: float
    sampler: str
    scheduler: str
    width: int = 1024
    height: int = 1024
    # the unconditional branch without a negative prompt: "zero" = ComfyUI's ConditioningZeroOut
    # of the positive (Z-Image's template), "empty" = the empty prompt encoded (SD3's examples)
    negative: str = "zero"
    slg_layers: tuple[int, ...] = ()
    slg_scale: float = 0.0
    slg_start: float = 0.01
    slg_end: float = 0.2

    def __post_init__(self):
        if self.negative not in NEGATIVE_MODES:
            raise ValueError(f"negative mode {self.negative!r} is not one of {NEGATIVE_MODES}")


@dataclass(frozen=True)
class Variant:
    """A named model of the family (``z-image-turbo``, ``sd3.5-large``...) and its defaults."""

    name: str
    label: str
    defaults: Defaults
    dit_config: Any  # the published diffusion-model config, for ``info`` and the bench
    source: str = ""  # where the defaults come from, for the README and ``models``


@dataclass(frozen=True)
class Component:
    """One part of a family's model: how it is recognised and where it is looked for."""

    role: str  # "dit", "text_encoder", "clip_l", ...; the key in metadata and ModelFiles
    label: str  # "Z-Image DiT", for messages
    kinds: tuple[str, ...]  # formats.detect kinds that fit this role
    stage: str  # "encoder" | "dit" | "vae": the compute-dtype policy and the stage it runs in
    folders: tuple[str, ...]  # ComfyUI sub-folders searched (recursively)
    diffusers: str | None  # the sub-folder of a diffusers snapshot
    optional: bool = False  # may be left out (SD3's T5: --no-t5)
    quantized: bool = True  # follows the run's quantization scheme

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"component stage {self.stage!r} is not one of {STAGES}")


@dataclass(frozen=True)
class Located:
    """Where a component's tensors are: a file or folder, and their key prefix in it ("" = none).

    A bundled checkpoint holds several components under prefixes (``model.diffusion_model.``,
    ``first_stage_model.``, ``text_encoders.clip_l.transformer.``)."""

    path: Path
    prefix: str = ""

    def __str__(self) -> str:
        return str(self.path) if not self.prefix else f"{self.path} [{self.prefix}*]"


@dataclass
class LoadContext:
    """What a component loader needs beside the file: dtype, scheme, tokenizers, target device."""

    dtype: torch.dtype
    quant: str | None = None
    device: str | torch.device = "cpu"
    tokenizers: Mapping[str, Any] = field(default_factory=dict)
    loras: Sequence = ()  # [(LoraFile, strength)] the diffusion model merges while it loads


class Family:
    """Base of every family declaration; subclasses fill the class attributes and the hooks."""

    name: str = ""  # "zimage", "sd3"
    label: str = ""  # "Z-Image", "Stable Diffusion 3"
    components: tuple[Component, ...] = ()
    latent: LatentFormat
    # what the diffusion model is fed for σ and the sign that makes its output the sampler's F
    # (Z-Image: t = 1 - σ, +1; SD3: t = σ·1000, -1 for its velocity): see runtime.sampling
    prediction: Prediction
    cfg_batching: bool = True  # whether positive and negative may run as one batch of 2
    variants: Mapping[str, Variant] = {}
    default_variant: str = ""
    samplers: tuple[str, ...] = ("euler",)
    # user-facing scheduler name -> sampling.SCHEDULES name; the same name may mean another
    # schedule per family ("linear" = the diffusers pipeline's sigmas of that family)
    schedulers: Mapping[str, str] = {}
    supports_skip_layers: bool = False
    comfy = None  # runtime.comfy_workflow.ComfyNodes: the ComfyUI nodes of a PNG's workflow chunk

    # --- the declaration, derived -----------------------------------------------------------

    def component(self, role: str) -> Component:
        for c in self.components:
            if c.role == role:
                return c
        raise KeyError(role)

    @property
    def dit(self) -> Component:
        return next(c for c in self.components if c.stage == "dit")

    @property
    def encoder_roles(self) -> tuple[str, ...]:
        return tuple(c.role for c in self.components if c.stage == "encoder")

    def variant(self, name: str | None) -> Variant:
        """The variant called ``name`` (None: the family's default)."""
        name = name or self.default_variant
        if name not in self.variants:
            raise InvalidArgumentError(
                f"{self.label} has no variant {name!r}; choose one of {', '.join(self.variants)}."
            )
        return self.variants[name]

    def check_sampling(self, sampler: str, scheduler: str) -> None:
        if sampler not in self.samplers:
            raise InvalidArgumentError(
                f"unknown sampler {sampler!r} for {self.label}; choose one of {', '.join(self.samplers)}."
            )
        if scheduler not in self.schedulers:
            known = ", ".join(self.schedulers)
            raise InvalidArgumentError(
                f"unknown scheduler {scheduler!r} for {self.label}; choose one of {known}.")

    def check_skip_layers(self, config, layers) -> None:
        """Refuse skip-layer guidance on ``layers`` that the diffusion model of ``config`` does not have
        (here: any, unless ``supports_skip_layers``; a family that has them also checks the numbers)."""
        if not self.supports_skip_layers:
            raise InvalidArgumentError(
                f"skip-layer guidance is an SD3.5 option; {self.label} has no skip layers.")

    def check_size(self, config, width: int, height: int) -> None:
        """Refuse an image size the diffusion model of ``config`` cannot place (default: any fits)."""

    # --- hooks every family implements --------------------------------------------------------

    def load_component(self, role: str, where: Located, ctx: LoadContext) -> Any:
        """The loaded component (a module, or an object with ``.model``) for ``role``."""
        raise NotImplementedError

    def load_tokenizers(self, files, explicit: str | Path | None) -> dict[str, Any]:
        """Tokenizers per encoder role, found offline (``explicit``: a folder the user named)."""
        raise NotImplementedError

    def dit_config(self, where: Located):
        """The diffusion model's config, from tensor shapes only (no tensor data is read)."""
        raise NotImplementedError

    def meta_dit(self, config, dtype: torch.dtype) -> nn.Module:
        """The diffusion model built on ``meta`` (for placement plans before any weight is read)."""
        raise NotImplementedError

    def dit_activation_bytes(self, config, width: int, height: int, cond_tokens: int, dtype, quant,
                             batch: int = 1) -> int:
        """Device bytes one forward of the diffusion model needs beside its weights."""
        raise NotImplementedError

    def min_cond_tokens(self, config) -> int:
        """The shortest conditioning the model sees (the plan made before encoding uses it)."""
        return 1

    def typical_cond_tokens(self, config) -> int:
        """The conditioning length of a typical prompt (``info`` and the bench plan with it)."""
        return self.min_cond_tokens(config)

    def encoder_activation_bytes(self, role: str, encoder, prompts: Sequence[str], dtype, quant) -> int:
        raise NotImplementedError

    def encode(self, role: str, encoder, prompts: Sequence[str]) -> list:
        """One output per prompt (on the CPU) from the encoder of ``role``."""
        raise NotImplementedError

    def assemble(self, outputs: Mapping[str, list], count: int, config) -> list:
        """The conditioning of each of ``count`` prompts from the encoders' outputs by role, for a
        diffusion model of ``config``."""
        raise NotImplementedError

    def cond_tokens(self, cond) -> int:
        """The token count of one prompt's conditioning (for the activation estimate)."""
        raise NotImplementedError

    def cond_to(self, cond, device, dtype):
        """One prompt's conditioning moved to the sampler's device and dtype."""
        raise NotImplementedError

    def model_fn(self, model: nn.Module, skip_layers: Sequence[int] = ()):
        """``fn(x [B,C,h,w], t [B], conds: list of B conditionings) -> raw output [B,C,h,w]``."""
        raise NotImplementedError

    def guess_variant(self, config) -> str:
        """The variant whose settings suit a diffusion model of ``config`` (a fine-tune included)."""
        return self.default_variant

    def lora_targets(self, shapes):
        """The family's LoRA key map over a diffusion model's ``{module: weight shape}``
        (``pascaline.lora.LoraTargets``): which trainer names land on which module and rows."""
        raise NotImplementedError

    def load_enhancer(self, files, ctx: LoadContext):
        """The language model that expands prompts (``generate --enhance``), or None when the
        family's text encoder is no complete LM (then enhancement is refused)."""
        return None


    def gguf_skeletons(self) -> Mapping[str, Any]:
        """``{role: fn(path, *, dtype, quant) -> model on meta}`` for every role whose kinds a GGUF can
        hold (``gguf.names.KINDS``): the loader's model built from the file's header alone."""
        return {}

    def gguf_skeleton(self, role: str, where: Located, dtype: torch.dtype, quant: str | None) -> nn.Module:
        """The model of ``role`` as ``load_component`` builds it from the GGUF file at ``where`` under
        ``quant`` (None: the GGUF blocks kept), on ``meta`` with its final module types and dtypes:
        what the VRAM plans and host-RAM estimates of a GGUF count (from ``gguf_skeletons``)."""
        build = self.gguf_skeletons().get(role)
        if build is None:
            raise NotImplementedError(f"{self.label} reads no GGUF file for its {role}")
        return build(where.path, dtype=dtype, quant=quant)

    def quantize_source(self, kind: str, path: Path):
        """``(WeightSource, meta model, tensors())`` of a file of ``kind`` for ``pascaline quantize``."""
        raise NotImplementedError
