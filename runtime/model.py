"""The exported model behind a small numpy API: token embeddings, the vision encoder, one decoder step."""

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .manifest import Manifest
from .providers import SESSION_ERRORS, ProviderError
from .vision_index import vision_inputs


@dataclass
class StepOutput:
    logits: np.ndarray  # [B, V] at the last new position
    keys: list[np.ndarray]  # per layer [B, kv, S, hd], after RoPE: what the next step reads as past keys
    values: list[np.ndarray]  # per layer [B, kv, S, hd]
    keys_raw: list[np.ndarray]  # per layer [B, kv, S, hd], before RoPE: the master copy for re-positioning


class Model:
    def __init__(self, manifest: Manifest, providers=("CPUExecutionProvider",), threads: int = 0):
        self.manifest = manifest
        text, vision = manifest["text"], manifest["vision"]
        self.layers = text["num_hidden_layers"]
        self.kv_heads, self.head_dim, self.hidden = text["num_key_value_heads"], text["head_dim"], text["hidden_size"]
        self.n_deepstack = len(vision["deepstack_visual_indexes"])
        self.merge, self.grid_side = vision["spatial_merge_size"], vision["position_grid_side"]
        emb = manifest["embeddings"]
        self.embed_table = np.load(manifest.path(emb["file"]), mmap_mode="r")  # read row by row, never loaded whole
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.sessions = {}
        for name in ("vision", "decoder"):
            path = manifest.path(manifest["graphs"][name]["file"])
            try:
                session = ort.InferenceSession(str(path), options, providers=list(providers))
            except SESSION_ERRORS as error:
                reason = str(error).strip().splitlines()[0][:200]
                raise ProviderError(f"cannot load {path} on {providers[0]}: {reason}") from None
            manifest.check_session(name, session)
            self.sessions[name] = session
        self.decoder_outputs = [o.name for o in self.sessions["decoder"].get_outputs()]

    def embed(self, token_ids) -> np.ndarray:
        return np.asarray(self.embed_table[np.asarray(token_ids, dtype=np.int64)], dtype=np.float32)

    def encode_video(self, patches: np.ndarray, grid_h: int, grid_w: int) -> tuple[np.ndarray, np.ndarray]:
        """patches [T, P, C] of T temporal patches on a grid_h x grid_w patch grid -> embeds [T*P/m^2, D],
        deepstack [n, T*P/m^2, D]."""
        feeds = {"patches": patches.astype(np.float32, copy=False),
                 **vision_inputs(grid_h, grid_w, self.merge, self.grid_side)}
        embeds, deepstack = self.sessions["vision"].run(None, feeds)
        return embeds, deepstack

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for _ in range(self.layers)]

    def step(self, inputs_embeds, deepstack_embeds, position_ids, past_mask, new_mask, past_keys,
             past_values) -> StepOutput:
        feeds = {"inputs_embeds": inputs_embeds, "deepstack_embeds": deepstack_embeds, "position_ids": position_ids,
                 "past_mask": past_mask, "new_mask": new_mask}
        for i in range(self.layers):
            feeds[f"past_key.{i}"] = past_keys[i]
            feeds[f"past_value.{i}"] = past_values[i]
        out = self.sessions["decoder"].run(self.decoder_outputs, feeds)
        n = self.layers
        return StepOutput(out[0], out[1:1 + n], out[1 + n:1 + 2 * n], out[1 + 2 * n:])
