"""Where modules live and run: the architecture table, hooks, devices and offload, quantized bases, loading, ranks."""
