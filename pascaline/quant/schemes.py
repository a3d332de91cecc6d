"""Quantization schemes: frozen config dataclasses, named for the CLI and for file metadata.

A scheme says how a weight is stored and how a quantized layer computes; it holds no
tensors. ``name`` is what users type (``--scheme int8``) and ``to_metadata()`` is what a
quantized file records, so a file is never interpreted from its name.

Our own schemes (``Int8WeightOnly``, ``Int8Dynamic``, ``Fp8WeightOnly``) depend on torch
only. The ``Bnb*`` and ``Quanto*`` schemes are optional comparison backends
(``pascaline.quant.backends``) that need the ``quant`` extra.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from pascaline.errors import InvalidArgumentError, WeightsError

FORMAT_VERSION = 1
METADATA_KEY = "pascaline"
FP8_FORMATS = ("e4m3fn", "e5m2")
GRANULARITIES = ("per_channel", "per_tensor")
HADAMARD_WIDTHS = (0, 64, 128)  # 0: no rotation


@dataclass(frozen=True)
class Int8WeightOnly:
    """Symmetric per-output-channel int8 weights, dequantized to the compute dtype in forward."""

    @property
    def name(self) -> str:
        return "int8"

    def to_metadata(self) -> dict:
        return {"name": self.name}


@dataclass(frozen=True)
class Int8Dynamic:
    """W8A8: per-channel int8 weights x per-token dynamic int8 activations, int32 accumulation.

    ``hadamard`` > 0 (``w8a8-rot``: 128, ``w8a8-rot64``: 64) rotates both sides by a block
    Hadamard of that width first (``pascaline.kernels.w8a8``), which spreads outlier
    channels: on a synthetic layer with 1 % of the channels 30x larger, 38.1 dB instead of
    25.3 dB (unchanged 38.2 dB on Gaussian inputs). The rotation is in the stored weights
    (``qweight`` holds ``W H``), so it is a storage of its own: a plain int8 or w8a8 file
    cannot run rotated, nor a rotated file unrotated.
    """

    hadamard: int = 0

    def __post_init__(self) -> None:
        if self.hadamard not in HADAMARD_WIDTHS:
            raise InvalidArgumentError(
                f"Hadamard rotation width {self.hadamard} is not supported; use one of {HADAMARD_WIDTHS}."
            )

    @property
    def name(self) -> str:
        return {0: "w8a8", 128: "w8a8-rot"}.get(self.hadamard, f"w8a8-rot{self.hadamard}")

    def to_metadata(self) -> dict:
        return {"name": "w8a8", "hadamard": self.hadamard} if self.hadamard else {"name": "w8a8"}


@dataclass(frozen=True)
class Fp8WeightOnly:
    """Weights stored as torch float8 with fp32 scales, widened to the compute dtype in forward.

    Neither Pascal nor Turing has fp8 arithmetic: fp8 is a storage format here.
    """

    fmt: str = "e4m3fn"
    granularity: str = "per_channel"

    def __post_init__(self) -> None:
        if self.fmt not in FP8_FORMATS:
            raise InvalidArgumentError(f"fp8 format {self.fmt!r} is unknown; use one of {FP8_FORMATS}.")
        if self.granularity not in GRANULARITIES:
            raise InvalidArgumentError(
                f"fp8 granularity {self.granularity!r} is unknown; use one of {GRANULARITIES}."
            )

    @property
    def name(self) -> str:
        short = "fp8-e4m3" if self.fmt == "e4m3fn" else "fp8-e5m2"
        return short if self.granularity == "per_channel" else short + "-per-tensor"

    def to_metadata(self) -> dict:
        return {"name": "fp8", "fmt": self.fmt, "granularity": self.granularity}


@dataclass(frozen=True)
class BackendScheme:
    """An optional third-party backend (bitsandbytes, optimum-quanto); never saved to files."""

    library: str  # "bitsandbytes" | "optimum-quanto"
    method: str  # bitsandbytes: "nf4" | "llm_int8"; quanto: "qint8" | "qfloat8"

    @property
    def name(self) -> str:
        prefix = "bnb" if self.library == "bitsandbytes" else "quanto"
        return f"{prefix}-{self.method.replace('_', '-')}"

    def to_metadata(self) -> dict:
        raise InvalidArgumentError(
            f"{self.name} is an optional backend for comparison; files are written with int8, "
            "w8a8, w8a8-rot, fp8-e4m3 or fp8-e5m2."
        )


Scheme = Int8WeightOnly | Int8Dynamic | Fp8WeightOnly
OWN_SCHEMES = (Int8WeightOnly, Int8Dynamic, Fp8WeightOnly)

_BY_NAME = {
    "int8": Int8WeightOnly(),
    "w8a8": Int8Dynamic(),
    "w8a8-rot": Int8Dynamic(hadamard=128),
    "w8a8-rot64": Int8Dynamic(hadamard=64),
    "fp8-e4m3": Fp8WeightOnly("e4m3fn"),
    "fp8-e5m2": Fp8WeightOnly("e5m2"),
    "fp8-e4m3-per-tensor": Fp8WeightOnly("e4m3fn", "per_tensor"),
    "fp8-e5m2-per-tensor": Fp8WeightOnly("e5m2", "per_tensor"),
    "bnb-nf4": BackendScheme("bitsandbytes", "nf4"),
    "bnb-llm-int8": BackendScheme("bitsandbytes", "llm_int8"),
    "quanto-qint8": BackendScheme("optimum-quanto", "qint8"),
    "quanto-qfloat8": BackendScheme("optimum-quanto", "qfloat8"),
}
SCHEME_NAMES = tuple(_BY_NAME)


def scheme_from_name(name: str) -> Scheme | BackendScheme:
    """``"int8" | "w8a8" | "w8a8-rot" | "fp8-e4m3" | "fp8-e5m2"`` (and optional ``bnb-*``/``quanto-*``)."""
    key = name.strip().lower()
    if key not in _BY_NAME:
        raise InvalidArgumentError(
            f"quantization scheme {name!r} is unknown; use one of {', '.join(SCHEME_NAMES)}."
        )
    return _BY_NAME[key]


def scheme_from_dict(spec: Mapping) -> Scheme:
    """The scheme a ``to_metadata()`` dict describes."""
    kind = spec.get("name") if isinstance(spec, Mapping) else None
    if kind == "int8":
        return Int8WeightOnly()
    if kind == "w8a8":
        hadamard = spec.get("hadamard", 0)
        if not isinstance(hadamard, int) or hadamard not in HADAMARD_WIDTHS:
            raise WeightsError(f"the file names a W8A8 rotation {hadamard!r} this pascaline does not know; "
                               "upgrade pascaline.")
        return Int8Dynamic(hadamard)
    if kind == "fp8":
        return Fp8WeightOnly(str(spec.get("fmt", "e4m3fn")), str(spec.get("granularity", "per_channel")))
    raise WeightsError(f"the file names an unknown quantization scheme {spec!r}; upgrade pascaline.")


def file_metadata(model_kind: str, scheme: Scheme) -> dict[str, str]:
    """The safetensors metadata of a quantized file."""
    payload = {"format_version": FORMAT_VERSION, "model": model_kind, "scheme": scheme.to_metadata()}
    return {METADATA_KEY: json.dumps(payload, sort_keys=True)}


def read_file_metadata(metadata: Mapping[str, str]) -> dict | None:
    """pascaline's own metadata record of a file, or ``None`` when it has none."""
    raw = metadata.get(METADATA_KEY) if metadata else None
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except json.JSONDecodeError:
        raise WeightsError("the file's pascaline metadata is not valid JSON; write it again.") from None
    if not isinstance(record, dict):
        raise WeightsError("the file's pascaline metadata is not a JSON object; write it again.")
    version = record.get("format_version")
    if version != FORMAT_VERSION:
        raise WeightsError(
            f"the file uses pascaline file format version {version}, this pascaline reads "
            f"version {FORMAT_VERSION}; upgrade pascaline or quantize the file again."
        )
    return record


