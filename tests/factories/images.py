"""Image files for tests that a real camera could not make cheaply."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path


def claimed_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` (an RGB image); its data is a few bytes,
    so a reader that decodes before it checks the size is the one that pays."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path
