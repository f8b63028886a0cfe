"""A PyTorch reference of the StreamingVLM loop on the transformers model, written independently of runtime/.

It keeps the retained conversation as one flat list of tagged tokens in logical order, caches keys BEFORE RoPE
(captured from each layer's k_norm), and at every chunk filters the list by the spec's eviction rules, recomputes
positions over what is left, and rebuilds a transformers DynamicCache by rotating the pre-RoPE keys with the
model's own rotary embedding. Prefill and decode steps are plain transformers forward calls.
"""

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

from runtime.preprocess import patchify


@dataclass
class Tok:
    id: int
    tag: str  # head, prev, prev_close, user, time, vision (markers and pads), query, open, reply, close
    round: int = -1
    grid: tuple[int, int] | None = None  # for vision tokens: the merged grid of their block
    block: int = -1  # which vision block (one per chunk here)


class ReferenceStream:
    def __init__(self, model, tokenizer, manifest, *, window_size, text_round, text_sink, text_window,
                 query="Commentate on this match", previous_text="", max_new_tokens=20, repetition_penalty=1.05):
        self.model, self.tok, self.m = model, tokenizer, manifest
        self.window_size, self.text_round = window_size, text_round
        self.text_sink, self.text_window = text_sink, text_window
        self.query, self.previous_text = query, previous_text
        self.max_new_tokens, self.penalty = max_new_tokens, repetition_penalty
        self.stop = set(manifest["stop_tokens"])
        self.seq: list[Tok] = []
        self.keys_raw: list[torch.Tensor] = []  # per layer [kv, n, hd], logical order, before RoPE
        self.values: list[torch.Tensor] = []
        self.fed = 0  # tokens of self.seq whose K/V exist (always a prefix)
        self.chunk = 0
        self.suffix = self.enc(" ...")
        self.prefill_logits = []
        lm = model.model.language_model
        self._captured = []
        for layer in lm.layers:
            layer.self_attn.k_norm.register_forward_hook(lambda mod, inp, out: self._captured.append(out.detach()))

    def enc(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    # --- eviction, exactly as the spec's numbered steps, over the flat tagged list -------------------------
    def evict(self):
        i, order = self.chunk, list(range(len(self.seq)))

        def drop(r, tags):
            return [k for k in order if not (self.seq[k].round == r and self.seq[k].tag in tags)]

        r = i - self.text_round
        if r >= 0:  # 1. fold the reply of round r into the previous text, drop its shell
            reply = [k for k in order if self.seq[k].tag == "reply" and self.seq[k].round == r]
            ids = [self.seq[k].id for k in reply]
            n = len(self.suffix)
            if n and len(ids) >= n and ids[-n:] == self.suffix:
                reply = reply[:-n]
            shell = {k for k in order if self.seq[k].round == r and self.seq[k].tag in ("open", "reply", "close")}
            rest = [k for k in order if k not in shell]
            at = max([j for j, k in enumerate(rest) if self.seq[k].tag in ("prev", "head")]) + 1
            order = rest[:at] + reply + rest[at:]
            for k in reply:
                self.seq[k].tag = "prev"
            if self.window_size > self.text_round:  # its Time= text goes too; the vision stays
                order = drop(r, ("time",))
        r = i - self.window_size
        if r >= 0 and self.window_size < self.text_round:  # 2. drop the vision block of round r; its text stays
            order = drop(r, ("vision",))
        r = i - max(self.window_size, self.text_round)
        if r >= 0:  # 3. drop what is left of the user turn of round r
            order = drop(r, ("user", "time", "vision", "query"))
        prev = [k for k in order if self.seq[k].tag == "prev"]  # 4. trim the previous text
        if len(prev) > self.text_sink + self.text_window:
            cut = set(prev[self.text_sink:len(prev) - self.text_window])
            order = [k for k in order if k not in cut]
        fed_flags = [k < self.fed for k in order]
        assert fed_flags == sorted(fed_flags, reverse=True), "unfed tokens must stay at the tail"
        if self.fed:
            index = torch.tensor([k for k in order if k < self.fed], dtype=torch.long)
            self.keys_raw = [k[:, index] for k in self.keys_raw]
            self.values = [v[:, index] for v in self.values]
            self.fed = len(index)
        self.seq = [self.seq[k] for k in order]

    def positions(self) -> torch.Tensor:
        rows, pos, j = [], 0, 0
        while j < len(self.seq):
            t = self.seq[j]
            if t.grid is None:
                rows.append((pos, pos, pos))
                pos, j = pos + 1, j + 1
                continue
            h, w = t.grid
            for a in range(h):
                for b in range(w):
                    rows.append((pos, pos + a, pos + b))
            pos, j = pos + max(h, w), j + h * w
        return torch.tensor(rows, dtype=torch.long).T  # [3, n]

    def _cache(self, positions):
        cache = DynamicCache(config=self.model.config.text_config)
        if self.fed:
            cos, sin = self.model.model.language_model.rotary_emb(torch.zeros(1), positions[:, None, : self.fed])
            for i, (k, v) in enumerate(zip(self.keys_raw, self.values)):
                rotated, _ = apply_rotary_pos_emb(k[None], k[None], cos, sin)
                cache.update(rotated, v[None], i)
        return cache

    def _forward(self, positions, **kwargs):
        self._captured.clear()
        cache = self._cache(positions)
        new = positions.shape[1] - self.fed
        out = self.model(position_ids=positions[:, None, self.fed:], cache=cache,
                         attention_mask=torch.ones(1, positions.shape[1], dtype=torch.long), use_cache=True, **kwargs)
        for i, captured in enumerate(self._captured):
            raw = captured[0].transpose(0, 1)  # [kv, new, hd]
            self.keys_raw[i] = torch.cat([self.keys_raw[i], raw], dim=1) if self.fed else raw
            value = cache.layers[i].values[0, :, -new:]
            self.values[i] = torch.cat([self.values[i], value], dim=1) if self.fed else value
        self.fed += new
        return out.logits[0, -1]

    def _sample(self, logits, seen):
        logits = logits.clone()
        ids = torch.tensor(sorted(set(seen)), dtype=torch.long)
        scores = logits[ids]
        logits[ids] = torch.where(scores > 0, scores / self.penalty, scores * self.penalty)
        return int(logits.argmax())

    # --- one chunk ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, chunk) -> list[int]:
        if not self.keys_raw:
            self.keys_raw = [None] * self.model.config.text_config.num_hidden_layers
            self.values = [None] * self.model.config.text_config.num_hidden_layers
        i = self.chunk
        prep, ids = self.m["preprocess"], self.m["tokens"]
        self.evict()
        p, m = prep["patch_size"], prep["merge_size"]
        gh, gw = chunk.frames.shape[1] // p, chunk.frames.shape[2] // p
        grid = (gh // m, gw // m)
        new: list[Tok] = []
        if i == 0:
            new += [Tok(t, "head") for t in self.enc("<|im_start|>previous text\n")]
            new += [Tok(t, "prev") for t in self.enc(self.previous_text)]
            new += [Tok(t, "prev_close") for t in self.enc("<|im_end|>\n")]
        elif any(t.round == i - 1 and t.tag == "open" for t in self.seq):
            new += [Tok(t, "close", i - 1) for t in [ids["im_end"], *self.enc("\n")]]
        new += [Tok(t, "user", i) for t in self.enc("<|im_start|>user\n")]
        new += [Tok(t, "time", i) for t in self.enc(f"Time={chunk.start:.1f}-{chunk.end:.1f}s")]
        new += [Tok(ids["vision_start"], "vision", i)]
        new += [Tok(ids["video_pad"], "vision", i, grid) for _ in range(grid[0] * grid[1])]
        new += [Tok(ids["vision_end"], "vision", i)]
        if i == 0 and self.query:
            new += [Tok(t, "query", i) for t in self.enc(self.query)]
        new += [Tok(t, "user", i) for t in self.enc("<|im_end|>\n")]
        new += [Tok(t, "open", i) for t in self.enc("<|im_start|>assistant\n")]
        self.seq += new

        patches = patchify(chunk.frames, p, prep["temporal_patch_size"], m, prep["image_mean"], prep["image_std"],
                           prep["rescale_factor"])
        positions = self.positions()
        unfed = torch.tensor([t.id for t in self.seq[self.fed:]])[None]
        logits = self._forward(positions, input_ids=unfed,
                               pixel_values_videos=torch.from_numpy(patches.reshape(-1, patches.shape[-1])),
                               video_grid_thw=torch.tensor([[len(patches), gh, gw]]),
                               mm_token_type_ids=(unfed == ids["video_pad"]).long() * 2)
        self.prefill_logits.append(logits.numpy())
        reply = []
        for k in range(self.max_new_tokens):
            token = self._sample(logits, [t.id for t in self.seq])
            if token in self.stop:
                break
            reply.append(token)
            self.seq.append(Tok(token, "reply", i))
            if k == self.max_new_tokens - 1:
                break
            nxt = int(positions[0, -1]) + 1
            positions = torch.cat([positions, torch.full((3, 1), nxt)], dim=1)
            logits = self._forward(positions, input_ids=torch.tensor([[token]]))
        self.chunk += 1
        return reply
