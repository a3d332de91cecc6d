"""LoRA for every family, on float and quantized weights.

    from pascaline.formats.zimage_lora import zimage_lora_targets
    from pascaline.lora import apply_loras_, read_lora, set_lora_strengths_, remove_loras_

    style = read_lora("style.safetensors")              # any trainer's format (files.py)
    apply_loras_(dit, [(style, 0.8)], zimage_lora_targets)  # merge float, branch quantized
    set_lora_strengths_(dit, [0.5])                     # no reload of the base model
    remove_loras_(dit)

The mechanism is shared; a family supplies only its key map (``formats/zimage_lora.py``,
``formats/sd3_lora.py``). See ``apply.py`` for when a LoRA is merged and when it runs as a
branch, ``merge.py`` for merging while a model loads.
"""

from pascaline.lora.apply import (
    MODES,
    AppliedLora,
    LoraState,
    apply_loras_,
    branch_nbytes,
    lora_state,
    planned_branch_bytes,
    remove_loras_,
    set_lora_strengths_,
    weight_shapes,
)
from pascaline.lora.branch import LoraBranch
from pascaline.lora.files import (
    LoraFile,
    LoraModule,
    a1111_lora_text,
    lora_records,
    parse_lora_spec,
    read_lora,
)
from pascaline.lora.keys import LoraEntry, LoraTargets, LoraWarning, Target, resolve
from pascaline.lora.merge import merged_tensors

__all__ = [
    "MODES",
    "AppliedLora",
    "LoraBranch",
    "LoraEntry",
    "LoraFile",
    "LoraModule",
    "LoraState",
    "LoraTargets",
    "LoraWarning",
    "Target",
    "a1111_lora_text",
    "apply_loras_",
    "branch_nbytes",
    "lora_records",
    "lora_state",
    "merged_tensors",
    "parse_lora_spec",
    "planned_branch_bytes",
    "read_lora",
    "remove_loras_",
    "resolve",
    "set_lora_strengths_",
    "weight_shapes",
]
