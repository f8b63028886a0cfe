"""runtime.preprocess against transformers' own Qwen3-VL video code, bit for bit."""

import __future__
import ast
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from runtime.preprocess import patchify, smart_resize

torch = pytest.importorskip("torch")


def hf_function(module: str, name: str, cls: str | None = None):
    """A function of transformers taken from its source file rather than imported.

    The Qwen3-VL video processor module imports PIL and torchvision at load time, neither of which is
    installed beside the CPU torch, so the module itself cannot be imported. Compiling just the function we
    compare against keeps the reference the library's real code rather than a copy of it.
    """
    package = Path(importlib.util.find_spec("transformers").origin).parent
    source = (package / module).read_text()
    body = ast.parse(source).body
    if cls is not None:
        body = next(node for node in body if isinstance(node, ast.ClassDef) and node.name == cls).body
    func = next(node for node in body if isinstance(node, ast.FunctionDef) and node.name == name)
    func.decorator_list = []  # e.g. lru_cache, which would need hashable arguments
    namespace = {"math": math, "torch": torch, "np": np}
    # Postponed annotations: the signatures name types (Optional, tvF) this namespace does not have.
    code = compile(ast.Module(body=[func], type_ignores=[]), str(package / module), "exec",
                   flags=__future__.annotations.compiler_flag, dont_inherit=True)
    exec(code, namespace)
    return namespace[name]


QWEN3VL_VIDEO = "models/qwen3_vl/video_processing_qwen3_vl.py"
hf_smart_resize = hf_function(QWEN3VL_VIDEO, "smart_resize")
hf_patchify = hf_function(QWEN3VL_VIDEO, "patchify", cls="Qwen3VLVideoProcessor")
hf_fuse = hf_function("image_processing_backends.py", "_fuse_mean_std_and_rescale_factor",
                      cls="TorchvisionBackend")


def per_frame_reference(height, width, factor, min_pixels, max_pixels):
    # HF's budget covers t_bar * h_bar * w_bar. With num_frames == temporal_factor == 2, t_bar is 2, so its
    # comparisons are 2*h_bar*w_bar against the budget and its betas are sqrt(2*h*w / budget) and
    # sqrt(budget / (2*h*w)). Doubling both budgets makes every comparison the same integer comparison as
    # per frame, and each quotient (2a)/(2b) of exactly representable integers rounds to the same double as
    # a/b, so the per-frame rule must agree exactly, not approximately.
    return hf_smart_resize(2, height, width, temporal_factor=2, factor=factor,
                           min_pixels=2 * min_pixels, max_pixels=2 * max_pixels)


SIDES = [1, 2, 7, 13, 16, 27, 31, 32, 33, 47, 48, 63, 64, 100, 143, 224, 239, 240, 333, 360, 479, 480,
         576, 719, 720, 1000, 1079, 1080, 1280, 1920, 2160, 3840, 4096, 7680]
BUDGETS = [(32, 100 * 32 * 32, 768 * 32 * 32), (28, 56 * 56, 28 * 28 * 1280), (32, 16 * 32 * 32, 64 * 32 * 32)]


@pytest.mark.parametrize("factor,min_pixels,max_pixels", BUDGETS)
def test_smart_resize_matches_transformers(factor, min_pixels, max_pixels):
    for height in SIDES:
        for width in SIDES:
            try:
                expected = per_frame_reference(height, width, factor, min_pixels, max_pixels)
            except ValueError:
                with pytest.raises(ValueError):
                    smart_resize(height, width, factor, min_pixels, max_pixels)
                continue
            got = smart_resize(height, width, factor, min_pixels, max_pixels)
            assert got == expected, (height, width)
            assert got[0] % factor == 0 and got[1] % factor == 0


def test_smart_resize_streaming_budget():
    # StreamingVLM's budget: 720p and 1080p both become 1152x640 = 720 merged tokens per frame pair.
    for height, width in [(720, 1280), (1080, 1920)]:
        assert smart_resize(height, width, 32, 100 * 32 * 32, 768 * 32 * 32) == (640, 1152)
    # Small input is scaled up to the minimum token count.
    h, w = smart_resize(48, 64, 32, 100 * 32 * 32, 768 * 32 * 32)
    assert h * w >= 100 * 32 * 32


@pytest.mark.parametrize("height,width", [(0, 100), (100, -1), (1, 300), (8000, 32)])
def test_smart_resize_errors(height, width):
    with pytest.raises(ValueError):
        smart_resize(height, width, 32, 100 * 32 * 32, 768 * 32 * 32)


def hf_pixel_values(frames, patch_size, temporal_patch_size, merge_size, mean, std, rescale_factor):
    """The transformers path for frames already at the target size: fused rescale + normalize, then patchify."""
    videos = torch.from_numpy(frames).permute(0, 3, 1, 2)[None]  # [1, n, C, H, W] uint8
    mean_t, std_t, _ = hf_fuse(None, do_normalize=True, image_mean=mean, image_std=std, do_rescale=True,
                               rescale_factor=rescale_factor)
    # torchvision's normalize: tensor.sub(mean).div(std) with [C, 1, 1] float32 tensors.
    videos = (videos.to(torch.float32) - mean_t[:, None, None]) / std_t[:, None, None]
    patches, grid_t, grid_h, grid_w = hf_patchify(None, videos, patch_size=patch_size, merge_size=merge_size,
                                                  temporal_patch_size=temporal_patch_size)
    return patches[0].reshape(grid_t, grid_h * grid_w, -1).numpy()


IMAGENET = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])


@pytest.mark.parametrize("n,height,width,patch_size,temporal_patch_size,merge_size", [
    (2, 64, 64, 16, 2, 2),
    (3, 32, 96, 16, 2, 2),   # odd frame count: last frame repeated
    (1, 96, 64, 16, 2, 2),
    (5, 28, 84, 14, 2, 2),
    (4, 56, 28, 14, 2, 2),
    (3, 48, 32, 16, 3, 1),
])
@pytest.mark.parametrize("mean,std", [([0.5] * 3, [0.5] * 3), IMAGENET])
def test_patchify_bit_identical(n, height, width, patch_size, temporal_patch_size, merge_size, mean, std):
    frames = np.random.default_rng(n * height + width).integers(0, 256, (n, height, width, 3), dtype=np.uint8)
    got = patchify(frames, patch_size, temporal_patch_size, merge_size, mean, std, 1 / 255)
    expected = hf_pixel_values(frames, patch_size, temporal_patch_size, merge_size, mean, std, 1 / 255)
    assert got.dtype == np.float32
    assert got.shape == (math.ceil(n / temporal_patch_size), (height // patch_size) * (width // patch_size),
                         3 * temporal_patch_size * patch_size ** 2)
    assert np.array_equal(got, expected)


def test_patchify_rejects_unaligned_size():
    with pytest.raises(ValueError):
        patchify(np.zeros((2, 48, 64, 3), np.uint8), 16, 2, 2, [0.5] * 3, [0.5] * 3, 1 / 255)
