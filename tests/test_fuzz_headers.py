"""Seeded fuzzing of our safetensors readers: malformed headers and index files.

Every case starts from a valid small file (or a sharded folder with its index json) and
breaks it in one to three ways drawn from a fixed seed: random truncation, wrong JSON
types in every field, lying shapes and offsets, overlaps, huge numbers, bad metadata,
duplicate names, deep nesting, bytes that are not UTF-8, shard names that leave the
folder. Each case must either read cleanly or end in a ``PascalineError``, never another
exception, and must not allocate more than the file's size: Python allocations are
traced (``tracemalloc``) and every tensor handed out must fit in the file (they are
views of its mapping), so nothing is ever sized from a header's numbers.
"""

from __future__ import annotations

import json
import math
import random
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pascaline.errors import PascalineError
from pascaline.formats.detect import guess_kind
from pascaline.formats.safetensors_io import WeightSource
from pascaline.offload.ledger import host_memory

SEED = 1729
HEADER_CASES = 320
INDEX_CASES = 120
# JSON parsing builds dicts and lists a few times the size of the text it reads
PYTHON_BYTES_PER_FILE_BYTE = 16
PYTHON_SLACK = 256 << 10

JUNK = [None, True, False, 0, -1, 1.5, float("nan"), float("inf"), 2**64, 10**30, -(2**63), "", "x",
        "F32", [], [1], [-1, 2], [2**62, 2**62], [1.0, 2.0], ["1"], [[1]], {}, {"a": 1},
        {"dtype": "F32"}]  # fmt: skip
DTYPE_TAGS = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8", "U8", "BOOL"]
ODD_TAGS = ["U16", "U32", "F8_E8M0", "f32", "FLOAT", "C64", "\u00e9", "F" * 500]


def _valid_tensors(rng: random.Random) -> dict[str, torch.Tensor]:
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8, torch.bool,
              torch.float8_e4m3fn, torch.int64]  # fmt: skip
    out = {}
    for i in range(rng.randint(1, 5)):
        shape = [rng.randint(0 if rng.random() < 0.1 else 1, 6) for _ in range(rng.randint(0, 3))]
        dtype = rng.choice(dtypes)
        out[f"layer.{i}.w{rng.randint(0, 9)}"] = torch.zeros(shape).to(dtype)
    return out


def _file(rng: random.Random, path: Path) -> tuple[dict, bytes]:
    """A valid safetensors file at ``path``; returns its header and data section."""
    metadata = {"format": "pt", "k": "v"} if rng.random() < 0.5 else None
    save_file(_valid_tensors(rng), str(path), metadata=metadata)
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _write(path: Path, header_text: bytes, data: bytes, length: int | None = None) -> None:
    length = len(header_text) if length is None else length
    path.write_bytes(struct.pack("<Q", length % 2**64) + header_text + data)


def _mutate_entry(rng: random.Random, header: dict) -> str:
    keys = [k for k in header if k != "__metadata__" and isinstance(header[k], dict)]
    if not keys or any(f not in header[k] for k in keys for f in ("shape", "data_offsets", "dtype")):
        header[f"w{rng.randint(0, 9)}"] = rng.choice(JUNK)  # an earlier mutation broke an entry already
        return "junk entry"
    key = rng.choice(keys)
    entry = header[key]
    if not (isinstance(entry["shape"], list) and isinstance(entry["data_offsets"], list)
            and len(entry["data_offsets"]) == 2):  # fmt: skip
        header[key] = rng.choice(JUNK)
        return "junk entry"
    kind = rng.choice(["field", "drop", "extra", "dtype", "shape", "offsets", "overlap", "past_end", "whole"])
    if kind == "field":
        entry[rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(JUNK)
    elif kind == "drop":
        entry.pop(rng.choice(list(entry)), None)
    elif kind == "extra":
        entry["extra"] = rng.choice(JUNK)
    elif kind == "dtype":
        entry["dtype"] = rng.choice(DTYPE_TAGS + ODD_TAGS)
    elif kind == "shape":
        shape = list(entry["shape"])
        op = rng.choice(["grow", "neg", "huge", "add_dim", "zero_huge"])
        if op == "grow" and shape:
            shape[rng.randrange(len(shape))] += rng.randint(1, 3)
        elif op == "neg" and shape:
            shape[0] = -shape[0] - 1
        elif op == "huge":
            shape = [2**rng.randint(31, 70)] * rng.randint(1, 3)
        elif op == "zero_huge":
            shape = [0, 2**rng.randint(20, 62)]
        else:
            shape.append(rng.randint(0, 9))
        entry["shape"] = shape
    elif kind == "offsets":
        a, b = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[b, a], [a, b + 1], [a - 1, b], [a + 2**40, b + 2**40],
                                            [-a - 8, b], [a, 2**63], [a, b, b], [a]])  # fmt: skip
    elif kind == "overlap" and len(keys) > 1:
        other = header[rng.choice([k for k in keys if k != key])]
        entry["data_offsets"] = list(other["data_offsets"])
        entry["shape"], entry["dtype"] = list(other["shape"]), other["dtype"]
    elif kind == "past_end":
        a, b = entry["data_offsets"]
        shift = rng.randint(1, 4096)
        entry["data_offsets"] = [a + shift, b + shift]
    else:
        header[key] = rng.choice(JUNK)
    return f"entry {kind}"


