"""The runtime's host-side index math equals the transformers helpers it replaces, exactly."""

import numpy as np
import pytest
import torch
from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

from runtime.positions import rope_positions, spans_of
from runtime.rope import Rope
from runtime.vision_index import position_taps, rotary_positions


@pytest.mark.parametrize("grid", [(2, 2), (4, 6), (10, 4), (40, 72), (64, 36)])
@pytest.mark.parametrize("side", [48, 6])
def test_position_taps_match_transformers(grid, side):
    gh, gw = grid
    taps, weights = position_taps(gh, gw, merge=2, side=side)
    ref_taps, ref_weights = get_vision_interpolation_indices_and_weights(
        torch.tensor([[1, gh, gw]]), num_grid_per_side=side, mode="bilinear", align_corners=True, spatial_merge_size=2)
    np.testing.assert_array_equal(taps, ref_taps.numpy())
    np.testing.assert_array_equal(weights, ref_weights.numpy())


@pytest.mark.parametrize("grid", [(2, 2), (4, 6), (36, 64)])
def test_rotary_positions_match_transformers(grid):
    ref = get_vision_position_ids(torch.tensor([[1, *grid]]), 2)
    np.testing.assert_array_equal(rotary_positions(*grid, merge=2), ref.numpy())


def test_rope_positions_match_get_rope_index():
    from transformers import Qwen3VLConfig, Qwen3VLModel

    config = Qwen3VLConfig.from_json_file("export/presets/tiny.json")
    vid, start, end = config.video_token_id, config.vision_start_token_id, config.vision_end_token_id
    grids = [(3, 5), (4, 2), (1, 1)]
    ids = [1, 2, 3]
    for h, w in grids:
        ids += [7, start] + [vid] * (h * w) + [end]
    ids += [9, 9]
    input_ids = torch.tensor([ids])
    types = (input_ids == vid).long() * 2
    model = Qwen3VLModel.__new__(Qwen3VLModel)  # get_rope_index only reads the config
    torch.nn.Module.__init__(model)
    model.config = config
    thw = torch.tensor([[1, 2 * h, 2 * w] for h, w in grids])
    ref, _ = model.get_rope_index(input_ids, types, video_grid_thw=thw)
    positions, next_pos = rope_positions(spans_of(ids, vid, grids))
    np.testing.assert_array_equal(positions, ref[:, 0].numpy())
    assert next_pos == int(ref.max()) + 1


def test_rope_positions_from_an_offset_are_shifted():
    base, _ = rope_positions([4, (2, 3), 2])
    shifted, nxt = rope_positions([4, (2, 3), 2], start=100)
    np.testing.assert_array_equal(shifted, base + 100)
    assert nxt == 100 + 4 + 3 + 2


def test_host_rope_matches_transformers_rotary():
    from transformers import Qwen3VLConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding, apply_rotary_pos_emb

    config = Qwen3VLConfig.from_json_file("export/presets/Qwen3-VL-4B.json").text_config
    rotary = Qwen3VLTextRotaryEmbedding(config)
    rng = np.random.default_rng(0)
    positions = rng.integers(0, 3000, (3, 1, 50))
    keys = rng.standard_normal((1, 8, 50, 128), dtype=np.float32)
    cos, sin = rotary(torch.zeros(1), torch.from_numpy(positions))
    ref, _ = apply_rotary_pos_emb(torch.from_numpy(keys), torch.from_numpy(keys), cos, sin)
    rope = Rope(rotary.inv_freq.numpy().tolist(), config.rope_parameters["mrope_section"])
    np.testing.assert_allclose(rope.rotate(keys, positions), ref.numpy(), atol=2e-6, rtol=0)
