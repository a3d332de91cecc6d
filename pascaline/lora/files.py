"""Read a LoRA file of any trainer into one form: named modules, each ``down``/``up``/``scale``.

The tensor names of the formats in the wild (sd3-family.md §7.1, §7.3) all end in a role:

- diffusers / PEFT: ``{m}.lora_A.weight`` [r, in], ``{m}.lora_B.weight`` [out, r], with a PEFT
  adapter name in between (``.lora_B.default.weight``, DiffSynth) or not; alpha from the
  ``lora_adapter_metadata`` JSON of the safetensors header (``lora_alpha``, ``alpha_pattern``,
  ``use_rslora``; keys optionally prefixed ``transformer.``), else alpha = rank;
- kohya / musubi / OneTrainer / LyCORIS: ``{m}.lora_down.weight``, ``{m}.lora_up.weight``,
  ``{m}.alpha``;
- ``{m}.lora.down.weight`` (Anime-Z), ``{m}_lora.down.weight``, ``{m}.lora_linear_layer.down.weight``.

Modules are joined across spellings by their underscore form, so an alpha stored as
``to_q.alpha`` next to weights under ``to.q.lora.down.weight`` (Anime-Z) finds its pair.
``scale = alpha / rank`` (``alpha / sqrt(rank)`` for rsLoRA), 1 without an alpha; the strength
multiplies it when the LoRA is applied. Which model module a name means is the family key
map's business (``pascaline.lora.keys``); this file knows no model.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from pascaline.errors import InvalidArgumentError, LoraError
from pascaline.formats.detect import describe
from pascaline.formats.safetensors_io import WeightSource

METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry
_DOWN_UP = re.compile(
    r"(?P<m>.+?)(?:\.lora_|\.lora\.|_lora\.|\.lora_linear_layer\.)"
    r"(?P<role>down|up)\.weight"
)
_PEFT = re.compile(r"(?P<m>.+?)\.lora_(?P<role>[AB])(?:\.(?P<adapter>[\w-]+))?\.weight")
_ALPHA = re.compile(r"(?P<m>.+?)\.alpha")
# adapter kinds that are not a plain low-rank product: refused by name, never half-applied
_OTHER_KINDS = (
    (re.compile(r"\.(dora_scale|lora_magnitude_vector)\b"), "DoRA"),
    (re.compile(r"\.hada_"), "LoHa"),
    (re.compile(r"\.lokr_"), "LoKr"),
    (re.compile(r"\.lora_mid\."), "LoCon with a Tucker core (lora_mid)"),
    (re.compile(r"\.(oft_|boft_)"), "OFT"),
    (re.compile(r"\.ia3_"), "IA3"),
    (re.compile(r"\.(lora_B|lora_up)\.bias$"), "LoRA with bias terms"),
    (re.compile(r"\.(diff|diff_b|w_norm|b_norm|reshape_weight)$"), "full-weight difference"),
)
# module-name prefixes of text-encoder parts (kohya lora_te*, diffusers text_encoder*)
_TEXT_ENCODER = re.compile(r"(lora_te\d?_|text_encoders?(_\d)?[._]|te\d?\.)")


@dataclass(frozen=True, eq=False)
class LoraModule:
    """One adapted module as the file stores it: ``delta = scale * up @ down``."""

    name: str  # the file's spelling of the module, e.g. "lora_unet_layers_0_attention_to_q"
    down: torch.Tensor  # [r, in] (a convolution: [r, in, kh, kw])
    up: torch.Tensor  # [out, r] (a convolution: [out, r, 1, 1])
    alpha: float | None
    scale: float  # alpha / rank; 1 without an alpha

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True, eq=False)
class LoraFile:
    """A LoRA read by ``read_lora``: its diffusion-model modules and any text-encoder modules."""

    path: Path
    modules: dict[str, LoraModule]
    text_encoder_modules: dict[str, LoraModule] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The file name without its suffix: what A1111's ``<lora:name:0.8>`` calls it."""
        return self.path.stem

    @property
    def nbytes(self) -> int:
        mods = [*self.modules.values(), *self.text_encoder_modules.values()]
        return sum(m.down.nbytes + m.up.nbytes for m in mods)

    @cached_property
    def sha256(self) -> str:
        """SHA-256 of the tensor data after the header (A1111's and Civitai's "AutoV3" LoRA hash)."""
        return safetensors_data_sha256(self.path)

    @property
    def short_hash(self) -> str:
        return self.sha256[:12]


