"""Images in and out: PNGs that carry their settings, output names, init images.

A PNG we write holds three text chunks:
- ``parameters``: the A1111 infotext that image browsers, Civitai and "PNG Info" tabs read
  (prompt, ``Negative prompt: ...``, then ``Key: value, ...``);
- ``pascaline``: the same settings as JSON (``generation_metadata``), which
  ``read_png_metadata`` gives back as the dict that was written;
- ``prompt``: the same generation as a ComfyUI API-format workflow (``comfy_workflow``), so
  dropping the PNG on ComfyUI's canvas brings the graph back.
Files are written under a temporary name in the target folder and renamed, so a crash or
a cancel never leaves a half-written image under the requested name.

Images read (an init image, a PNG's settings) are opened through one guard: a pixel
limit (``sizing.MAX_INIT_IMAGE_PIXELS``) checked on the header before any decoding, and
a damaged file reported in one sentence, whatever Pillow raised.
"""

from __future__ import annotations

import hashlib
import json
import struct
import warnings
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pascaline import __version__
from pascaline.atomic import atomic_file, check_writable, write_error
from pascaline.errors import InvalidArgumentError, MissingFileError
from pascaline.runtime.sizing import MAX_INIT_IMAGE_PIXELS, validate_count

METADATA_KEY = "pascaline"
PARAMETERS_KEY = "parameters"
COMFY_KEY = "prompt"  # the chunk ComfyUI's SaveImage writes and its frontend loads
METADATA_VERSION = 1
_ROLE_LABELS = {"text_encoder": "Text encoder", "vae": "VAE"}  # others: clip_l -> CLIP-L
_MIB = 1 << 20


# ---------------------------------------------------------------------------- hashes


def short_hash(path: str | Path) -> str:
    """A 12-hex "quickhash": sha256 of (file size, first MiB, last MiB).

    Not A1111's "Model hash" (the first 10 hex of sha256 over the whole file): hashing 12 GB
    costs tens of seconds per run on the machines we target, often more than the image
    itself. The first MiB holds the safetensors header (every key, dtype, shape and the
    metadata) and the last MiB and the size catch other variants and truncated copies,
    which is what reproducing an image needs. We call it "quickhash" everywhere so nobody
    pastes it where an A1111/Civitai hash is expected. A folder (a diffusers component,
    possibly sharded) hashes the relative names and quickhashes of its safetensors files.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.safetensors") if p.is_file())
        if not files:
            raise MissingFileError(f"{path} holds no .safetensors files to hash; point it at a model folder.")
        digest = hashlib.sha256()
        for file in files:
            digest.update(f"{file.relative_to(path).as_posix()}:{short_hash(file)}\n".encode())
        return digest.hexdigest()[:12]
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist; check the path.")
    size = path.stat().st_size
    digest = hashlib.sha256(size.to_bytes(8, "little"))
    with path.open("rb") as f:
        digest.update(f.read(_MIB))
        if size > _MIB:
            f.seek(max(_MIB, size - _MIB))
            digest.update(f.read(_MIB))
    return digest.hexdigest()[:12]


def model_record(path: str | Path) -> dict[str, str]:
    """``{"file": name, "quickhash": ...}`` for one model file or folder."""
    path = Path(path)
    return {"file": path.name, "quickhash": short_hash(path)}


# ---------------------------------------------------------------------------- metadata


def generation_metadata(
    *,
    prompt: str,
    seed: int,
    width: int,
    height: int,
    models: Mapping[str, str | Path],
    negative: str | None = None,
    sampler: str = "res_multistep",
    scheduler: str = "linear",
    steps: int = 8,
    shift: float = 3.0,
    cfg: float = 1.0,
    quant: str | None = None,
    blind_start: int = 0,
    denoise: float = 1.0,
    family: str | None = None,
    variant: str | None = None,
    init_image: str | Path | None = None,
    original_prompt: str | None = None,
    rounding: str = "comfyui",
    extra: Mapping[str, Any] | None = None,
    without: list[str] | None = None,
    loras: list[dict] | None = None,
) -> dict[str, Any]:
    """The settings of one image as a JSON-ready dict (what the ``pascaline`` chunk holds).

    ``models`` maps a role to the file or folder used: ``dit``, ``text_encoder``, ``vae`` for
    Z-Image; ``dit``, ``clip_l``, ``clip_g``, ``t5`` (absent without T5), ``vae`` for SD3.
    ``family``/``variant`` name the model. ``prompt`` is the text that was encoded;
    ``original_prompt`` the user's text when it was enhanced first. ``init_image`` is the
    img2img source file (recorded as its name and quickhash). ``rounding`` is the 8-bit rule
    of the pixels (``to_pil``). ``extra`` adds a family's own settings at the top level
    (guidance: ``negative_mode``; SD3 also ``dit_kind``, ``slg_layers``, ``slg_scale``,
    ``slg_start``, ``slg_end``; see ``comfy_workflow``); ``without`` lists the optional
    components the run left out (``["t5"]``); ``loras`` the LoRAs it ran with
    (``pascaline.lora.lora_records``: name, short hash, strength, file).
    """
    meta = {
        "format_version": METADATA_VERSION, "pascaline_version": __version__, "family": family,
        "prompt": prompt, "negative": negative or "", "seed": int(seed), "sampler": sampler,
        "scheduler": scheduler, "steps": int(steps), "shift": float(shift), "cfg": float(cfg),
        "width": int(width), "height": int(height), "quant": quant or "none",
        "blind_start": int(blind_start), "denoise": float(denoise), "rounding": rounding,
        "models": {role: model_record(path) for role, path in models.items()},
    }  # fmt: skip
    optional = {"variant": variant, "original_prompt": original_prompt, "without": without or None,
                "loras": loras or None,
                "init_image": None if init_image is None else model_record(init_image)}  # fmt: skip
    meta.update({k: v for k, v in optional.items() if v is not None})
    meta.update(extra or {})
    return meta


def _quote(value: Any) -> str:
    """A1111's infotext quoting: values with ``,``, ``:`` or newlines become JSON strings."""
    text = str(value)
    if any(c in text for c in ",:\n"):
        return json.dumps(text, ensure_ascii=False)
    return text


