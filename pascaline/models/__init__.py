"""Plain PyTorch model definitions, one file per family; no device code."""