def scheme_from_metadata(metadata: Mapping[str, str]) -> Scheme | None:
    """The scheme a pascaline quantized file records, or ``None`` for any other file."""
    record = read_file_metadata(metadata)
    if record is None or record.get("scheme") is None:
        return None
    return scheme_from_dict(record["scheme"])


def plain_int8(scheme: Scheme | BackendScheme) -> bool:
    """Whether ``scheme`` stores unrotated int8 per-channel weights (``int8`` and ``w8a8``)."""
    return isinstance(scheme, Int8WeightOnly) or (isinstance(scheme, Int8Dynamic) and not scheme.hadamard)


def same_storage(a: Scheme | BackendScheme, b: Scheme | BackendScheme) -> bool:
    """Whether two schemes store weights identically (int8 and W8A8 differ only in the matmul).

    A rotated W8A8 scheme shares its storage with itself only.
    """
    return a == b or (plain_int8(a) and plain_int8(b))


def resolve_scheme(
    quant, metadata: Mapping[str, str], source: str = "the file"
) -> Scheme | BackendScheme | None:
    """The scheme a loader builds with: the caller's (a scheme or its name), else the file's own.

    A pascaline-quantized file runs under its own scheme or one with the same storage
    (an int8 file as ``w8a8``); any other request is refused, since requantizing stored
    codes would silently compound the two roundings.
    """
    asked = scheme_from_name(quant) if isinstance(quant, str) else quant
    stored = scheme_from_metadata(metadata)
    if stored is None or asked is None:
        return stored if asked is None else asked
    if not same_storage(asked, stored):
        runs = "int8 or w8a8" if plain_int8(stored) else stored.name
        raise InvalidArgumentError(
            f"{source} is stored quantized as {stored.name} and runs as {runs}, not {asked.name}; "
            f"use the original bf16 file for {asked.name}."
        )
    return asked
