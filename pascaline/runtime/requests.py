"""Generate requests from JSON-like mappings: names, types and values checked, one sentence per mistake.

    job = parse_request({"prompt": "a lighthouse", "width": 512, "height": 512})
    job.options       # a GenerateOptions, its seed always set (a random one when none was sent)
    job.record        # the JSON form, seed included: parse_request(job.record) gives the same job
    job.pipeline_key  # the load-level settings: jobs with equal keys share one loaded pipeline

The accepted names are read from the ``GenerateOptions`` dataclass itself, so a field added
there is accepted here with no change as long as its type is plain JSON (text, numbers,
booleans, ``Literal``, lists and objects of those, ``None``). Fields that do not travel as
they are get a wire form in ``WIRE_TYPES`` (the init image is sent as base64) or stay
server-side in ``SERVER_ONLY``. Load-level settings (which model, which LoRAs) are a
separate group: a name in ``LOAD_FIELDS`` is accepted once ``load_pipeline`` takes a keyword
of that name, and its type is read from there.

No web framework is imported here: the HTTP server and the batch runner share this module.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import inspect
import io
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Literal

from pascaline.errors import RequestError

if TYPE_CHECKING:
    from pascaline.runtime.pipeline import GenerateOptions

LOAD_FIELDS = ("model",)  # load-level names, accepted once load_pipeline takes them
SERVER_ONLY = {"output": "images are always written as PNG files"}  # never taken from a request
# the JSON type of a field whose Python type has none (a path, a tensor): converted on parsing
WIRE_TYPES: dict[str, Any] = {
    "init_image": str | None,  # base64 PNG/JPEG (a data: URL too)
    "loras": list[str] | None,  # "name:strength" specs; per image (branches), so no pipeline reload
}
MAX_STEPS = 500
MAX_PROMPT_CHARS = 20_000
MAX_INIT_IMAGE_BYTES = 32 << 20
_MISSING = dataclasses.MISSING


@dataclass(frozen=True)
class Field:
    """One accepted request field: its JSON type, its default, and its group."""

    name: str
    annotation: Any
    default: Any = _MISSING
    group: Literal["generate", "load"] = "generate"

    @property
    def required(self) -> bool:
        return self.default is _MISSING


@dataclass(frozen=True)
class JobRequest:
    """A validated request: the options of one image and the settings of the pipeline it needs."""

    options: GenerateOptions  # seed set
    load: dict[str, Any]  # load-level settings that differ from load_pipeline's defaults (its kwargs)
    record: dict[str, Any]  # the JSON form, seed included (what a job table stores)

    @property
    def pipeline_key(self) -> tuple[tuple[str, Any], ...]:
        """Equal keys share one loaded pipeline; ``()`` is the server's own (no load-level setting)."""
        return tuple(sorted((k, _frozen(v)) for k, v in self.load.items()))


def public_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A request's record fit for a response: an init image shows as its size, not its bytes."""
    out = dict(record)
    if out.get("init_image") is not None:
        out["init_image"] = f"<base64 image, {len(out['init_image'])} characters>"
    return out


# ---------------------------------------------------------------------------- the fields


@cache
def generate_fields() -> dict[str, Field]:
    """The generate-level fields, in the dataclass's order, read from ``GenerateOptions``."""
    from pascaline.runtime.pipeline import GenerateOptions

    hints = typing.get_type_hints(GenerateOptions)
    out = {}
    for f in dataclasses.fields(GenerateOptions):
        if f.name in SERVER_ONLY:
            continue
        annotation = WIRE_TYPES.get(f.name, hints[f.name])
        _check_wire_type(f.name, annotation)
        out[f.name] = Field(f.name, annotation, f.default)
    return out


