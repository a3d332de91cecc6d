"""GGML tensor types: their ids, names and block layouts, and the ones pascaline dequantizes.

A GGML type stores ``block_size`` consecutive values of a row in ``type_size`` bytes; a
row of ``K`` values is ``K / block_size`` blocks, so rows are independent and whole
blocks (a row slice of the raw bytes is a valid tensor of fewer rows). The table lists
every id ggml has assigned, so a file using a type pascaline cannot read is refused by
its name (``IQ2_XXS``), not by a number.
"""

from __future__ import annotations

from dataclasses import dataclass

from pascaline.errors import WeightsError


@dataclass(frozen=True)
class GGMLType:
    """One GGML tensor type: ``block_size`` values in ``type_size`` bytes."""

    id: int
    name: str
    block_size: int
    type_size: int

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per value (Q4_K: 4.5, Q8_0: 8.5, F16: 16)."""
        return 8 * self.type_size / self.block_size

    def row_nbytes(self, row: int) -> int:
        """Bytes of a row of ``row`` values (``row`` must be whole blocks)."""
        return row // self.block_size * self.type_size


# Every id of ggml's `enum ggml_type` (ggml.h); 4, 5 and 31-33 were removed upstream.
_TABLE = (
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 40),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
    (40, "NVFP4", 64, 36),
    (41, "Q1_0", 128, 18),
)
GGML_TYPES: dict[int, GGMLType] = {t[0]: GGMLType(*t) for t in _TABLE}
BY_NAME: dict[str, GGMLType] = {t.name: t for t in GGML_TYPES.values()}

FLOAT_TYPES = ("F32", "F16", "BF16")  # stored as plain floats: loaded like any float tensor
QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
SUPPORTED = FLOAT_TYPES + QUANT_TYPES


def ggml_type(type_id: int, what: str = "a tensor") -> GGMLType:
    """The supported GGML type with id ``type_id``; ``WeightsError`` naming it otherwise.

    ``what`` is the subject of the message (``"model.gguf: blk.0.attn_q.weight"``).
    """
    known = GGML_TYPES.get(type_id)
    if known is None:
        raise WeightsError(
            f"{what} uses GGML type {type_id}, which no ggml release pascaline knows defines; "
            "the file is damaged or newer than pascaline: use a Q8_0, Q6_K, Q5_K, Q4_K or "
            "Q4_0 file."
        )
    if known.name not in SUPPORTED:
        raise WeightsError(
            f"{what} is quantized as {known.name}, a GGML type pascaline cannot dequantize; "
            f"use a file quantized as one of {', '.join(SUPPORTED)}."
        )
    return known


def type_named(name: str) -> GGMLType:
    """A supported type by name (``"Q4_K"``)."""
    found = BY_NAME.get(name.upper())
    if found is None or found.name not in SUPPORTED:
        raise WeightsError(f"{name!r} is not a GGML type pascaline reads; use one of {', '.join(SUPPORTED)}.")
    return found


def is_quantized(t: GGMLType) -> bool:
    """Block-quantized (needs a dequantizer), as opposed to F32/F16/BF16."""
    return t.name not in FLOAT_TYPES
