"""Export side (torch, transformers, onnx): Qwen3-VL to ONNX graphs plus a manifest, proven against transformers."""