def read_lora(path: str | Path) -> LoraFile:
    """Read a LoRA safetensors file of any supported format (see the module docstring).

    Raises ``LoraError`` (one sentence) for a file that holds no LoRA (a checkpoint given
    as a LoRA), an adapter kind that is not plain LoRA (DoRA, LoHa, LoKr, ...), a module
    with only half of its pair, or tensors that belong to no LoRA module; a truncated or
    non-safetensors file raises the ``WeightsError`` of the safetensors reader.
    """
    source = WeightSource(path)
    keys = source.keys()
    _refuse_other_kinds(source.path, keys)
    parts, alphas, stray = _split_roles(keys)
    if not parts:
        raise LoraError(
            f"{source.path} holds no LoRA tensors (lora_A/lora_B or lora_down/lora_up); it looks "
            f"like {describe(source.shapes())}: pass it as a model, not as a LoRA."
        )
    if stray:
        raise LoraError(
            f"{source.path} holds {len(stray)} tensor(s) that belong to no LoRA module "
            f"({', '.join(stray[:3])}); pascaline applies plain LoRA files only."
        )
    peft = _peft_alphas(source.metadata.get(METADATA_KEY))
    modules, text = {}, {}
    with source:
        for flat, roles in parts.items():
            module = _module(source, roles, alphas.get(flat), peft)
            (text if _TEXT_ENCODER.match(module.name) else modules)[module.name] = module
    return LoraFile(source.path, modules, text, dict(source.metadata))


def holds_lora(path: str | Path) -> bool:
    """Whether the safetensors file at ``path`` holds LoRA tensors, from its header alone (a malformed
    LoRA counts: ``read_lora`` says what is wrong with it). A file that is no safetensors file, or a
    truncated one, raises the reader's ``WeightsError``."""
    with WeightSource(path) as source:
        keys = source.keys()
    try:
        parts, _, _ = _split_roles(keys)
    except LoraError:
        return True
    return bool(parts)


def _refuse_other_kinds(path: Path, keys: list[str]) -> None:
    for pattern, kind in _OTHER_KINDS:
        hit = next((k for k in keys if pattern.search(k)), None)
        if hit is not None:
            raise LoraError(
                f"{path} is a {kind} adapter ({hit}), which pascaline does not apply; use "
                "a plain LoRA (lora_A/lora_B or lora_down/lora_up) or merge it into the model."
            )


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _split_roles(keys: list[str]):
    """``{flat module: {role: key}}``, ``{flat module: alpha key}``, keys of no LoRA module."""
    parts: dict[str, dict[str, str]] = {}
    alphas: dict[str, str] = {}
    adapters: set[str] = set()
    stray = []
    for key in keys:
        if m := _PEFT.fullmatch(key):
            role = "down" if m["role"] == "A" else "up"
            if m["adapter"]:
                adapters.add(m["adapter"])
        elif m := _DOWN_UP.fullmatch(key):
            role = m["role"]
        elif m := _ALPHA.fullmatch(key):
            alphas[_flat(m["m"])] = key
            continue
        else:
            stray.append(key)
            continue
        slot = parts.setdefault(_flat(m["m"]), {})
        if role in slot:
            raise LoraError(
                f"the LoRA stores the {role} weight of {m['m']} twice ({slot[role]} and {key}); "
                "it is malformed."
            )
        slot[role] = key
    if len(adapters) > 1:
        raise LoraError(
            f"the LoRA holds several PEFT adapters ({', '.join(sorted(adapters))}); save one "
            "adapter per file."
        )
    # an alpha without weights (kohya's rank-0 modules) carries no delta: nothing to apply
    return parts, alphas, stray


