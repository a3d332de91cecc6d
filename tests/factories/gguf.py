"""GGUF files written with the ``gguf`` package the way the real converters write them.

- ``write_gguf`` writes named float32 arrays, each in its GGML type: ``gguf.quants.quantize``
  where the package has a quantizer, hand-built blocks (``random_blocks``: random bytes with
  small finite fp16 scales) for the K-quants, which it can only dequantize. It returns the
  values the file holds (``gguf.quants.dequantize`` of what was written): the reference.
- ``zimage_gguf`` follows city96's converter (``lumina2``, ComfyUI names, embedders, refiners
  and the final layer left F16, 1-D tensors F32) or sd.cpp's (no architecture key,
  ``model.diffusion_model.`` prefix, every tensor whose rows fit the blocks quantized,
  norms and pad tokens included, except biases and the x/t embedders and final layer).
- ``qwen3_gguf``/``t5_gguf`` name tensors with gguf's own ``TensorNameMap`` (what llama.cpp's
  ``convert_hf_to_gguf.py`` uses), so pascaline's inverse maps are checked against it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

# The `gguf` extra: the reference writer and dequantizer (pascaline itself never imports it).
# Test modules that import this factory are skipped without it.
gguf = pytest.importorskip("gguf")

Q = gguf.GGMLQuantizationType
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# byte offsets of the fp16 scale fields, and the largest |code x sub-scale| they multiply
_SCALE_FIELDS = {
    "Q2_K": ((80, 45), (82, 15)),
    "Q3_K": ((108, 128),),
    "Q4_K": ((0, 945), (2, 63)),
    "Q5_K": ((0, 1953), (2, 63)),
    "Q6_K": ((208, 4096),),
    "Q8_0": ((0, 127),),
    "Q4_0": ((0, 8),),
    "Q4_1": ((0, 15), (2, 1)),
    "Q5_0": ((0, 16),),
    "Q5_1": ((0, 31), (2, 1)),
}


def random_blocks(qtype: str, n_blocks: int, rng: np.random.Generator, amplitude: float = 0.05) -> np.ndarray:
    """``[n_blocks, type_size]`` random blocks whose values stay within about ``amplitude``."""
    block, size = gguf.GGML_QUANT_SIZES[Q[qtype]]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for at, reach in _SCALE_FIELDS[qtype]:
        scale = rng.uniform(0.2, 1.0, n_blocks) * rng.choice([-1, 1], n_blocks) * amplitude / reach
        raw[:, at : at + 2] = scale.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return raw


def encode(values: np.ndarray, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """``values`` (float32) in ``qtype``; K-quants get random blocks of the same shape instead."""
    if qtype in K_QUANTS:
        block, size = gguf.GGML_QUANT_SIZES[Q[qtype]]
        rows = values.reshape(-1, values.shape[-1])
        raw = random_blocks(qtype, rows.size // block, rng, float(np.abs(values).max()) or 0.05)
        return raw.reshape(*values.shape[:-1], values.shape[-1] // block * size)
    return gguf.quants.quantize(values.astype(np.float32), Q[qtype])


def write_gguf(
    path: Path,
    tensors: dict[str, tuple[np.ndarray, str]],
    *,
    arch: str | None = None,
    metadata: dict | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Write ``{name: (float32 values, type name)}``; return ``{name: values the file holds}`` (fp32)."""
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch or "none")
    if arch is None:  # sd.cpp writes no general.architecture
        writer.kv_data[0].pop("general.architecture")
    for key, (value, vtype) in (metadata or {}).items():
        writer.add_key_value(key, value, vtype)
    held = {}
    for name, (values, qtype) in tensors.items():
        data = encode(np.ascontiguousarray(values, dtype=np.float32), qtype, rng)
        writer.add_tensor(name, data, raw_dtype=Q[qtype])
        held[name] = torch.from_numpy(np.array(gguf.quants.dequantize(data, Q[qtype]), dtype=np.float32))
        held[name] = held[name].reshape(values.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


def fits(values: np.ndarray, qtype: str) -> bool:
    return values.ndim >= 2 and values.shape[-1] % gguf.GGML_QUANT_SIZES[Q[qtype]][0] == 0


_CITY96_FLOAT = (
    "t_embedder.",
    "x_embedder.",
    "final_layer.",
    "cap_embedder.",
    "context_refiner.",
    "noise_refiner.",
)
_SDCPP_FLOAT = ("x_embedder.", "t_embedder.", "final_layer.")


def zimage_gguf(
    comfy_sd: dict[str, torch.Tensor], path: Path, qtype: str, *, form: str = "city96", seed: int = 0
) -> dict[str, torch.Tensor]:
    """A ComfyUI-named Z-Image state dict as a city96 or sd.cpp GGUF; returns the held values."""
    tensors = {}
    for name, t in comfy_sd.items():
        v = t.float().numpy()
        if form == "city96":
            kind = (
                "F32"
                if v.ndim == 1
                else "F16"
                if name.startswith(_CITY96_FLOAT) or not fits(v, qtype)
                else qtype
            )
        else:
            row_fits = v.shape[-1] % gguf.GGML_QUANT_SIZES[Q[qtype]][0] == 0
            keep = name.endswith(".bias") or name.startswith(_SDCPP_FLOAT) or not row_fits
            kind = ("F32" if v.ndim == 1 else "F16") if keep else qtype
            if kind == qtype and v.ndim == 1 and qtype in K_QUANTS:
                kind = "F32"
        tensors[name if form == "city96" else "model.diffusion_model." + name] = (v, kind)
    held = write_gguf(path, tensors, arch="lumina2" if form == "city96" else None, seed=seed)
    return {k.removeprefix("model.diffusion_model."): v for k, v in held.items()}


def _tensor_map(arch, n_blocks: int):
    return gguf.get_tensor_name_map(arch, n_blocks)


def llama_cpp_names(hf_sd: dict[str, torch.Tensor], arch, n_blocks: int) -> dict[str, str]:
    """HF name -> llama.cpp name, through gguf's ``TensorNameMap`` (as ``convert_hf_to_gguf.py``)."""
    tmap = _tensor_map(arch, n_blocks)
    return {k: tmap.get_name(k, try_suffixes=(".weight", ".bias")) for k in hf_sd}


def qwen3_gguf(
    model, path: Path, qtype: str, *, embed_type: str | None = None, types=None, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A transformers ``Qwen3Model`` as llama.cpp writes it; returns the held values under HF names.

    ``types``: optional ``{hf_name_part: type}`` overrides (a K-quant mix like Q4_K_M).
    """
    sd = {"model." + k: v for k, v in model.state_dict().items()}
    names = llama_cpp_names(sd, gguf.MODEL_ARCH.QWEN3, model.config.num_hidden_layers)
    tensors = {}
    for hf, t in sd.items():
        v = t.float().numpy()
        kind = "F32" if v.ndim == 1 else (embed_type or qtype) if "embed_tokens" in hf else qtype
        for part, override in (types or {}).items():
            kind = override if part in hf and v.ndim == 2 else kind
        tensors[names[hf]] = (v, kind)
    cfg = model.config
    metadata = {
        "qwen3.rope.freq_base": (
            float(cfg.rope_theta if hasattr(cfg, "rope_theta") else 1e6),
            gguf.GGUFValueType.FLOAT32,
        ),
        "qwen3.attention.layer_norm_rms_epsilon": (cfg.rms_norm_eps, gguf.GGUFValueType.FLOAT32),
    }
    held = write_gguf(path, tensors, arch="qwen3", metadata=metadata, seed=seed)
    back = {v: k for k, v in names.items()}
    return {back[k].removeprefix("model."): v for k, v in held.items()}


def t5_gguf(model, path: Path, qtype: str, *, keep_float: tuple[str, ...] = (), seed: int = 0):
    """A transformers ``T5EncoderModel`` as llama.cpp's ``t5encoder`` GGUF; held values by HF name.

    Names containing a ``keep_float`` part stay F16.
    """
    sd = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied to shared
    names = llama_cpp_names(sd, gguf.MODEL_ARCH.T5ENCODER, model.config.num_layers)
    tensors = {}
    for hf, t in sd.items():
        v = t.float().numpy()
        quantize = fits(v, qtype) and not any(part in hf for part in keep_float)
        kind = "F32" if v.ndim == 1 or "relative_attention_bias" in hf else qtype if quantize else "F16"
        tensors[names[hf]] = (v, kind)
    held = write_gguf(path, tensors, arch="t5encoder", seed=seed)
    back = {v: k for k, v in names.items()}
    return {back[k]: v for k, v in held.items()}


def mmdit_gguf(original_sd: dict[str, torch.Tensor], path: Path, qtype: str, *, seed: int = 0):
    """An SD3 MMDiT state dict (original names, no prefix) as city96's converter writes it (``sd3``:
    1-D tensors F32, linear weights whose rows fit the blocks in ``qtype``, the rest F16); returns
    the held values by name."""
    tensors = {}
    for name, t in original_sd.items():
        v = t.float().numpy()
        tensors[name] = (v, "F32" if v.ndim == 1 else qtype if v.ndim == 2 and fits(v, qtype) else "F16")
    return write_gguf(path, tensors, arch="sd3", seed=seed)
