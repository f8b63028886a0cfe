"""Interleaved multimodal RoPE in numpy, for re-positioning cached keys after eviction.

The decoder graph applies the same rotation to new tokens; the runtime applies this one to its pre-RoPE master
copy of the cache whenever eviction changes positions, so a rotation is always computed from the exact stored key
and the absolute position, never stacked on an earlier one.
"""

import numpy as np


class Rope:
    def __init__(self, inv_freq, mrope_section: list[int]):
        # inv_freq comes from the manifest, copied from the model's own buffer: recomputing theta^(-2i/d) here
        # could differ in the last bit, which at position ~3000 moves an angle by ~1e-4 rad.
        self.inv_freq = np.asarray(inv_freq, dtype=np.float32)
        head_dim = 2 * len(self.inv_freq)
        # Frequency channel j follows the h row if j % 3 == 1, w if j % 3 == 2 (within 3 * section), else t.
        axis = np.zeros(head_dim // 2, np.int64)
        axis[1:3 * mrope_section[1]:3] = 1
        axis[2:3 * mrope_section[2]:3] = 2
        self.axis = axis

    def cos_sin(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """positions int [3, ..., n] -> cos, sin float32 [..., n, head_dim]."""
        pos = np.moveaxis(positions, 0, -1).astype(np.float32)[..., self.axis]  # [..., n, hd/2]
        angles = pos * self.inv_freq
        angles = np.concatenate([angles, angles], axis=-1)
        return np.cos(angles), np.sin(angles)

    def rotate(self, keys: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """keys [..., n, head_dim] (heads before n) rotated to positions [3, n] or [3, B, n]."""
        cos, sin = self.cos_sin(positions)
        if positions.ndim == 3:  # [B, n, hd] -> [B, 1, n, hd] to broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        half = keys.shape[-1] // 2
        rotated = np.concatenate([-keys[..., half:], keys[..., :half]], axis=-1)
        return (keys * cos + rotated * sin).astype(np.float32)
