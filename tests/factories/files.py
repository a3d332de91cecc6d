"""Writing state dicts as the files users have."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file


def save_sharded(sd: dict, folder: Path, stem: str = "model", shards: int = 2) -> Path:
    """``{stem}-0000i-of-0000n.safetensors`` (consecutive keys per shard) and the index json a
    ``save_pretrained`` writes, or ``{stem}.safetensors`` alone for one shard."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        save_file(sd, str(folder / f"{stem}.safetensors"))
        return folder
    keys, weight_map = list(sd), {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i * len(keys) // shards : (i + 1) * len(keys) // shards]
        save_file({k: sd[k] for k in part}, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": sum(v.nbytes for v in sd.values())}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index))
    return folder
