"""Which ONNX Runtime execution provider runs the graphs (MIGraphX on AMD, else CUDA, else CPU), and its options."""

import os
from pathlib import Path

import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _state

PROVIDERS = {"migraphx": "MIGraphXExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
INSTALL = {"migraphx": "pip install onnxruntime-migraphx (needs ROCm 7.x with MIGraphX)",
           "cuda": "pip install onnxruntime-gpu (needs CUDA 12)", "cpu": "pip install onnxruntime"}
# Options each provider accepts (ONNX Runtime 1.23+ names); anything else is refused before a session starts.
OPTIONS = {
    "migraphx": {"device_id", "migraphx_fp16_enable", "migraphx_bf16_enable", "migraphx_int8_enable",
                 "migraphx_exhaustive_tune", "migraphx_mem_limit", "migraphx_model_cache_dir", "migraphx_arena_extend_strategy"},
    "cuda": {"device_id", "gpu_mem_limit", "arena_extend_strategy", "cudnn_conv_algo_search", "do_copy_in_default_stream",
             "enable_cuda_graph", "use_tf32", "tunable_op_enable", "tunable_op_tuning_enable"},
    "cpu": set(),
}
# What session creation raises for a damaged graph or a provider that cannot start (these are not RuntimeErrors).
SESSION_ERRORS = (RuntimeError, _state.Fail, _state.InvalidGraph, _state.InvalidProtobuf, _state.NoSuchFile,
                  _state.InvalidArgument, _state.RuntimeException)


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


def default_cache_dir() -> Path:
    """Compiled MIGraphX programs (.mxr) are kept here and reused by the next run."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qwen3vl-stream" / "migraphx"


def provider_options(provider: str, device_id: int = 0, fp16: bool = False, cache_dir: str | None = None,
                     exhaustive_tune: bool = False, extra: dict | None = None) -> dict:
    """Options for the first provider in the list `choose` returned, checked against what it accepts."""
    name = next(n for n, p in PROVIDERS.items() if p == provider)
    options = {}
    if name == "migraphx":
        options = {"device_id": str(device_id), "migraphx_fp16_enable": str(int(fp16)),
                   "migraphx_exhaustive_tune": str(int(exhaustive_tune)),
                   "migraphx_model_cache_dir": str(cache_dir or default_cache_dir())}
        Path(options["migraphx_model_cache_dir"]).mkdir(parents=True, exist_ok=True)
    elif name == "cuda":
        options = {"device_id": str(device_id)}
    elif fp16 or exhaustive_tune or device_id:
        raise ProviderError("--device-id, --provider-fp16 and --exhaustive-tune need a GPU provider "
                            "(--provider migraphx or cuda)")
    unknown = sorted(set(extra or {}) - OPTIONS[name])
    if unknown:
        accepted = ", ".join(sorted(OPTIONS[name])) or "none"
        raise ProviderError(f"unknown {name} provider option {', '.join(unknown)}; accepted: {accepted}")
    return {**options, **{k: str(v) for k, v in (extra or {}).items()}}


def device_of(provider: str, options: dict) -> tuple[str, int]:
    """Where IO-bound buffers live for a provider: ONNX Runtime calls the AMD GPU "cuda" too."""
    if provider in (PROVIDERS["migraphx"], PROVIDERS["cuda"]):
        return "cuda", int(options.get("device_id", 0))
    return "cpu", 0
