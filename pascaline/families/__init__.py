"""The model families pascaline runs, found by scanning this package (see ``families.base``).

Each module here (other than ``base``) defines ``FAMILY``, an instance of a ``Family``
subclass. Nothing is imported until a family is asked for, so ``import pascaline`` stays cheap.

    family = get_family("zimage")
    family, variant = resolve_variant("sd3.5-large")
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from pascaline.errors import InvalidArgumentError
from pascaline.families.base import Family, Variant


@cache
def family_names() -> tuple[str, ...]:
    """Every family module in this package, in name order."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base"))


@cache
def get_family(name: str) -> Family:
    """The family called ``name`` (``"zimage"``, ``"sd3"``)."""
    if name not in family_names():
        known = ", ".join(family_names())
        raise InvalidArgumentError(f"unknown model family {name!r}; pascaline runs {known}.")
    return importlib.import_module(f"{__name__}.{name}").FAMILY


def all_families() -> tuple[Family, ...]:
    return tuple(get_family(n) for n in family_names())


def variant_names() -> tuple[str, ...]:
    """Every variant name of every family (what ``--model`` takes)."""
    return tuple(v for f in all_families() for v in f.variants)


def resolve_variant(name: str) -> tuple[Family, Variant]:
    """The family and variant a ``--model`` name stands for."""
    for family in all_families():
        if name in family.variants:
            return family, family.variants[name]
    raise InvalidArgumentError(f"unknown model {name!r}; choose one of {', '.join(variant_names())}.")


def family_of_kind(kind: str) -> Family | None:
    """The family whose diffusion model is of tensor ``kind`` (None for encoders, VAEs, others)."""
    return next((f for f in all_families() if kind in f.dit.kinds), None)