def _mutate_text(rng: random.Random, text: bytes) -> tuple[bytes, str]:
    kind = rng.choice(["cut", "flip", "utf8", "dup", "deep", "top", "nan", "bigint"])
    if kind == "cut":
        return text[: rng.randrange(len(text) + 1)], kind
    if kind == "flip":
        raw = bytearray(text)
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw), kind
    if kind == "utf8":
        i = text.find(b'"', 2)
        return text[: i + 1] + b"\xff\xfe" + text[i + 1 :], kind
    if kind == "dup":
        first = text[1:].split(b",", 1)[0]  # the first member, written again
        return b"{" + first + b"," + text[1:], kind
    if kind == "deep":
        depth = rng.choice([100, 5000, 200_000])
        return b'{"a":' + b"[" * depth + b"]" * depth + b"}", kind
    if kind == "top":
        return rng.choice([b"[]", b'"x"', b"1", b"null", b"{", b"{}", b'{"__metadata__": {}}']), kind
    if kind == "nan":
        return text.replace(b"[", b"[NaN,", 1), kind
    return text.replace(b"[", b"[" + b"9" * rng.choice([30, 4000, 5000]) + b",", 1), kind


def _mutate_metadata(rng: random.Random, header: dict) -> str:
    junk = [[], ["a"], "text", 1, {"a": 1}, {"a": None}, {"a": {"b": "c"}}, None]
    header["__metadata__"] = rng.choice(junk)
    return "metadata"


def _header_case(rng: random.Random, path: Path) -> str:
    header, data = _file(rng, path)
    done = []
    for _ in range(rng.randint(1, 3)):
        pick = rng.random()
        if pick < 0.55:
            done.append(_mutate_entry(rng, header))
        elif pick < 0.65:
            done.append(_mutate_metadata(rng, header))
        else:
            done.append("text")
    text = json.dumps(header).encode()
    if "text" in done:
        text, kind = _mutate_text(rng, text)
        done[done.index("text")] = f"text {kind}"
    length = None
    if rng.random() < 0.15:
        length = rng.choice([0, 1, len(text) - 1, len(text) + 7, 2**40, 2**64 - 1, 100 * 1024 * 1024])
        done.append(f"length {length}")
    if rng.random() < 0.15:
        data = data[: rng.randrange(len(data) + 1)]
        done.append("data cut")
    _write(path, text, data, length)
    if rng.random() < 0.1:
        blob = path.read_bytes()
        path.write_bytes(blob[: rng.randrange(len(blob) + 1)])
        done.append("file cut")
    return ", ".join(done)


def _read_all(path: Path) -> None:
    """What every loader does with a file: the header, the kind, then each tensor."""
    size = sum(p.stat().st_size for p in ([path] if path.is_file() else path.iterdir()))
    with WeightSource(path) as source:
        guess_kind(source.shapes())
        for key, tensor in source.items():
            assert tensor.numel() * tensor.element_size() <= size, key
            assert tuple(tensor.shape) == source.shape(key)


def _check(path: Path, label: str) -> None:
    size = sum(p.stat().st_size for p in ([path] if path.is_file() else path.iterdir()))
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    try:
        _read_all(path)
    except PascalineError as exc:
        message = str(exc)
        assert message.endswith(".") and "\n" not in message and len(message) < 600, (label, message)
    except Exception as exc:  # noqa: BLE001 - the point of the test: nothing but our own errors
        pytest.fail(f"{label}: {type(exc).__name__}: {exc}")
    grown = tracemalloc.get_traced_memory()[1] - before
    assert grown <= PYTHON_BYTES_PER_FILE_BYTE * size + PYTHON_SLACK, (label, grown, size)


