"""Which scheme a GGUF file loads under, for the scheme a run asks for (``runtime.device.default_quant``).

Measured (``scripts/gguf_measure.py``, CPU, one thread; README "GGUF files"):

- Requantizing a GGUF weight to our int8 (per output channel) adds 41.3-41.8 dB SQNR of
  noise against the dequantized GGUF weight, whatever the type (Q8_0, Q6_K, Q5_0, Q4_K,
  Q4_0; a 3840 x 3840 layer), the same as int8 from a bf16 weight (41.3 dB). Against the
  original float weight that costs Q4_K 0.06 dB, Q5_0 0.2 dB, Q6_K 0.8 dB and Q8_0 5.6 dB
  (45.4 -> 39.9 dB). "Q8_0 mapped onto our int8 storage" is this same requantization (Q8_0's
  block-32 scales are not per row), so mapping only Q8_0 gains nothing over mapping all.
- A 3840 -> 10240 linear at 1024 tokens: fp32 matmul 0.89 s; dequantizing its GGUF weight
  0.12 s (Q8_0 and Q4_K), our int8 weight 0.16 s. On-device dequantization is cheap, but it
  leaves the matmul in the compute dtype, and on GTX 10xx/16xx and RTX 20xx the int8 matmul
  is the projected 2.8x speed-up of a step (compute-bound at 1024^2; README projections).

So under W8A8 every GGUF type is requantized once at load (W8A8 for the whole model, at
half the host RAM of bf16), and under every other policy (none, weight-only int8 or fp8)
the GGUF blocks are kept as they are (``GGUFLinear``): they already are weight-only
storage, with fewer bytes to hold and stream than int8, and a second rounding would buy
no speed.

A ``--quant`` the user names (``gguf_run_quant``): ``none`` keeps the blocks, ``w8a8`` and
``w8a8-rot`` requantize them, and a weight-only scheme (``int8``, ``fp8-*``) is refused in one
sentence: it would store the GGUF's weights again in another weight-only form, rounding them
a second time into more bytes, for the same dequantize-then-matmul compute (the same rule as a
pascaline pre-quantized file asked to run under another storage). ``auto`` is ``gguf_quant``.
"""

from __future__ import annotations

from pathlib import Path

from pascaline.errors import InvalidArgumentError
from pascaline.quant.schemes import Int8Dynamic, scheme_from_name


def gguf_quant(quant):
    """The ``quant`` to load a GGUF under when a run asks for ``quant`` (a scheme, its name or None).

    ``"w8a8"`` stays ``"w8a8"`` (requantize every type once at load); anything else is
    ``None`` (keep the GGUF blocks, dequantized on the device per layer).
    """
    scheme = scheme_from_name(quant) if isinstance(quant, str) and quant not in ("none", "auto") else quant
    return quant if isinstance(scheme, Int8Dynamic) else None


def gguf_run_quant(path: str | Path, quant: str | None, auto: bool) -> str | None:
    """The scheme the GGUF component at ``path`` loads with when a run asks for ``quant`` (a scheme
    name or None), ``auto`` telling that the device's policy chose it (see the module docstring)."""
    if quant is None or auto:
        return gguf_quant(quant)
    if isinstance(scheme_from_name(quant), Int8Dynamic):
        return quant
    from pascaline.gguf.names import inspect_gguf

    kind = inspect_gguf(path).quant_type
    raise InvalidArgumentError(
        f"{Path(path).name} is a GGUF file ({kind}), which runs on its own blocks (--quant none or auto) "
        f"or requantized for int8 compute (--quant w8a8), not stored again as {quant}; choose one of those."
    )