@cache
def load_fields() -> dict[str, Field]:
    """The load-level fields ``load_pipeline`` takes today (a name of ``LOAD_FIELDS`` it knows)."""
    from pascaline.runtime.pipeline import load_pipeline

    params = inspect.signature(load_pipeline).parameters
    hints = typing.get_type_hints(load_pipeline)
    out = {}
    for name in LOAD_FIELDS:
        if name in params:
            annotation = WIRE_TYPES.get(name, hints[name])
            _check_wire_type(name, annotation)
            out[name] = Field(name, annotation, params[name].default, group="load")
    return out


def request_fields() -> dict[str, Field]:
    """Every field a request may carry: generate-level, then load-level."""
    return {**generate_fields(), **load_fields()}


def _check_wire_type(name: str, annotation: Any) -> None:
    """A field whose type cannot come from JSON needs a WIRE_TYPES entry: a bug, not a user's."""
    try:
        _describe(annotation)
    except TypeError as exc:
        raise TypeError(f"field {name!r} has no JSON form ({exc}); give it one in WIRE_TYPES") from None


# ---------------------------------------------------------------------------- parsing


def parse_request(data: Any, *, lora_root=None) -> JobRequest:
    """Check ``data`` (a JSON object) and turn it into a ``JobRequest`` (one sentence per mistake).

    ``lora_root``: the folder LoRA names are looked up in (a server's ``models/loras/``); a name
    that is absolute or leaves it is refused. None: LoRA specs are paths as given (a batch file).
    """
    from pascaline.runtime.pipeline import GenerateOptions

    if not isinstance(data, Mapping):
        raise RequestError(f"the request must be a JSON object, not {_json_kind(data)}.")
    fields = request_fields()
    unknown = [name for name in data if name not in fields]
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}; the accepted fields are {', '.join(fields)}.")
    for f in fields.values():
        if f.required and f.name not in data:
            raise RequestError(f"the field {f.name!r} is required.")
    values = {name: check_value(name, fields[name].annotation, value) for name, value in data.items()}
    _check_limits(values)
    generate = {k: v for k, v in values.items() if fields[k].group == "generate"}
    if generate.get("init_image") is not None:
        generate["init_image"] = decode_init_image(generate["init_image"], generate)
    if generate.get("loras") and lora_root is not None:
        generate["loras"] = [_inside(lora_root, spec) for spec in generate["loras"]]
    options = GenerateOptions(**generate).with_seed()
    record = {**values, "seed": options.seed}
    # a load-level setting equal to load_pipeline's default is the server's own pipeline
    load = {k: v for k, v in values.items() if fields[k].group == "load" and v != fields[k].default}
    return JobRequest(options, load, record)


def _inside(root, spec: str) -> str:
    """A ``name:strength`` LoRA spec with its name resolved inside ``root``, or one sentence."""
    from pathlib import Path, PurePath

    name, sep, strength = spec.rpartition(":") if ":" in spec else (spec, "", "")
    try:
        float(strength) if sep else None
    except ValueError:
        name, sep, strength = spec, "", ""
    rel = PurePath(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise RequestError(f"LoRA {name!r} must be a file name inside the server's loras folder.")
    path = Path(root) / rel
    if not path.is_file():
        raise RequestError(f"the server has no LoRA {name!r} in its loras folder.")
    return f"{path}{sep}{strength}"


def _check_limits(values: Mapping[str, Any]) -> None:
    steps = values.get("steps")
    if isinstance(steps, int) and steps > MAX_STEPS:
        raise RequestError(f"steps {steps} is more than a request may ask for; give at most {MAX_STEPS}.")
    prompt = values.get("prompt")
    if isinstance(prompt, str) and len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(f"the prompt has {len(prompt)} characters; give at most {MAX_PROMPT_CHARS}.")


def check_value(name: str, annotation: Any, value: Any) -> Any:
    """``value`` as ``annotation`` wants it (ints widened to float where a number is asked)."""
    ok, converted = _convert(annotation, value)
    if not ok:
        raise RequestError(f"{name} must be {_describe(annotation)}, not {_show(value)}.")
    return converted


def _convert(annotation: Any, value: Any) -> tuple[bool, Any]:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            ok, converted = _convert(arm, value)
            if ok:
                return True, converted
        return False, None
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args), value
    if origin in (list, tuple, Sequence):
        if not isinstance(value, list):
            return False, None
        arm = args[0] if args else Any
        items = [_convert(arm, v) for v in value]
        if not all(ok for ok, _ in items):
            return False, None
        converted = [v for _, v in items]
        return True, tuple(converted) if origin is tuple else converted
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            return False, None
        items = {k: _convert(args[1] if args else Any, v) for k, v in value.items()}
        return all(ok for ok, _ in items.values()), {k: v for k, (_, v) in items.items()}
    return _convert_scalar(annotation, value)