@pytest.fixture
def traced():
    tracemalloc.start()
    real = host_memory()
    yield
    tracemalloc.stop()
    after = host_memory()
    if real is not None and after is not None:  # nothing sized from a header stayed allocated
        assert after.real_bytes - real.real_bytes < 64 << 20


def test_malformed_headers_end_in_our_errors(tmp_path, traced):
    rng = random.Random(SEED)
    outcomes = {"read": 0, "refused": 0}
    for i in range(HEADER_CASES):
        path = tmp_path / f"case{i}.safetensors"
        label = f"case {i} ({_header_case(rng, path)})"
        try:
            _read_all(path)
            outcomes["read"] += 1
        except PascalineError:
            outcomes["refused"] += 1
        except Exception:  # noqa: BLE001, S110 - _check below reports it with its label
            pass
        _check(path, label)
        path.unlink()
    # the mutations must mostly break the file, and some harmless ones must still read
    assert outcomes["refused"] > HEADER_CASES * 0.6 and outcomes["read"] > 5, outcomes


# --- sharded folders ---------------------------------------------------------------------------

BAD_NAMES = ["../x.safetensors", "/etc/passwd", "sub/a.safetensors", "a.bin", "", ".", "..",
             "a\x00b.safetensors", "C:a.safetensors", "a:b.safetensors", "x" * 300 + ".safetensors",
             "missing.safetensors", "..\\a.safetensors"]  # fmt: skip


def _folder(rng: random.Random, root: Path) -> dict:
    root.mkdir()
    weight_map = {}
    for shard in ("a.safetensors", "b.safetensors"):
        header, _ = _file(rng, root / shard)
        prefix = shard[0]
        tensors = {f"{prefix}.{k}": v for k, v in WeightSource(root / shard).items()}
        save_file({k: v.clone() for k, v in tensors.items()}, str(root / shard))
        weight_map.update({k: shard for k in tensors})
    return {"metadata": {"total_size": 1}, "weight_map": weight_map}


def _index_case(rng: random.Random, root: Path) -> str:
    index = _folder(rng, root)
    kind = rng.choice(["map_type", "value_type", "name", "swap", "drop_key", "top", "text", "both"])
    wm = index["weight_map"]
    key = rng.choice(list(wm))
    if kind == "map_type":
        pairs = [[k, v] for k, v in wm.items()]
        index["weight_map"] = rng.choice([list(wm.values()), "a.safetensors", 3, None, {}, pairs])
    elif kind == "value_type":
        wm[key] = rng.choice(JUNK)
    elif kind == "name":
        wm[key] = rng.choice(BAD_NAMES)
    elif kind == "swap":
        wm[key] = "b.safetensors" if wm[key] == "a.safetensors" else "a.safetensors"
    elif kind == "drop_key":
        wm[f"ghost.{rng.randint(0, 9)}"] = "a.safetensors"
    elif kind == "top":
        index = rng.choice([[], "x", 1, None, {"metadata": {}}])
    elif kind == "both":  # the same tensor in both shards
        same = {"dup": torch.zeros(2)}
        save_file(same, str(root / "a.safetensors"))
        save_file({**same, "other": torch.ones(1)}, str(root / "b.safetensors"))
        index = {"weight_map": {"dup": "a.safetensors", "other": "b.safetensors"}}
    text = json.dumps(index).encode()
    if kind == "text":
        text, sub = _mutate_text(rng, text)
        kind = f"text {sub}"
    (root / "model.safetensors.index.json").write_bytes(text)
    return kind


def test_malformed_index_files_end_in_our_errors(tmp_path, traced):
    rng = random.Random(SEED + 1)
    refused = 0
    for i in range(INDEX_CASES):
        root = tmp_path / f"folder{i}"
        label = f"index case {i} ({_index_case(rng, root)})"
        try:
            _read_all(root)
        except PascalineError:
            refused += 1
        except Exception:  # noqa: BLE001, S110 - _check below reports it with its label
            pass
        _check(root, label)
    assert refused > INDEX_CASES * 0.6, refused


def test_the_generator_makes_valid_files_that_read_back(tmp_path):
    # the fuzz starts from files the readers accept, with values intact: a failure above is the mutation's
    rng = random.Random(SEED)
    for i in range(20):
        path = tmp_path / f"ok{i}.safetensors"
        header, _ = _file(rng, path)
        with WeightSource(path) as source:
            assert set(source.keys()) == set(header) - {"__metadata__"}
            for key, tensor in source.items():
                assert tensor.numel() == math.prod(header[key]["shape"])
