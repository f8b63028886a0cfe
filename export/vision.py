"""The vision encoder as an exportable module: the transformers weights, our own forward.

Differences from `Qwen3VLVisionModel.forward`, all exact rewrites:
- the Conv3d patch embedding (kernel == stride == the patch) is a MatMul;
- position-table taps/weights and rotary (row, col) ids come in as inputs (host index arithmetic);
- attention is block-diagonal per temporal patch, so patches arrive as [T, P, C] and attention is one batched
  product over T instead of the Python loop over `cu_seqlens` that no exporter can trace.

And laid out for ONNX Runtime's CPU kernels (profiled: `make bench`, README "Performance"):
- every Linear sees 2-D activations [T*P, C], so it exports as one Gemm with its bias inside instead of a batched
  MatMul and a separate Add over the whole activation;
- the tanh GELU of the blocks is one `com.microsoft::FastGelu` (eight elementwise passes otherwise);
- in fp32 exports attention is one `com.microsoft::MultiHeadAttention` over [T, P, heads*hd], with no transposes
  and no score tensor between nodes. fp16 exports keep the explicit MatMul-Softmax-MatMul chain with its softmax
  in fp32 (the fp32 islands that Qwen needs on MIGraphX); MIGraphX fuses that chain itself.
Both contrib ops are parsed by MIGraphX (proven by `python -m export.check --migraphx`).
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
        self.fast_gelu = cfg.hidden_act == "gelu_pytorch_tanh"
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
        frames, count, _ = patches.shape
        x = patches @ self.patch_weight.to(patches.dtype) + self.patch_bias.to(patches.dtype)
        x = (x + (visual.pos_embed(pos_taps) * pos_weights.unsqueeze(-1)).sum(1)).reshape(frames * count, -1)
        freqs = (rotary_pos.unsqueeze(-1).float() * self.inv_freq).flatten(1)  # [P, hd/2]: rows, then cols
        angles = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)  # [P, 1, hd]: the same for every head
        cos, sin = angles.cos(), angles.sin()

        deepstack = []
        for layer, block in enumerate(visual.blocks):
            x = x + self._attention(block.attn, norm32(block.norm1, x), cos, sin, frames)
            x = x + self._mlp(block.mlp, norm32(block.norm2, x))
            if layer in self.deepstack_index:
                deepstack.append(_merge(visual.deepstack_merger_list[self.deepstack_index[layer]], x))
        return _merge(visual.merger, x), torch.stack(deepstack)

    def _attention(self, attn, x, cos, sin, frames):
        # x: f [T*P, D] -> f [T*P, D]; attention only within each temporal patch
        tokens, width = x.shape
        dtype = x.dtype
        q, k, v = attn.qkv(x).reshape(frames, tokens // frames, 3, self.heads, self.head_dim).unbind(2)
        q = (rope(q.float(), cos, sin) * attn.scaling).to(dtype)  # [T, P, heads, hd]
        k = rope(k.float(), cos, sin).to(dtype)
        shape = (frames, tokens // frames, width)
        if dtype == torch.float32 and torch.onnx.is_in_onnx_export():
            # q comes scaled (as in the chain below), so the op's own scale is 1
            out = torch.onnx.ops.symbolic("com.microsoft::MultiHeadAttention",
                                          (q.reshape(shape), k.reshape(shape), v.reshape(shape)),
                                          {"num_heads": self.heads, "scale": 1.0}, dtype=dtype, shape=shape, version=1)
        else:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [T, heads, P, hd]
            probs = torch.softmax((q @ k.transpose(-1, -2)).float(), dim=-1).to(dtype)
            out = (probs @ v).transpose(1, 2)
        return attn.proj(out.reshape(tokens, width))

    def _mlp(self, mlp, x):
        if not (self.fast_gelu and torch.onnx.is_in_onnx_export()):
            return mlp(x)
        h = x @ mlp.linear_fc1.weight.T  # FastGelu adds the bias: one pass over the [T*P, 4D] activation
        h = torch.onnx.ops.symbolic("com.microsoft::FastGelu", (h, mlp.linear_fc1.bias), {}, dtype=h.dtype,
                                    shape=h.shape, version=1)
        return mlp.linear_fc2(h)


def _merge(merger, x):
    """The patch merger (LayerNorm before or after grouping m^2 patches, then an MLP), its norm in fp32."""
    if merger.use_postshuffle_norm:
        x = norm32(merger.norm, x.reshape(-1, merger.hidden_size))
    else:
        x = norm32(merger.norm, x).reshape(-1, merger.hidden_size)
    return merger.linear_fc2(merger.act_fn(merger.linear_fc1(x)))
