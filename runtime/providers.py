"""Which ONNX Runtime execution provider runs the graphs: MIGraphX (AMD), else CUDA, else CPU."""

import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _state

# What session creation raises for a damaged graph or a provider that cannot start (these are not RuntimeErrors).
SESSION_ERRORS = (RuntimeError, _state.Fail, _state.InvalidGraph, _state.InvalidProtobuf, _state.NoSuchFile,
                  _state.InvalidArgument, _state.RuntimeException)

PROVIDERS = {"migraphx": "MIGraphXExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
INSTALL = {"migraphx": "pip install onnxruntime-migraphx (needs ROCm 7.x with MIGraphX)",
           "cuda": "pip install onnxruntime-gpu (needs CUDA 12)", "cpu": "pip install onnxruntime"}


class ProviderError(Exception):
    pass


def choose(name: str = "auto") -> list[str]:
    """The provider list for a session: the asked-for one (CPU after it for what it cannot run)."""
    available = ort.get_available_providers()
    if name == "auto":
        name = next(n for n, p in PROVIDERS.items() if p in available or n == "cpu")
    if name not in PROVIDERS:
        raise ProviderError(f"unknown provider {name!r}: use auto, {', '.join(PROVIDERS)}")
    if PROVIDERS[name] not in available:
        raise ProviderError(f"the {name} provider is not available in this onnxruntime "
                            f"(available: {', '.join(available)}); {INSTALL[name]}")
    return list(dict.fromkeys([PROVIDERS[name], PROVIDERS["cpu"]]))
