"""Serve side (numpy, onnxruntime, av, tokenizers; never torch): stream a video through the exported graphs."""
