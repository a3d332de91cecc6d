"""Weight quantization: schemes, primitives, QLinear, quantize_, quantized files."""
