"""Bench kits, one per family: ``bench/kits/<family name>.py`` defines ``KIT`` (see ``kits.base``).

A kit is found from its family's name, so benchmarking a new family adds one file here and
no shared module grows an ``if family == ...`` branch. It is a module of the bench rather
than a hook on the family because imports go one way (families and runtime below, the bench
on top): a family declaration stays free of random-weight builders, diffusers twins and
FLOP counters, and the bench can change without touching any family.

    kit = get_kit("sd3")          # or kit_of_config(cfg) for a config object
"""

from __future__ import annotations

import importlib
import pkgutil

from pascaline.bench.kits.base import BenchKit
from pascaline.errors import InvalidArgumentError


def kit_names() -> tuple[str, ...]:
    """The families the bench has a kit for."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base"))


def get_kit(family_name: str) -> BenchKit:
    """The kit of the family called ``family_name``."""
    if family_name not in kit_names():
        raise InvalidArgumentError(
            f"pascaline bench has no kit for the {family_name!r} family yet; it benchmarks "
            f"{', '.join(kit_names())}.")
    return importlib.import_module(f"{__name__}.{family_name}").KIT


def kit_of_config(cfg) -> BenchKit:
    """The kit whose diffusion model takes configs like ``cfg``."""
    for name in kit_names():
        kit = get_kit(name)
        if isinstance(cfg, kit.config_type):
            return kit
    raise ValueError(f"no bench kit takes a {type(cfg).__name__}")


def step_batch(family, variant) -> int:
    """The batch of one sampler step: 2 when guidance runs positive and negative as one batch."""
    return 2 if family.cfg_batching and variant.defaults.cfg > 1 else 1
