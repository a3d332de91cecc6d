"""Find a family's components in what the user pointed at, by content.

Accepted: a ComfyUI ``models/`` folder (each component's sub-folders, e.g.
``diffusion_models/`` or legacy ``unet/``, ``text_encoders/`` or legacy ``clip/``, ``vae/``,
plus ``checkpoints/`` for bundled files, all searched recursively), a diffusers snapshot
(its component sub-folders), or explicit paths for any component. File names are never
trusted: every candidate's header is read (cheap, no tensor data) and split by
``formats.detect.contents`` into the models it holds, each with its key prefix. A file that
starts with the GGUF magic (``*.safetensors`` and ``*.gguf`` files are looked at) is
classified by ``gguf.inspect_gguf`` instead, its main GGML type recorded.

When several files hold a component, the one picked is (``_preference``): a safetensors file
before any GGUF (a pascaline pre-quantized file whose storage fits the run's scheme, then
the widest float storage, then one quantized under another scheme), then the GGUF with the
most bits per weight (Q8_0 before Q6_K before Q4_K); pass the file to run another one.

Which family runs is the caller's ``--model`` or, when left out, the one family whose
diffusion model the folder holds. A VAE bundled in a checkpoint belongs to that
checkpoint's family: a VAE inside the chosen diffusion model's own file wins, then one
bundled with another diffusion model of the same family, then standalone VAE files; a
VAE bundled with another family's model is never used (FLUX's and SD3's AEs have the
same tensors, so only where they sit tells them apart).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from pascaline.errors import (
    InvalidArgumentError,
    MissingFileError,
    NotGGUFError,
    NotSafetensorsError,
    PascalineError,
    WrongModelError,
)
from pascaline.families import all_families, family_of_kind
from pascaline.families.base import Component, Family, Located
from pascaline.formats.detect import KIND_NAMES, contents
from pascaline.formats.safetensors_io import WeightSource
from pascaline.gguf.reader import is_gguf_file
from pascaline.quant.schemes import Scheme, same_storage, scheme_from_metadata, scheme_from_name

BUNDLE_FOLDERS = ("checkpoints",)  # ComfyUI's folder for all-in-one files
WEIGHT_FILES = ("*.safetensors", "*.gguf")  # what a folder scan opens; each is classified by content
_DTYPE_ORDER = {"bfloat16": 0, "float16": 1, "float32": 2, "float8_e4m3fn": 3, "float8_e5m2": 4}


@dataclass(frozen=True)
class ModelFiles:
    """Where each component of one family is: ``files.dit`` is the path, ``files.where("dit")``
    the path with its key prefix; ``tokenizer`` a tokenizer folder shipped with the weights."""

    family: Family
    located: dict[str, Located]
    tokenizer: Path | None = None
    root: Path | None = None

    def where(self, role: str) -> Located:
        return self.located[role]

    def __getattr__(self, role: str) -> Path:
        located = self.__dict__.get("located", {})
        if role in located:
            return located[role].path
        raise AttributeError(role)

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.located)


@dataclass(frozen=True)
class Candidate:
    """One file or component folder, and what it holds."""

    path: Path
    holds: dict[str, str] = field(default_factory=dict)  # kind -> key prefix
    dtype: str = "unknown"
    scheme: Scheme | None = None  # a pascaline-quantized file's own scheme
    gguf: str | None = None  # a GGUF file's main GGML type ("Q4_K"); None for safetensors

    @property
    def kind(self) -> str:
        """The main kind: the diffusion model of a bundled file, else its only model."""
        dits = [k for k in self.holds if family_of_kind(k) is not None]
        return (dits or list(self.holds) or ["unknown"])[0]


def inspect_weights(path: Path) -> Candidate:
    """Classify one file or component folder from its headers (a GGUF file by its own header)."""
    path = Path(path)
    if is_gguf_file(path):
        from pascaline.gguf.names import inspect_gguf

        summary = inspect_gguf(path)
        return Candidate(path, {summary.kind: ""}, summary.quant_type, None, summary.quant_type)
    try:
        src = WeightSource(path)
    except NotSafetensorsError:
        if path.suffix.lower() != ".gguf":
            raise
        # neither format: named after what the file claims to be
        raise NotGGUFError(f"{path} is not a GGUF file (it does not start with 'GGUF'); download or "
                           "convert it again.") from None
    with src:
        shapes = src.shapes()
        dtypes: dict[str, int] = {}
        for key in shapes:
            info = src.info(key)
            name = str(info.dtype).removeprefix("torch.")
            dtypes[name] = dtypes.get(name, 0) + info.nbytes
        main_dtype = max(dtypes, key=dtypes.get) if dtypes else "unknown"
        return Candidate(path, contents(shapes), main_dtype, scheme_from_metadata(src.metadata))


def is_diffusers_snapshot(root: Path) -> bool:
    return (root / "model_index.json").is_file() or all(
        (root / sub).is_dir() for sub in ("transformer", "text_encoder", "vae"))


def _preference(c: Candidate, quant: str | None) -> tuple:
    # A pascaline pre-quantized file fits best when a run with the same storage is asked
    # for (int8 and w8a8 share theirs); then the widest float storage (requantizing fp8
    # loses more than quantizing bf16); a quantized file of another scheme comes last.
    # GGUF files after every safetensors file (the more precise source of the two, and
    # today's order unchanged), the most bits per weight first.
    if c.gguf is not None:
        from pascaline.gguf.ggml_types import BY_NAME

        return (True, -BY_NAME[c.gguf].bits_per_weight, str(c.path))
    wants = scheme_from_name(quant) if quant not in (None, "none", "auto") else None
    fits = c.scheme is not None and wants is not None and same_storage(wants, c.scheme)
    return (False, not fits, c.scheme is not None, _DTYPE_ORDER.get(c.dtype, 9), str(c.path))


@lru_cache(maxsize=64)
def _inspect_cached(path: Path, mtime_ns: int, size: int) -> Candidate | None:
    try:
        return inspect_weights(path)
    except PascalineError:
        return None  # a broken unrelated file must not hide a good one; named below if nothing fits


def scan(folders: list[Path]) -> tuple[list[Candidate], list[str]]:
    """Every readable weights file below ``folders`` (recursively), and the names of all seen."""
    files = sorted({p for f in folders if f.is_dir() for pattern in WEIGHT_FILES for p in f.rglob(pattern)
                    if p.is_file()})  # fmt: skip
    found, seen = [], []
    for path in files:
        stat = path.stat()
        cand = _inspect_cached(path, stat.st_mtime_ns, stat.st_size)
        seen.append(path.name)
        if cand is not None:
            found.append(cand)
    return found, seen


def _comfy_folders(root: Path, component: Component) -> list[Path]:
    return [root / s for s in (*component.folders, *BUNDLE_FOLDERS)]


def _search(root: Path, family: Family, component: Component, quant: str | None,
            dit: Candidate | None) -> Located:
    cands, seen = scan(_comfy_folders(root, component))
    usable = []
    for c in cands:
        if not any(k in c.holds for k in component.kinds):
            continue
        owner = family_of_kind(c.kind) if c.kind not in component.kinds else None
        if owner is not None and owner is not family:
            continue  # bundled with another family's diffusion model: never ours
        same_file = dit is not None and c.path == dit.path
        usable.append((0 if same_file else 1 if owner is not None else 2, c))
    if not usable:
        where = " or ".join(f"{s}/" for s in component.folders)
        extra = f" (found only: {', '.join(seen[:5])})" if seen else ""
        raise MissingFileError(f"{root} has no {component.label} in {where}{extra}.")
    _, best = min(usable, key=lambda rc: (rc[0], *_preference(rc[1], quant)))
    kind = next(k for k in component.kinds if k in best.holds)
    return Located(best.path, best.holds[kind])


def _explicit(path: Path, component: Component) -> Located:
    path = Path(path).expanduser()
    if path.is_dir() and component.diffusers and (path / component.diffusers).is_dir():
        path = path / component.diffusers
    cand = inspect_weights(path)
    kind = next((k for k in component.kinds if k in cand.holds), None)
    if kind is None:
        raise WrongModelError(
            f"{path} looks like {KIND_NAMES.get(cand.kind, KIND_NAMES['unknown'])}, but the "
            f"{component.label} was expected there.")
    return Located(path, cand.holds[kind])


def locate(path: str | Path, component: Component) -> Located:
    """Where ``component`` is in the file or folder ``path`` the user named (a diffusers folder's
    sub-folder for it, a bundled file's key prefix), checked by content: another model there is
    one sentence (``WrongModelError``)."""
    return _explicit(Path(path), component)


def _find_tokenizer(root: Path) -> Path | None:
    tok = root / "tokenizer"
    if (tok / "tokenizer.json").is_file() or (tok / "vocab.json").is_file():
        return tok
    return None


def families_in(root: Path) -> list[Family]:
    """The families whose diffusion model ``root`` holds (a snapshot: the one in transformer/)."""
    root = Path(root).expanduser()
    if is_diffusers_snapshot(root):
        kind = inspect_weights(root / "transformer").kind if (root / "transformer").is_dir() else "unknown"
        family = family_of_kind(kind)
        return [family] if family is not None else []
    present = []
    for family in all_families():
        cands, _ = scan(_comfy_folders(root, family.dit))
        if any(k in c.holds for c in cands for k in family.dit.kinds):
            present.append(family)
    return present


def choose_family(models, dit) -> Family:
    """The family to run when no ``--model`` was given: that of the DiT, else the folder's only one."""
    if dit is not None:
        path = Path(dit).expanduser()
        # a diffusers pipeline folder (a trainer's checkpoint-N/): its diffusion model's sub-folder
        inner = [path / f.dit.diffusers for f in all_families() if f.dit.diffusers and path.is_dir()]
        kind = inspect_weights(next((p for p in inner if p.is_dir()), path)).kind
        family = family_of_kind(kind)
        if family is None:
            names = " or ".join(f.dit.label for f in all_families())
            raise WrongModelError(f"{dit} looks like {KIND_NAMES.get(kind, KIND_NAMES['unknown'])}, but a "
                                  f"diffusion model ({names}) was expected there.")
        return family
    if models is None:
        raise MissingFileError("no models folder given and no diffusion model path (--dit).")
    root = Path(models).expanduser()
    if not root.is_dir():
        raise MissingFileError(f"models folder {root} does not exist.")
    present = families_in(root)
    if not present:
        names = ", ".join(f.dit.label for f in all_families())
        raise MissingFileError(f"{root} holds no diffusion model pascaline runs ({names}).")
    if len(present) > 1:
        raise InvalidArgumentError(
            f"{root} holds models of several families ({', '.join(f.label for f in present)}); "
            f"choose one with --model ({', '.join(v for f in present for v in f.variants)}).")
    return present[0]


def find_model_files(models: str | Path | None = None, *, family: Family | None = None, tokenizer=None,
                     quant: str | None = None, skip: tuple[str, ...] = (), **explicit) -> ModelFiles:
    """Resolve every component of ``family`` (and a tokenizer folder when one ships).

    ``explicit``: ``role=path`` for components given one by one (``dit=``, ``vae=``...);
    ``skip``: optional roles left out (SD3's ``t5``).
    """
    family = family or choose_family(models, explicit.get("dit"))
    roles = {c.role for c in family.components}
    unknown = sorted(k for k, v in explicit.items() if v is not None and k not in roles)
    if unknown:
        raise InvalidArgumentError(f"{family.label} has no {', '.join(unknown)} component; it has "
                                   f"{', '.join(sorted(roles))}.")
    root = Path(models).expanduser() if models is not None else None
    if root is not None and not root.is_dir():
        raise MissingFileError(f"models folder {root} does not exist.")
    located: dict[str, Located] = {}
    dit_cand = None
    for comp in family.components:  # the DiT first: a bundled VAE is picked next to it
        if comp.role in skip:
            continue
        given = explicit.get(comp.role)
        if given is not None:
            located[comp.role] = _explicit(Path(given), comp)
        elif root is None:
            raise MissingFileError(f"no models folder given and no {comp.label} path.")
        elif is_diffusers_snapshot(root):
            if comp.diffusers is None or not (root / comp.diffusers).exists():
                if comp.optional:
                    continue
                raise MissingFileError(
                    f"the diffusers snapshot {root} has no {comp.diffusers}/ ({comp.label}).")
            located[comp.role] = _explicit(root / comp.diffusers, comp)
        else:
            try:
                located[comp.role] = _search(root, family, comp, quant, dit_cand)
            except MissingFileError:
                if comp.optional:
                    continue
                raise
        if comp.stage == "dit":
            dit_cand = inspect_weights(located[comp.role].path)
    tok = Path(tokenizer).expanduser() if isinstance(tokenizer, (str, Path)) else (
        _find_tokenizer(root) if root is not None else None)
    return ModelFiles(family, located, tok, root)


def describe_files(files: ModelFiles) -> dict[str, str]:
    """Short names for logs and PNG metadata."""
    return {role: where.path.name for role, where in files.located.items()}
