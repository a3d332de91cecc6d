"""Reading weights: safetensors access, format detection, key conversion, config inference."""
