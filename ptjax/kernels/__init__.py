"""Hand-written CPU kernels called from jitted code as XLA FFI custom calls (see cpu.py)."""
