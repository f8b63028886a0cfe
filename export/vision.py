"""The vision encoder as an exportable module: the transformers weights, our own forward.

Differences from `Qwen3VLVisionModel.forward`, all exact rewrites:
- the Conv3d patch embedding (kernel == stride == the patch) is a MatMul;
- position-table taps/weights and rotary (row, col) ids come in as inputs (host index arithmetic);
- attention is block-diagonal per temporal patch, so patches arrive as [T, P, C] and attention is one batched
  product over T instead of the Python loop over `cu_seqlens` that no exporter can trace.
"""

import torch
from torch import nn

from .decoder import norm32, rope


class VisionEncoder(nn.Module):
    def __init__(self, visual: nn.Module):
        super().__init__()
        cfg = visual.config
        self.visual = visual
        self.heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        proj = visual.patch_embed.proj
        self.register_buffer("patch_weight", proj.weight.detach().reshape(proj.out_channels, -1).T.contiguous())
        self.register_buffer("patch_bias", proj.bias.detach().clone())
        self.register_buffer("inv_freq", visual.rotary_pos_emb.inv_freq.detach().clone())
        self.deepstack_index = {layer: k for k, layer in enumerate(cfg.deepstack_visual_indexes)}

    def forward(self, patches, pos_taps, pos_weights, rotary_pos):
        # (f = the export dtype, f32 or f16; norms, rotary and softmax run in f32)
        # patches:     f [T, P, C*t*p*p]    T temporal patches of P patches each, merge-block order
        # pos_taps:    i64 [P, 4]           bilinear taps into the flattened position table
        # pos_weights: f [P, 4]
        # rotary_pos:  i64 [P, 2]           (row, col) of each patch
        # -> embeds f [T*P/m^2, out_hidden], deepstack f [n_deepstack, T*P/m^2, out_hidden]
        visual = self.visual
        x = patches @ self.patch_weight.to(patches.dtype) + self.patch_bias.to(patches.dtype)
        x = x + (visual.pos_embed(pos_taps) * pos_weights.unsqueeze(-1)).sum(1)
        freqs = (rotary_pos.unsqueeze(-1).float() * self.inv_freq).flatten(1)  # [P, hd/2]: rows, then cols
        angles = torch.cat([freqs, freqs], dim=-1)
        cos, sin = angles.cos(), angles.sin()

        deepstack = []
        for layer, block in enumerate(visual.blocks):
            x = x + self._attention(block.attn, norm32(block.norm1, x), cos, sin)
            x = x + block.mlp(norm32(block.norm2, x))
            if layer in self.deepstack_index:
                deepstack.append(_merge(visual.deepstack_merger_list[self.deepstack_index[layer]], x))
        return _merge(visual.merger, x), torch.stack(deepstack)

    def _attention(self, attn, x, cos, sin):
        frames, patches, width = x.shape
        qkv = attn.qkv(x).reshape(frames, patches, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [T, heads, P, hd]
        dtype = x.dtype
        q = (rope(q.float(), cos, sin) * attn.scaling).to(dtype)
        k = rope(k.float(), cos, sin).to(dtype)
        probs = torch.softmax((q @ k.transpose(-1, -2)).float(), dim=-1).to(dtype)
        out = (probs @ v).transpose(1, 2).reshape(frames, patches, width)
        return attn.proj(out)


def _merge(merger, x):
    """The patch merger (LayerNorm before or after grouping m^2 patches, then an MLP), its norm in fp32."""
    if merger.use_postshuffle_norm:
        x = norm32(merger.norm, x.reshape(-1, merger.hidden_size))
    else:
        x = norm32(merger.norm, x).reshape(-1, merger.hidden_size)
    return merger.linear_fc2(merger.act_fn(merger.linear_fc1(x)))
