"""Compute kernels; every fast path has a ``_ref`` twin tested against it."""