def _module(source: WeightSource, roles: dict[str, str], alpha_key: str | None, peft) -> LoraModule:
    if set(roles) != {"down", "up"}:
        have, lack = next(iter(roles.values())), ({"down", "up"} - set(roles)).pop()
        raise LoraError(f"{source.path} is incomplete: {have} has no {lack} partner; download it again.")
    down, up = source.get(roles["down"]), source.get(roles["up"])
    name = _module_name(roles["down"])
    if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0]:
        raise LoraError(
            f"{source.path}: {name} has down {tuple(down.shape)} and up {tuple(up.shape)}, which "
            "are no LoRA pair ([r, in] and [out, r]); the file is malformed."
        )
    rank = down.shape[0]
    alpha, rslora = _alpha(source, alpha_key, name, peft)
    if alpha is None or alpha == 0:  # kohya: a missing or zero alpha means alpha = rank
        return LoraModule(name, down, up, None, 1.0)
    return LoraModule(name, down, up, alpha, alpha / (math.sqrt(rank) if rslora else rank))


def _module_name(down_key: str) -> str:
    m = _PEFT.fullmatch(down_key) or _DOWN_UP.fullmatch(down_key)
    return m["m"]


def _alpha(source: WeightSource, alpha_key: str | None, name: str, peft) -> tuple[float | None, bool]:
    """The module's alpha: its ``.alpha`` tensor, else the PEFT metadata; and whether rsLoRA scales."""
    if alpha_key is not None:
        return float(source.get(alpha_key).float().reshape(-1)[0]), False
    if peft is None:
        return None, False
    default, pattern, rslora = peft
    for key, value in pattern.items():  # PEFT's own rule (peft.utils.other.get_pattern_key)
        if re.match(rf"(.*\.)?({key})$", name):
            return float(value), rslora
    return default, rslora


def _peft_alphas(raw: str | None):
    """``(lora_alpha, alpha_pattern, use_rslora)`` of the diffusers metadata JSON, or None."""
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        raise LoraError(
            f"the LoRA's {METADATA_KEY} metadata is not valid JSON; the file is malformed."
        ) from None
    # diffusers prefixes each component's config (transformer.lora_alpha); a bare LoraConfig has none
    for prefix in ("transformer.", "unet.", ""):
        if prefix + "lora_alpha" in config:
            pattern = config.get(prefix + "alpha_pattern") or {}
            return float(config[prefix + "lora_alpha"]), pattern, bool(config.get(prefix + "use_rslora"))
    return None


def safetensors_data_sha256(path: str | Path) -> str:
    """SHA-256 of a safetensors file's bytes after its header (the "addnet" / AutoV3 hash)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def lora_records(loras) -> list[dict]:
    """``[{"name", "hash", "strength", "file"}]`` for PNG metadata, from ``[(LoraFile, strength)]``."""
    return [
        {"name": f.name, "hash": f.short_hash, "strength": float(s), "file": f.path.name} for f, s in loras
    ]


def a1111_lora_text(records: list[dict]) -> tuple[str, str]:
    """A1111 infotext parts: the prompt tags ``<lora:name:0.8>`` and the ``Lora hashes`` field."""
    tags = " ".join(f"<lora:{r['name']}:{r['strength']:g}>" for r in records)
    hashes = ", ".join(f"{r['name']}: {r['hash']}" for r in records)
    return tags, (f'Lora hashes: "{hashes}"' if records else "")


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """``"style.safetensors:0.8"`` -> (path, 0.8); no strength means 1.0 (``C:\\x`` keeps its drive)."""
    head, sep, tail = spec.rpartition(":")
    if not sep or len(head) < 2:
        return Path(spec).expanduser(), 1.0
    try:
        strength = float(tail)
    except ValueError:
        return Path(spec).expanduser(), 1.0
    if not math.isfinite(strength):
        raise InvalidArgumentError(
            f"LoRA strength {tail!r} in {spec!r} is not a finite number; write e.g. style.safetensors:0.8."
        )
    return Path(head).expanduser(), strength
