"""One decoder step over S new tokens, as an exportable module: the transformers weights, our own forward.

The graph is a pure function. The runtime owns the cache: it passes every layer's past keys and values and a
mask over the cache slots, and gets back only the new tokens' keys and values (returning the whole cache would
copy it every step). Past keys are stored **after** RoPE, so a decode step reads the cache once and its cost
stays flat in cache length. Each new key also comes out **before** RoPE (`new_key_raw`): the runtime keeps that
master copy and re-rotates it once per chunk when eviction changes positions, so no rounding error accumulates.

It is exported twice with the same weights and the same I/O, as two ways to lay out attention over past + new:
- `decoder.onnx` (one new token) multiplies past and new keys separately, so the cache is never copied;
- `prefill.onnx` (a chunk) concatenates the keys and values first (a few MB) so that the scores, hundreds of MB
  at 740 new tokens onto 8k, are written once and never concatenated or sliced; it is also the plain
  MatMul-Add-Softmax-MatMul chain that MIGraphX fuses. Attention of one 4B-width layer, 740 tokens onto 8k
  cached, on 2 CPU cores: 713 ms laid out as decoder.onnx, 570 ms as prefill.onnx.
"""

import torch
from torch import nn

MASKED = -1e9  # added to the scores of masked slots: exp() underflows to exactly 0, and fully masked rows stay finite