def _convert_scalar(annotation: Any, value: Any) -> tuple[bool, Any]:
    if annotation is Any:
        return True, value
    if annotation is type(None):
        return value is None, None
    if annotation is bool or annotation is str:
        return isinstance(value, annotation), value
    if isinstance(value, bool):
        return False, None
    if annotation is int:
        return isinstance(value, int), value
    if annotation is float:
        ok = isinstance(value, (int, float)) and math.isfinite(value)
        return ok, float(value) if ok else None
    return False, None


_NAMES = {str: "text", int: "a whole number", float: "a number", bool: "true or false",
          type(None): "null", Any: "any JSON value"}  # fmt: skip


def _describe(annotation: Any) -> str:
    """How a type reads in a message ("a whole number or null"); TypeError when JSON has no form."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in args)
    if origin in (list, tuple, Sequence):
        if origin is tuple and len(args) == 2 and args[1] is not Ellipsis:
            raise TypeError("fixed-length tuples")
        return f"a list of {_describe(args[0]) if args else 'values'}"
    if origin in (dict, Mapping):
        return f"an object of {_describe(args[1]) if args else 'values'}"
    if annotation in _NAMES:
        return _NAMES[annotation]
    raise TypeError(f"{annotation!r} is not a JSON type")


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else f"{_json_kind(value)} {text[:30]}..."


def _json_kind(value: Any) -> str:
    kinds = ((bool, "a boolean"), (int, "a number"), (float, "a number"), (str, "text"),
             (list, "a list"), (dict, "an object"), (type(None), "null"))  # fmt: skip
    return next((name for kind, name in kinds if isinstance(value, kind)), type(value).__name__)


def _frozen(value: Any) -> Any:
    """A hashable copy of a JSON value (lists become tuples, objects sorted pairs)."""
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    return value


# ---------------------------------------------------------------------------- init images


def decode_init_image(text: str, values: Mapping[str, Any]):
    """A base64 image (or ``data:image/...;base64,`` URL) as the ``[1, 3, H, W]`` tensor in [-1, 1]
    of the request's size, decoded now so that a broken image is refused with the request."""
    from PIL import Image, UnidentifiedImageError

    from pascaline.runtime.images import load_init_image
    from pascaline.runtime.sizing import validate_size

    if text.startswith("data:"):
        text = text.partition(",")[2]
    if len(text) > MAX_INIT_IMAGE_BYTES * 4 // 3 + 4:
        limit = MAX_INIT_IMAGE_BYTES >> 20
        raise RequestError(f"the init image is larger than {limit} MiB; send a smaller one.")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("init_image is not valid base64; send the image file base64-encoded.") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError):
        raise RequestError("init_image is not a PNG or JPEG image; send the image file's bytes.") from None
    defaults = generate_fields()
    width = values.get("width", defaults["width"].default)
    height = values.get("height", defaults["height"].default)
    validate_size(width, height)
    try:
        return load_init_image(io.BytesIO(data), width, height)
    except OSError:  # verify() passes some truncated files that only fail when decoded
        raise RequestError("init_image is a damaged image file; send the whole file.") from None
