"""Linear layers' weights: how they lie in memory for CPU decoding (linear_layout), 4-bit
layers run by torch's int4 CPU kernel (int4), and a built-in GGUF file's own blocks kept as
such layers (gguf)."""
