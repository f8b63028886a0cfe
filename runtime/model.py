"""The exported model behind a small numpy API: token embeddings, the vision encoder, one decoder step.

Sessions are made on demand, one per graph and set of fixed dims (`session("decoder", {"new": 1, ...})`): the
dims become static at session creation (free-dimension overrides), which is what MIGraphX needs to compile once.
"""

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from . import quant
from .manifest import Manifest
from .providers import SESSION_ERRORS, ProviderError, device_of
from .vision_index import vision_inputs

DTYPES = {"fp32": np.float32, "fp16": np.float16}


@dataclass
class StepOutput:
    logits: np.ndarray  # [B, V] at the last new position
    keys: list[np.ndarray]  # per layer [B, kv, S, hd], after RoPE: what the next step reads as past keys
    values: list[np.ndarray]  # per layer [B, kv, S, hd]
    keys_raw: list[np.ndarray]  # per layer [B, kv, S, hd], before RoPE: the master copy for re-positioning


class Model:
    def __init__(self, manifest: Manifest, providers=("CPUExecutionProvider",), threads: int = 0,
                 provider_options: dict | None = None):
        self.manifest = manifest
        text, vision = manifest["text"], manifest["vision"]
        self.layers = text["num_hidden_layers"]
        self.kv_heads, self.head_dim, self.hidden = text["num_key_value_heads"], text["head_dim"], text["hidden_size"]
        self.n_deepstack = len(vision["deepstack_visual_indexes"])
        self.merge, self.grid_side = vision["spatial_merge_size"], vision["position_grid_side"]
        self.float_dtype = self.cache_dtype = DTYPES[manifest["dtype"]]
        self.providers = list(providers)
        self.provider_options = provider_options or {}
        self.device, self.device_id = device_of(self.providers[0], self.provider_options)
        self.threads = threads
        self.profile_prefix: str | None = None  # set: sessions made from now on profile themselves (bench.profile)
        self.embed_table = np.load(manifest.path(manifest["embeddings"]["file"]), mmap_mode="r")  # never loaded whole
        self._sessions: dict = {}  # (graph, fixed dims) -> session
        self._prepacked: set[str] = set()  # graphs whose dynamic-shape session packs its own copy of shared weights
        self._weights: dict = {}  # (data file, offset) -> (OrtValue, the array it views): one copy for all graphs
        self._vision_index: dict = {}

    @property
    def sessions(self) -> dict:
        """The sessions made so far, by graph name (the latest per graph), for reporting providers."""
        return {key[0]: s for key, s in self._sessions.items()}

    def session(self, graph: str, dims: dict | None = None) -> ort.InferenceSession:
        key = (graph, tuple(sorted((dims or {}).items())))
        if key not in self._sessions:
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            # Idle pool threads sleep instead of spinning: spinning took the cores from the video readers and the
            # server (micro, 32 live streams: 802 of 1,920 chunks dropped spinning, 20 not) and the CLI (60 s
            # clip: 2.0 s -> 1.3 s); a decode step of the real widths costs the same either way.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if self.profile_prefix:
                options.enable_profiling, options.profile_file_prefix = True, f"{self.profile_prefix}{graph}"
            for name, value in (dims or {}).items():
                options.add_free_dimension_override_by_name(name, int(value))
            shared = self._shared_weights(graph)
            for name, value in shared.items():
                options.add_initializer(name, value)
            prepacking = not (self.device == "cpu" and shared) or (graph in self._prepacked and not dims)
            if not prepacking:  # it would give each session its own repacked copy of every fp32 MatMul weight
                options.add_session_config_entry("session.disable_prepacking", "1")
            path = self.manifest.path(self.manifest["graphs"][graph]["file"])
            quant.check(self.manifest["graphs"][graph], prepacking)
            provider_options = [self.provider_options if p == self.providers[0] else {} for p in self.providers]
            try:
                session = ort.InferenceSession(str(path), options, providers=self.providers,
                                               provider_options=provider_options)
            except SESSION_ERRORS as error:
                reason = str(error).strip().splitlines()[0][:200]
                raise ProviderError(f"cannot load {path} on {self.providers[0]}: {reason}") from None
            self.manifest.check_session(graph, session)
            self._sessions[key] = session
        return self._sessions[key]

    def prepack(self, graph: str) -> None:
        """Let `graph`'s dynamic-shape session keep its own prepacked copy of the shared weights (memory: one more
        copy of the graph's fp32 MatMul weights). Without it the CPU's SGEMM packs every weight matrix again on each
        call of more than one row: a batched fp32 decode step of 2-8 rows then costs 2.2-2.6x a one-row step,
        prepacked 0.9-1.4x (4B widths, 4 layers, 1k cached tokens a row; README "Batching")."""
        if graph not in self._prepacked:
            self._prepacked.add(graph)
            self._sessions.pop((graph, ()), None)

    def _shared_weights(self, graph: str) -> dict:
        """One copy of the external weights for every session (decoder.onnx and prefill.onnx store theirs in one
        file): memory-mapped on the CPU, copied once to the GPU for CUDA. MIGraphX embeds the weights in each
        compiled program, so there every session keeps its own copy; so do quantized graphs."""
        if self.providers[0] == "MIGraphXExecutionProvider":
            return {}
        if self.manifest["graphs"][graph].get("quantized"):
            # MatMulNBits is fast only prepacked, and prepacking copies each weight into the session anyway: each
            # session loads its own (4-bit weights cost less per session than one shared fp32 copy)
            return {}
        shared = {}
        for w in self.manifest["graphs"][graph].get("external_weights", []):
            key = (w["file"], w["offset"])
            if key not in self._weights:  # the array stays referenced: a CPU OrtValue is a view of it
                data = np.memmap(self.manifest.path(w["file"]), dtype=np.uint8, mode="r")
                array = np.ndarray(w["shape"], dtype=w["dtype"], buffer=data, offset=w["offset"])
                self._weights[key] = (ort.OrtValue.ortvalue_from_numpy(array, self.device, self.device_id), array)
            shared[w["name"]] = self._weights[key][0]
        return shared

    @staticmethod
    def step_graph(new_tokens: int) -> str:
        """decoder.onnx for one new token, prefill.onnx for more (see export/decoder.py)."""
        return "decoder" if new_tokens == 1 else "prefill"

    def embed(self, token_ids) -> np.ndarray:
        return np.asarray(self.embed_table[np.asarray(token_ids, dtype=np.int64)], dtype=np.float32)

    def encode_video(self, patches: np.ndarray, grid_h: int, grid_w: int, static: bool = False):
        """patches [T, P, C] of T temporal patches on a grid_h x grid_w patch grid -> embeds [T*P/m^2, D],
        deepstack [n, T*P/m^2, D] (float32)."""
        dims = {"frames": patches.shape[0], "patches": patches.shape[1]} if static else None
        if (grid_h, grid_w) not in self._vision_index:  # the same grid for every chunk of a video
            index = vision_inputs(grid_h, grid_w, self.merge, self.grid_side)
            index["pos_weights"] = index["pos_weights"].astype(self.float_dtype)
            self._vision_index = {(grid_h, grid_w): index}
        feeds = {"patches": patches.astype(self.float_dtype, copy=False), **self._vision_index[(grid_h, grid_w)]}
        embeds, deepstack = self.session("vision", dims).run(None, feeds)
        return embeds.astype(np.float32, copy=False), deepstack.astype(np.float32, copy=False)

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), self.cache_dtype) for _ in range(self.layers)]

    def step(self, inputs_embeds, deepstack_embeds, position_ids, past_mask, new_mask, past_keys, past_values,
             graph: str | None = None) -> StepOutput:
        """One decoder call with shapes that follow the inputs (the dynamic-shape path); `graph` overrides the
        choice of decoder.onnx or prefill.onnx by the number of new tokens."""
        session = self.session(graph or self.step_graph(inputs_embeds.shape[1]))
        f = self.float_dtype
        feeds = {"inputs_embeds": inputs_embeds.astype(f, copy=False),
                 "deepstack_embeds": deepstack_embeds.astype(f, copy=False), "position_ids": position_ids,
                 "past_mask": past_mask, "new_mask": new_mask}
        for i in range(self.layers):
            feeds[f"past_key.{i}"] = past_keys[i].astype(self.cache_dtype, copy=False)
            feeds[f"past_value.{i}"] = past_values[i].astype(self.cache_dtype, copy=False)
        out = session.run(None, feeds)
        n = self.layers
        return StepOutput(out[0].astype(np.float32, copy=False), out[1:1 + n], out[1 + n:1 + 2 * n], out[1 + 2 * n:])
