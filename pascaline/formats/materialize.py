"""Fill a meta-device model from a stream of tensors, one at a time, strictly.

Every loader builds its model on ``meta`` and hands this function an iterator of
``(canonical_key, tensor)`` pairs read lazily from the file. Each tensor is cast (or,
when the owning module knows how, quantized) as it arrives, so peak host memory is the
final model plus one tensor, never a second full-precision copy. A tensor that would
still be a view of the file mapping after its cast (the file's dtype is the model's, as
in a pre-quantized file) is copied here, so loading reads what it loads and the model
never depends on the mapping (whose pages count as the process's memory while it lives).

A module that stores a weight in another form (``QLinear``) says so by defining
``state_from_float(name, tensor) -> {name: tensor}``: given the float ``weight`` it
returns its own buffers (``qweight``, ``scale``). Already-quantized tensors (a
pre-quantized file) carry the module's own names and are taken as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from pascaline.errors import StateDictError

_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    prefix, _, name = key.rpartition(".")
    try:
        return (model.get_submodule(prefix) if prefix else model), name
    except AttributeError:
        return model, key


def _borrowed(t: torch.Tensor) -> bool:
    """Memory torch does not own: a view of a file mapping (``WeightSource.get``) or of another
    library's buffer. torch cannot resize such storage, which is how it is told apart."""
    return t.device.type == "cpu" and not t.untyped_storage().resizable()


def _owned(t: torch.Tensor) -> torch.Tensor:
    return t.clone() if _borrowed(t) else t


def check_dtype(source: str, key: str, tensor: torch.Tensor, expected: torch.Tensor | None,
                kept: bool = False) -> None:
    """StateDictError naming ``key`` when ``tensor`` cannot fill ``expected`` (None: the float
    ``weight`` a module quantizes on load): a float parameter never takes integers; stored
    codes (an int8 or, kept as they are, fp8 ``qweight``) only their own dtype."""
    wanted = "a float weight" if expected is None else "a float tensor"
    if (expected is None or expected.is_floating_point()) and not tensor.is_floating_point():
        problem = f"{key} holds {_dtype(tensor)} where {wanted} belongs"
    elif expected is not None and (not expected.is_floating_point() or (kept and expected.dtype in _FLOAT8)) \
            and tensor.dtype != expected.dtype:  # fmt: skip
        problem = f"{key} holds {_dtype(tensor)} where {_dtype(expected)} belongs"
    else:
        return
    raise StateDictError(f"{source}: {problem}; the file is damaged or of another model.")


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None or not t.is_floating_point():
        return t
    if t.dtype in _FLOAT8:
        # A float8 tensor that reaches a float module is widened exactly, then cast.
        t = t.float()
    return t.to(dtype)


# Who hears of the bytes a load reads (``reading``): the pipeline's per-component progress. A
# context variable rather than a parameter, because every family's loaders end here and the
# caller that wants progress (the pipeline) sits above them all.
_READ_PROGRESS: ContextVar[Callable[[int], None] | None] = ContextVar("pascaline_read_progress", default=None)


@contextmanager
def reading(callback: Callable[[int], None]) -> Iterator[None]:
    """Within the block, ``callback(nbytes)`` hears of every tensor a loader reads from its file."""
    token = _READ_PROGRESS.set(callback)
    try:
        yield
    finally:
        _READ_PROGRESS.reset(token)


def load_state_(
    model: nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    dtype: torch.dtype | None,
    device: torch.device | str = "cpu",
    source: str = "the weights",
    keep_dtype: Iterable[str] = (),
) -> nn.Module:
    """Load ``tensors`` into ``model`` (built on meta) strictly, with ``assign=True``.

    ``dtype`` is the storage dtype of float tensors (``None`` keeps the file's);
    keys listed in ``keep_dtype`` keep their file dtype (e.g. quantization scales).
    Raises ``StateDictError`` naming ``source`` with the missing, unexpected or
    mis-shaped keys, or the first key whose dtype cannot fill its parameter.
    """
    expected = model.state_dict(keep_vars=True)
    keep = set(keep_dtype)
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    heard = _READ_PROGRESS.get()
    for key, tensor in tensors:
        if heard is not None:
            heard(tensor.numel() * tensor.element_size())
        owner, name = _owner(model, key)
        convert = getattr(owner, "state_from_float", None)
        if convert is not None and key not in expected and (tensor.is_floating_point() or name == "weight"):
            check_dtype(source, key, tensor, None)
            prefix = key[: len(key) - len(name)]
            produced = convert(name, tensor)
            state.update({prefix + k: _owned(v.to(device)) for k, v in produced.items()})
            continue
        if key not in expected:
            unexpected.append(key)
            continue
        check_dtype(source, key, tensor, expected[key], key in keep)
        state[key] = _owned(_cast(tensor, None if key in keep else dtype).to(device))
    missing = sorted(set(expected) - set(state))
    bad_shapes = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or bad_shapes:
        raise StateDictError(_mismatch_message(source, missing, sorted(unexpected), bad_shapes))
    model.load_state_dict(state, strict=True, assign=True)
    return model


def load_with_scheme_(model: nn.Module, source, tensors: Callable[[], Iterable[tuple[str, torch.Tensor]]], *,
                      quant, dtype: torch.dtype | None, device: torch.device | str = "cpu", loras=(),
                      lora_targets=None) -> nn.Module:
    """The end of every weights loader: quantize ``model`` (built on meta) under ``quant`` or the scheme
    the file's metadata records, stream ``tensors()`` in strictly from the open ``source`` (a
    ``WeightSource``, closed afterwards), and return the model in eval mode without gradients.

    Quantized storage (``qweight``/``scale``, converted from float or read pre-quantized) keeps its
    dtype; every other float tensor is cast to ``dtype``. ``loras`` (``[(LoraFile, strength)]``)
    are merged into the float weights as they stream in, before any cast or quantization (one
    rounding), through the family's key map ``lora_targets(weight_shapes)``; they are fixed for the
    model's lifetime (``pascaline.lora.apply_loras_`` on a loaded model makes removable ones).
    """
    from pascaline.quant import keep_dtype_keys, quantize_
    from pascaline.quant.schemes import resolve_scheme

    scheme = resolve_scheme(quant, source.metadata, str(source.path))
    stream = tensors
    if loras:
        from pascaline.lora import merged_tensors, weight_shapes

        targets = lora_targets(weight_shapes(model))  # before quantize_: the float layers' shapes

        def stream():
            return merged_tensors(tensors(), loras, targets)

    if scheme is not None:
        quantize_(model, scheme)
    with source:
        load_state_(model, stream(), dtype=dtype, device=device, source=str(source.path),
                    keep_dtype=keep_dtype_keys(model))
    return model.requires_grad_(False).eval()


def _mismatch_message(source: str, missing: list[str], unexpected: list[str], bad: list[str]) -> str:
    def show(keys: list[str]) -> str:
        head = ", ".join(keys[:6])
        return head + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {show(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {show(unexpected)}")
    if bad:
        parts.append(f"{len(bad)} wrong shape(s): {show(bad)}")
    return f"{source} does not match the model ({'; '.join(parts)}); is it the right file?"