def channel_axis(head_dim: int, section) -> torch.Tensor:
    """Interleaved MRoPE: frequency channel j follows h if j % 3 == 1, w if j % 3 == 2 (within 3 * section),
    else t. As a one-hot [3, hd/2] the selection is an exact multiply-add."""
    axis = torch.zeros(head_dim // 2, dtype=torch.long)
    axis[1:3 * section[1]:3] = 1
    axis[2:3 * section[2]:3] = 2
    return nn.functional.one_hot(axis, 3).T.float().contiguous()


class DecoderStep(nn.Module):
    def __init__(self, model: nn.Module, prefill: bool = False):
        super().__init__()
        self.prefill = prefill
        lm = model.model.language_model
        cfg = lm.config
        self.layers = lm.layers
        self.norm = lm.norm
        self.lm_head = model.lm_head
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.n_deepstack = len(model.config.vision_config.deepstack_visual_indexes)
        self.register_buffer("channel_axis", channel_axis(self.head_dim, cfg.rope_parameters["mrope_section"]))
        self.register_buffer("inv_freq", lm.rotary_emb.inv_freq.detach().clone())

    def forward(self, inputs_embeds, deepstack_embeds, position_ids, past_mask, new_mask, past_keys, past_values):
        # (f = the export dtype, f32 or f16)
        # inputs_embeds:    f [B, S, H]
        # deepstack_embeds: f [n_deepstack, B, S, H]    zero at non-visual positions
        # position_ids:     i64 [3, B, S]               (t, h, w) of the new tokens
        # past_mask:        i64 [B, T]                  1 = attend to this cache slot
        # new_mask:         i64 [B, S]                  1 = a real new token (0 = padding); causal among them
        # past_keys[i]:     f [B, kv, T, hd]            after RoPE
        # past_values[i]:   f [B, kv, T, hd]
        # -> logits f32 [B, V] of the last position, new_keys[i] / new_values[i] / new_keys_raw[i] f [B, kv, S, hd]
        cos, sin = self._rope(position_ids)
        bias = self._mask_bias(past_mask, new_mask)

        x = inputs_embeds
        new_keys, new_values, new_keys_raw = [], [], []
        for i, layer in enumerate(self.layers):
            attn_out, key, value, key_raw = self._attention(
                layer.self_attn, rms_norm32(layer.input_layernorm, x), cos, sin, bias, past_keys[i], past_values[i])
            x = x + attn_out
            x = x + layer.mlp(rms_norm32(layer.post_attention_layernorm, x))
            if i < self.n_deepstack:
                x = x + deepstack_embeds[i]
            new_keys.append(key)
            new_values.append(value)
            new_keys_raw.append(key_raw)
        logits = self.lm_head(rms_norm32(self.norm, x[:, -1])).float()
        return logits, new_keys, new_values, new_keys_raw

    def _rope(self, position_ids):
        pos = (position_ids.float().unsqueeze(-1) * self.channel_axis[:, None, None, :]).sum(0)  # [B, S, hd/2]
        angles = pos * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)  # [B, 1, S, hd]
        return angles.cos(), angles.sin()

    def _mask_bias(self, past_mask, new_mask):
        # [B, 1, 1, S, T+S]: cache slots as past_mask says; new tokens causally among themselves, minus padding
        new = new_mask.shape[1]
        causal = torch.ones(new, new, dtype=torch.bool, device=new_mask.device).tril()
        keep_new = new_mask.bool()[:, None, :] & causal  # [B, S, S]
        keep_past = past_mask.bool()[:, None, :].expand(-1, new, -1)  # [B, S, T]
        keep = torch.cat([keep_past, keep_new], dim=-1)
        zero = torch.zeros((), dtype=torch.float32)
        return torch.where(keep, zero, torch.full((), MASKED)).unsqueeze(1).unsqueeze(1)

    def _attention(self, attn, x, cos, sin, bias, past_key, past_value):
        # In fp16 graphs the norms, RoPE and softmax run in fp32 ("fp32 islands"); the matmuls stay in fp16.
        batch, new, _ = x.shape
        dtype, groups = x.dtype, self.heads // self.kv_heads
        q = rms_norm32(attn.q_norm, attn.q_proj(x).view(batch, new, self.heads, self.head_dim)).transpose(1, 2)
        key_raw = rms_norm32(attn.k_norm, attn.k_proj(x).view(batch, new, self.kv_heads, self.head_dim)).transpose(1, 2)
        value = attn.v_proj(x).view(batch, new, self.kv_heads, self.head_dim).transpose(1, 2)
        q = rope(q.float(), cos, sin)
        key = rope(key_raw.float(), cos, sin).to(dtype)

        # GQA without repeating the cache: query head h uses kv head h // groups, so fold the groups into rows.
        # Scaling q before the product keeps Q.K^T in range in fp16 (where Qwen overflowed on MIGraphX).
        q = (q * attn.scaling).to(dtype).reshape(batch, self.kv_heads, groups * new, self.head_dim)
        if self.prefill:  # copy the cache (small), never the scores (large)
            keys, values = torch.cat([past_key, key], dim=2), torch.cat([past_value, value], dim=2)
            scores = q @ keys.transpose(-1, -2)
        else:  # copy the scores of one token (small), never the cache (large)
            scores = torch.cat([q @ past_key.transpose(-1, -2), q @ key.transpose(-1, -2)], dim=-1)
        scores = scores.view(batch, self.kv_heads, groups, new, -1).float() + bias
        probs = torch.softmax(scores, dim=-1).to(dtype).view(batch, self.kv_heads, groups * new, -1)
        if self.prefill:
            out = probs @ values
        else:
            past = past_key.shape[2]
            out = probs[..., :past] @ past_value + probs[..., past:] @ value
        out = out.view(batch, self.heads, new, self.head_dim).transpose(1, 2).reshape(batch, new, -1)
        return attn.o_proj(out), key, value, key_raw


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def norm32(norm: nn.Module, x):
    """A norm in float32, whatever the graph's dtype (its weights are kept in fp32 for fp16 exports)."""
    return norm(x.float()).to(x.dtype)


def rms_norm32(norm: nn.Module, x):
    """transformers' RMSNorm in float32, written as x / sqrt(mean(x^2) + eps) * w rather than its x * rsqrt(...):
    the same numbers, but the pattern ONNX Runtime fuses into one SimplifiedLayerNormalization kernel, where the
    Reciprocal leaves six elementwise passes (four norms per layer: 25% of the whole 4B's int4 decode step went to
    such small ops)."""
    h = x.float()
    return (norm.weight * (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))).to(x.dtype)
