"""Qwen3-VL video preprocessing on the host: the resize rule and the patch layout the vision graph reads.

Both reproduce transformers' `Qwen3VLVideoProcessor` exactly (the tests compare bit for bit), except that the
pixel budget applies to each frame rather than to the whole clip, as StreamingVLM does.
"""

import math
from collections.abc import Sequence

import numpy as np


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target (height, width) of one frame: both sides multiples of `factor`, the aspect ratio nearly kept,
    and height * width within [min_pixels, max_pixels]."""
    if height <= 0 or width <= 0:
        raise ValueError(f"frame size must be positive, got {height}x{width}")
    if height < factor or width < factor:
        # Too thin for one merged patch: upscale so the short side reaches `factor` first.
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be at most 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        # Shrink both sides by the same beta, rounding down so the budget holds.
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(frames: np.ndarray, patch_size: int, temporal_patch_size: int, merge_size: int,
             image_mean: Sequence[float], image_std: Sequence[float], rescale_factor: float) -> np.ndarray:
    """Normalize frames and cut them into the vision graph's patch rows.

    frames: uint8 [n, H, W, 3] RGB, already resized (H, W multiples of patch_size * merge_size).
    Returns float32 [T, P, 3 * temporal_patch_size * patch_size**2] with T = ceil(n / temporal_patch_size)
    and P = (H / patch_size) * (W / patch_size); patches in merge-block order so that every merge_size**2
    consecutive rows form one LLM token, each row ordered (channel, frame, y, x) like the Conv3d weight.
    """
    n, height, width, channels = frames.shape
    block = patch_size * merge_size
    if n == 0 or height % block or width % block:
        raise ValueError(f"need >= 1 frame of a size divisible by {block}, got {n} frames of {height}x{width}")
    # Pad the frame count to whole temporal patches by repeating the last frame (on uint8: cheapest).
    grid_t = -(-n // temporal_patch_size)
    frames = frames[np.minimum(np.arange(grid_t * temporal_patch_size), n - 1)]

    # transformers fuses rescale into normalize: (x - mean/r) / (std/r), all float32. Same ops, same bits.
    scale = np.float32(1.0 / rescale_factor)
    mean = np.asarray(image_mean, dtype=np.float32) * scale
    std = np.asarray(image_std, dtype=np.float32) * scale
    pixels = (frames.astype(np.float32) - mean) / std

    gh, gw = height // patch_size, width // patch_size
    pixels = pixels.reshape(grid_t, temporal_patch_size, gh // merge_size, merge_size, patch_size,
                            gw // merge_size, merge_size, patch_size, channels)
    # -> (t, block row, block col, row in block, col in block, channel, frame, y, x)
    pixels = pixels.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    return pixels.reshape(grid_t, gh * gw, channels * temporal_patch_size * patch_size ** 2)