def _stem(record: Mapping[str, str]) -> str:
    return record["file"].removesuffix(".safetensors")


def format_parameters(meta: Mapping[str, Any]) -> str:
    """A1111-style infotext for ``meta`` (a ``generation_metadata`` dict)."""
    models = meta.get("models", {})
    fields: list[tuple[str, Any]] = [
        ("Steps", meta["steps"]), ("Sampler", meta["sampler"]), ("Schedule type", meta["scheduler"]),
        ("CFG scale", meta["cfg"]), ("Seed", meta["seed"]), ("Size", f"{meta['width']}x{meta['height']}"),
    ]  # fmt: skip
    if "dit" in models:
        fields += [("Model", _stem(models["dit"])), ("Model quickhash", models["dit"]["quickhash"])]
    fields.append(("Shift", meta["shift"]))
    if meta.get("denoise", 1.0) < 1.0:
        fields.append(("Denoising strength", meta["denoise"]))
    if meta.get("blind_start"):
        fields.append(("Blind start", meta["blind_start"]))
    fields.append(("Quant", meta.get("quant", "none")))
    if meta.get("variant"):
        fields.append(("Variant", meta["variant"]))
    if meta.get("slg_scale") and meta.get("slg_layers"):
        layers = ",".join(str(i) for i in meta["slg_layers"])
        window = f"{meta['slg_start']}-{meta['slg_end']}"
        fields.append(("SLG", f"layers {layers} scale {meta['slg_scale']} {window}"))
    for role, record in models.items():
        if role != "dit":
            label = _ROLE_LABELS.get(role, role.replace("_", "-").upper())
            fields += [(label, _stem(record)), (f"{label} quickhash", record["quickhash"])]
    if meta.get("without"):
        fields.append(("Without", ",".join(meta["without"])))
    tags = ""
    if meta.get("loras"):
        from pascaline.lora.files import a1111_lora_text

        tags, hashes = a1111_lora_text(meta["loras"])
        fields.append(("Lora hashes", hashes.removeprefix("Lora hashes: ").strip('"')))
    fields.append(("Version", f"pascaline {meta['pascaline_version']}"))
    lines = [f"{meta['prompt']} {tags}" if tags else meta["prompt"]]  # A1111's <lora:name:0.8> tags
    if meta.get("negative"):
        lines.append(f"Negative prompt: {meta['negative']}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- PNG files


def save_png(image, path: str | Path, meta: Mapping[str, Any] | None = None) -> Path:
    """Write a PIL ``image`` to ``path`` with its metadata chunks, atomically (temp name + rename).

    ``parameters`` and ``pascaline`` always; ComfyUI's ``prompt`` when ``meta`` names its family."""
    from PIL.PngImagePlugin import PngInfo

    from pascaline.runtime.comfy_workflow import comfy_prompt

    path = Path(path)
    info = PngInfo()
    if meta is not None:
        info.add_text(PARAMETERS_KEY, format_parameters(meta))  # falls back to iTXt for non-Latin-1 text
        info.add_text(METADATA_KEY, json.dumps(meta, ensure_ascii=False, sort_keys=True))
        if meta.get("family") is not None:  # the model family says which ComfyUI nodes describe it
            # json.dumps' default ASCII escapes keep this a tEXt chunk, as ComfyUI writes it
            info.add_text(COMFY_KEY, json.dumps(comfy_prompt(meta)))
    with atomic_file(path) as f:
        image.save(f, format="PNG", pnginfo=info)
    return path


# What Pillow raises for a damaged file, by format plugin: truncated or broken data
# (OSError, EOFError, SyntaxError), chunks that lie about their size (struct.error,
# ValueError), bad compressed streams (zlib.error).
_DAMAGED = (OSError, EOFError, SyntaxError, ValueError, struct.error, zlib.error)


@contextmanager
def _opened(path: str | Path, what: str, kinds: str, *, decode: bool = True) -> Iterator:
    """A decoded PIL image of ``path``, refused in one sentence when it is missing, not an image,
    above ``MAX_INIT_IMAGE_PIXELS`` (checked on the header, before decoding) or damaged.
    ``decode=False`` reads the header only."""
    from PIL import Image, UnidentifiedImageError

    limit = f"the limit is {MAX_INIT_IMAGE_PIXELS / 1e6:.0f} megapixels; scale it down first"
    try:
        with warnings.catch_warnings():
            # Pillow warns from 89 MP and refuses from 179 MP; our own limit is lower
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except FileNotFoundError:
        raise InvalidArgumentError(f"{what} {path} does not exist; check the path.") from None
    except IsADirectoryError:
        raise InvalidArgumentError(f"{what} {path} is a folder; give an image file.") from None
    except UnidentifiedImageError:
        raise InvalidArgumentError(f"{what} {path} is not an image file; give {kinds}.") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidArgumentError(f"{what} {path} is too large ({limit}).") from None
    except _DAMAGED as exc:
        raise InvalidArgumentError(f"{what} {path} cannot be read ({_reason(exc)}); give {kinds}.") from None
    with image:
        width, height = image.size
        if width * height > MAX_INIT_IMAGE_PIXELS:
            raise InvalidArgumentError(
                f"{what} {path} is {width}x{height}, {width * height / 1e6:.0f} megapixels ({limit})."
            )
        try:
            if decode:
                image.load()
        except _DAMAGED as exc:
            raise InvalidArgumentError(
                f"{what} {path} is damaged ({_reason(exc)}); give {kinds} that opens in an image viewer."
            ) from None
        yield image


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().rstrip(".") or type(exc).__name__
    return text[:80]


def read_png_text(path: str | Path) -> dict[str, str]:
    """All tEXt/iTXt/zTXt chunks of a PNG."""
    with _opened(path, "image", "a PNG written by pascaline") as image:
        return dict(getattr(image, "text", {}))


def read_png_metadata(path: str | Path) -> dict[str, Any]:
    """The settings dict a pascaline PNG was written with (the ``pascaline`` chunk)."""
    text = read_png_text(path).get(METADATA_KEY)
    if text is None:
        raise InvalidArgumentError(f"{path} carries no pascaline settings; only images pascaline wrote do.")
    try:
        meta = json.loads(text)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise InvalidArgumentError(f"the pascaline settings in {path} are damaged (not a JSON object).")
    return meta


def output_paths(out: str | Path, count: int = 1) -> list[Path]:
    """The files ``--out OUT --count N`` writes: ``OUT`` itself for one image, else numbered.

    ``out.png`` with N = 3 gives ``out-1.png``, ``out-2.png``, ``out-3.png`` (numbers padded
    to the width of N, so they sort), in seed order seed, seed+1, ...
    """
    out = Path(out)
    validate_count(count)
    if out.suffix.lower() != ".png":
        raise InvalidArgumentError(f"output {out} must end in .png; pascaline writes PNG files only.")
    try:
        is_folder, parent_exists = out.is_dir(), out.parent.is_dir()
    except OSError as exc:  # a name the file system refuses (too long)
        raise write_error(exc, out) from None
    if is_folder:
        raise InvalidArgumentError(f"output {out} is a folder; give a file name such as {out / 'image.png'}.")
    if not parent_exists:
        raise InvalidArgumentError(f"the folder {out.parent} does not exist; create it first.")
    if count == 1:
        paths = [out]
    else:
        width = len(str(count))
        paths = [out.with_name(f"{out.stem}-{i:0{width}d}{out.suffix}") for i in range(1, count + 1)]
    check_writable(paths[-1])  # a read-only folder or an illegal name fails now, not after the run
    return paths


def check_init_image(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an init image from its header alone, so a missing, foreign or
    too large file fails before any weights are read (damaged data shows only when decoded)."""
    with _opened(path, "init image", "a PNG or JPEG", decode=False) as image:
        return image.size


def load_init_image(path: str | Path, width: int, height: int):
    """An init image as a ``[1, 3, height, width]`` fp32 tensor in [-1, 1].

    EXIF orientation is applied, then the image is scaled to cover the requested size and
    centre-cropped to it (aspect kept, no stretching), with Lanczos filtering.
    """
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    with _opened(path, "init image", "a PNG or JPEG") as raw:
        try:
            image = ImageOps.exif_transpose(raw).convert("RGB")
        except _DAMAGED as exc:
            why = _reason(exc)
            raise InvalidArgumentError(f"init image {path} is damaged ({why}); give a PNG or JPEG.") from None
    image = ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())  # pixels: [H, W, 3]
    return (pixels / 127.5 - 1.0).permute(2, 0, 1).unsqueeze(0)  # [1, 3, H, W]
