"""Find the three Z-Image components in what the user pointed at, by content.

Accepted: a ComfyUI ``models/`` folder (``diffusion_models/`` or legacy ``unet/``,
``text_encoders/`` or legacy ``clip/``, ``vae/``, searched recursively), a diffusers
snapshot (``transformer/``, ``text_encoder/``, ``vae/``, ``tokenizer/``), or explicit
paths for any component. File names are never trusted: every candidate's header is
read (cheap, no tensor data) and classified by ``formats.detect.guess_kind``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pascaline.errors import MissingFileError, PascalineError, WrongModelError
from pascaline.formats.detect import KIND_NAMES, guess_kind
from pascaline.formats.safetensors_io import WeightSource
from pascaline.quant.schemes import Scheme, same_storage, scheme_from_metadata, scheme_from_name

# component -> (kind that fits it, ComfyUI sub-folders to search, diffusers sub-folder)
COMPONENTS = {
    "dit": ("zimage-dit", ("diffusion_models", "unet"), "transformer"),
    "text_encoder": ("qwen3-encoder", ("text_encoders", "clip"), "text_encoder"),
    "vae": ("flux-vae", ("vae",), "vae"),
}
_LABELS = {"dit": "Z-Image DiT", "text_encoder": "Qwen3-4B text encoder", "vae": "FLUX.1 VAE"}


@dataclass(frozen=True)
class ModelFiles:
    """Where each component's weights are (a file or a diffusers component folder)."""

    dit: Path
    text_encoder: Path
    vae: Path
    tokenizer: Path | None = None
    root: Path | None = None


@dataclass(frozen=True)
class Candidate:
    path: Path
    kind: str
    dtype: str
    scheme: Scheme | None  # a pascaline-quantized file's own scheme


def inspect_weights(path: Path) -> Candidate:
    """Classify one file or component folder from its headers."""
    src = WeightSource(path)
    shapes = src.shapes()
    dtypes = {}
    for key in shapes:
        name = str(src.info(key).dtype).removeprefix("torch.")
        dtypes[name] = dtypes.get(name, 0) + src.info(key).nbytes
    main_dtype = max(dtypes, key=dtypes.get) if dtypes else "unknown"
    return Candidate(Path(path), guess_kind(shapes), main_dtype, scheme_from_metadata(src.metadata))


def is_diffusers_snapshot(root: Path) -> bool:
    return (root / "model_index.json").is_file() or all(
        (root / sub).is_dir() for sub in ("transformer", "text_encoder", "vae"))


def _preference(c: Candidate, quant: str | None) -> tuple:
    # A pascaline pre-quantized file fits best when a run with the same storage is asked
    # for (int8 and w8a8 share theirs); then the widest float storage (requantizing fp8
    # loses more than quantizing bf16); a quantized file of another scheme comes last.
    order = {"bfloat16": 0, "float16": 1, "float32": 2, "float8_e4m3fn": 3, "float8_e5m2": 4}
    wants = scheme_from_name(quant) if quant not in (None, "none", "auto") else None
    fits = c.scheme is not None and wants is not None and same_storage(wants, c.scheme)
    return (not fits, c.scheme is not None, order.get(c.dtype, 9), str(c.path))


def _search(root: Path, component: str, quant: str | None) -> Path:
    kind, subdirs, _ = COMPONENTS[component]
    folders = [root / s for s in subdirs if (root / s).is_dir()]
    files = sorted(p for f in folders for p in f.rglob("*.safetensors"))
    found, seen = [], []
    for path in files:
        try:
            cand = inspect_weights(path)
        except PascalineError:
            continue  # a broken unrelated file must not hide a good one; named below if nothing fits
        seen.append(path.name)
        if cand.kind == kind:
            found.append(cand)
    if not found:
        where = " or ".join(f"{s}/" for s in subdirs)
        extra = f" (found only: {', '.join(seen[:5])})" if seen else ""
        raise MissingFileError(f"{root} has no {_LABELS[component]} in {where}{extra}.")
    return min(found, key=lambda c: _preference(c, quant)).path


def _check_kind(path: Path, component: str) -> Path:
    path = Path(path).expanduser()
    if path.is_dir() and (path / COMPONENTS[component][2]).is_dir():
        path = path / COMPONENTS[component][2]
    cand = inspect_weights(path)
    if cand.kind != COMPONENTS[component][0]:
        raise WrongModelError(
            f"{path} looks like {KIND_NAMES[cand.kind]}, but the {_LABELS[component]} was expected there.")
    return path


def _find_tokenizer(root: Path) -> Path | None:
    tok = root / "tokenizer"
    if (tok / "tokenizer.json").is_file() or (tok / "vocab.json").is_file():
        return tok
    return None


def find_model_files(models: str | Path | None = None, *, dit=None, text_encoder=None, vae=None,
                     tokenizer=None, quant: str | None = None) -> ModelFiles:
    """Resolve the DiT, text encoder and VAE (and a tokenizer folder when one ships)."""
    explicit = {"dit": dit, "text_encoder": text_encoder, "vae": vae}
    root = Path(models).expanduser() if models is not None else None
    if root is not None and not root.is_dir():
        raise MissingFileError(f"models folder {root} does not exist.")
    paths = {}
    for comp, given in explicit.items():
        if given is not None:
            paths[comp] = _check_kind(Path(given), comp)
        elif root is None:
            raise MissingFileError(f"no models folder given and no {comp.replace('_', ' ')} path.")
        elif is_diffusers_snapshot(root):
            paths[comp] = _check_kind(root / COMPONENTS[comp][2], comp)
        else:
            paths[comp] = _search(root, comp, quant)
    tok = Path(tokenizer).expanduser() if tokenizer is not None else (
        _find_tokenizer(root) if root is not None else None)
    return ModelFiles(paths["dit"], paths["text_encoder"], paths["vae"], tok, root)


def describe_files(files: ModelFiles) -> dict[str, str]:
    """Short names for logs and PNG metadata."""
    return {k: Path(getattr(files, k)).name for k in ("dit", "text_encoder", "vae")}

