"""Train the built-in micro Qwen3-VL from scratch on the synthetic world: `make train-micro`.

python -m export.train_micro [--out export/presets/micro] [--minutes 42 | --steps N] [--seed 0] [--threads 2]

A stock `Qwen3VLForConditionalGeneration` of about a million parameters learns to say, each second, which event
happened between the second's two frames, and to answer the world's questions asked in a second's user turn.
Training is streaming-aware: an example is a stretch of a stream fed chunk by chunk exactly as the runtime feeds it
(export/micro.py's `Streams`, the runtime's own `Prompter` and `Context`): each token's keys and values are
computed once, when it is new, in the context retained then, and later chunks attend to them at the positions their
eviction gave them (`Forward`, proven equal to the runtime's ONNX stream by tests/test_micro.py). Two more things
make it learn on 2 CPU cores in under an hour (a plain recipe lets the vision tower collapse: the language model
learns the caption prior and the loss with shuffled videos equals the real loss):
- linear probes (normalized inputs; training only, not part of the saved model): on the merged vision tokens,
  from a chunk's mean and max its event, colour and shape, from each token (one grid cell) what stands in that
  cell in the chunk's first and last frame; on the attention values each vision token offers in every text layer,
  which cell it is; so the vision tower must carry what changed and where everything is, and attention can copy
  where an object stands;
- a curriculum: one object and the first seconds first, then up to four objects, questions and the first
  evictions, then stretches anywhere in an hour-long stream (previous text growing, then trimmed), with drills
  (a stream's first seconds, questions in most turns) and, in the second half, answers in half the turns.
It ends with a teacher-forced check on held-out worlds, with real and with shuffled frames: exact captions must be
>= 97% and every question kind >= 80% with real frames, captions near chance with shuffled ones, or the run
fails. World seeds >= 1,000,000 are for training; the tests and the demo use smaller ones.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from runtime.preprocess import patchify
from runtime.vision_index import vision_inputs
from runtime.world import CELL_CLASSES, COLOURS, EVENTS, GRID, PAST, PRESENT, SHAPES, SIZE

from .decoder import rope
from .micro import FRAME_TOKENS, QUERY, Streams, labels, write_folder_files
from .vision import _merge

DEFAULT_OUT = Path(__file__).parent / "presets" / "micro"
TRAIN_SEEDS = 1_000_000  # world seeds from here up are training data; below are held out
# The chance of a question in a chunk's turn. Answers are the harder replies (a 0.15 rate in a first run left
# "where" at 20% teacher-forced while captions were at 100%), so they get a third of the chunks.
QUESTIONS = 0.3
# Captions are exact by mid-run; the second half gives answers half the chunks, and asks the kinds that are
# learned last more often (the world's own mix asks each kind about as often).
LATE_QUESTIONS = 0.5
FOCUS = {"where": 4, "colour": 2, "appeared": 2, "count": 1, "did": 1}
# After the first quarter, this share of the examples are drills: the first 8-24 s of a stream (short contexts,
# so cheap chunks) with questions in most turns. Finding an object among a chunk's tokens and reading where it
# stands is learned slowly: with the world's mix of kinds alone, "where" was still at 80% of its tokens after
# 30 minutes while captions were exact after 10.
DRILL = 0.3
KINDS = ("caption", *PRESENT, *PAST)  # what a chunk's reply is


def pixels(frames: np.ndarray) -> np.ndarray:
    """[n, 2, H, W, 3] uint8 -> the HF processor's pixel_values_videos rows [n * P, 1536] (runtime layout)."""
    if not len(frames):
        return np.zeros((0, 1536), np.float32)
    rows = [patchify(pair, 16, 2, 2, [0.5] * 3, [0.5] * 3, 1 / 255) for pair in frames]
    return np.concatenate(rows).reshape(-1, rows[0].shape[-1])


def phase(progress: float, rng: np.random.Generator) -> dict:
    """The curriculum: which stretch of which stream one example is at this point of training (0..1)."""
    if progress < 0.1:  # one object, the first seconds of a stream
        return {"max_objects": 1, "first": 0, "chunks": int(rng.integers(1, 7)), "questions": 0.0}
    if progress < 0.25:  # the first half-minute, through the first evictions
        return {"max_objects": int(rng.integers(1, 5)), "first": 0, "chunks": int(rng.integers(4, 33)),
                "questions": QUESTIONS}
    if rng.random() < DRILL:  # a stream's first seconds, questions in most turns: cheap chunks for the answers
        return {"max_objects": int(rng.integers(2, 5)), "first": 0, "chunks": int(rng.integers(8, 25)),
                "questions": 0.6, "weights": FOCUS}
    draw = rng.random()  # anywhere in an hour: previous text growing, then trimmed (from ~200 s on)
    first = 0 if draw < 0.3 else rng.integers(1, 300) if draw < 0.65 else rng.integers(300, 3600)
    late = progress >= 0.5
    return {"max_objects": int(rng.integers(1, 5)), "first": int(first), "chunks": int(rng.integers(20, 41)),
            "questions": LATE_QUESTIONS if late else QUESTIONS, "weights": FOCUS if late else None}


def batch(data: Streams, rng: np.random.Generator, progress: float, budget: int, noise: float) -> list[dict]:
    """Training examples (world seeds >= TRAIN_SEEDS) until the batch holds `budget` chunks."""
    examples, chunks = [], 0
    while chunks < budget:
        spec = phase(progress, rng)
        seed = int(rng.integers(TRAIN_SEEDS, 2**62))
        query = None if rng.random() < 0.1 else QUERY  # the runtime's default query, sometimes none
        first = spec["first"]
        examples.append(data.example(rng, seed, first, first + spec["chunks"] - 1, spec["max_objects"], noise,
                                     spec["questions"], query, weights=spec.get("weights")))
        chunks += spec["chunks"]
    return examples


class Steps:
    """The attention of every chunk of a batch: its fed tokens (queries) over the context retained then (keys, at
    that chunk's positions), padded into a few buckets of similar size."""

    def __init__(self, examples: list[dict], inv_freq, section, head_dim: int):
        import torch

        from .decoder import channel_axis

        axis = channel_axis(head_dim, section)
        problems, base = [], 0
        for e in examples:
            problems += [(keys + base, positions, fresh) for keys, positions, fresh in e["steps"]]
            base += len(e["tokens"])
        problems.sort(key=lambda p: (p[2] > 64, len(p[0])))
        self.buckets, group = [], []
        for p in problems:  # a new bucket when the queries grow past 64 or the keys by half
            if group and ((p[2] > 64) != (group[0][2] > 64) or len(p[0]) > 1.5 * len(group[0][0]) + 64):
                self.buckets.append(self._bucket(group, axis, inv_freq))
                group = []
            group.append(p)
        self.buckets.append(self._bucket(group, axis, inv_freq))
        self.rows = torch.cat([b["rows"] for b in self.buckets])

    @staticmethod
    def _bucket(problems, axis, inv_freq) -> dict:
        import torch

        n, width, height = len(problems), max(len(p[0]) for p in problems), max(p[2] for p in problems)
        keys = torch.zeros(n, width, dtype=torch.long)
        positions = torch.zeros(n, 3, width)
        columns = torch.zeros(n, height, dtype=torch.long)  # each query's column among the keys
        valid = torch.zeros(n, height, dtype=torch.bool)
        for i, (k, pos, fresh) in enumerate(problems):
            keys[i, :len(k)] = torch.from_numpy(k)
            positions[i, :, :len(k)] = torch.from_numpy(pos)
            columns[i, :fresh] = torch.arange(len(k) - fresh, len(k))
            valid[i, :fresh] = True
        mask = torch.arange(width)[None, None, :] <= columns[:, :, None]  # causal; padded queries see key 0
        angles = (positions.unsqueeze(-1) * axis[:, None, :]).sum(1) * inv_freq  # [n, width, hd/2]
        angles = torch.cat([angles, angles], dim=-1).unsqueeze(2)  # [n, width, 1, hd]
        cos, sin = angles.cos(), angles.sin()
        pick = columns.unsqueeze(-1).unsqueeze(-1).expand(-1, -1, 1, cos.shape[-1])
        queries = keys.gather(1, columns)
        return {"keys": keys, "queries": queries, "mask": mask.unsqueeze(1), "valid": valid,
                "rows": queries[valid], "key_cos": cos, "key_sin": sin,
                "query_cos": cos.gather(1, pick), "query_sin": sin.gather(1, pick)}

    def attention(self, attn, q, k, v):
        """q [N, heads, hd], k and v [N, kv, hd] (before RoPE) -> [N, heads * hd] in feed order."""
        import torch

        outs = []
        for b in self.buckets:
            query = rope(q[b["queries"]], b["query_cos"], b["query_sin"]).transpose(1, 2)
            key = rope(k[b["keys"]], b["key_cos"], b["key_sin"]).transpose(1, 2)
            value = v[b["keys"]].transpose(1, 2)
            out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=b["mask"],
                                                                   scale=attn.scaling, enable_gqa=True)
            outs.append(out.transpose(1, 2)[b["valid"]].flatten(1))
        out = torch.cat(outs)
        return torch.zeros_like(out).index_copy(0, self.rows, out)


def collate(examples: list[dict], model):
    """The batch's feed (all examples one after another), labels, vision rows and probe truth."""
    import torch

    lm = model.model.language_model
    steps = Steps(examples, lm.rotary_emb.inv_freq, lm.config.rope_parameters["mrope_section"], lm.config.head_dim)
    tokens = torch.from_numpy(np.concatenate([e["tokens"] for e in examples]))
    label = torch.from_numpy(np.concatenate([e["label"] for e in examples]))
    frames = np.concatenate([e["frames"] for e in examples])
    probe = torch.tensor([labels(ev) for e in examples for ev in e["events"]], dtype=torch.long).reshape(-1, 3)
    cells = torch.from_numpy(np.concatenate([e["cells"] for e in examples]))
    return {"tokens": tokens, "label": label, "steps": steps,
            "pixel_values_videos": torch.from_numpy(pixels(frames))}, (probe, cells)


def reply_kinds(examples: list[dict]) -> np.ndarray:
    """Per fed token, in feed order: the index in KINDS of its chunk's reply (a caption or a question's kind)."""
    return np.concatenate([np.repeat([KINDS.index(q.kind if q else "caption") for q in e["questions"]],
                                     [fresh for _, _, fresh in e["steps"]]) for e in examples])


class Forward:
    """The stock model's weights, run the way the runtime runs them: each chunk's tokens attend to the keys and
    values retained when they were fed (`Steps`), each token's keys and values computed once, when it was new. The
    vision tower is batched over chunks (transformers loops over them in Python; the index math is the runtime's).
    Without eviction this is the stock forward (checked before training starts); with it, the runtime's stream
    (tests/test_micro.py checks it against the ONNX runtime)."""

    def __init__(self, model):
        import torch

        self.model = model
        visual = model.model.visual
        cfg = visual.config
        self.side = SIZE // cfg.patch_size
        index = vision_inputs(self.side, self.side, cfg.spatial_merge_size, int(cfg.num_position_embeddings ** 0.5))
        self.taps, self.weights = torch.from_numpy(index["pos_taps"]), torch.from_numpy(index["pos_weights"])
        freqs = torch.from_numpy(index["rotary_pos"]).unsqueeze(-1).float() * visual.rotary_pos_emb.inv_freq
        angles = torch.cat([freqs.flatten(1)] * 2, dim=-1)
        self.cos, self.sin = angles.cos(), angles.sin()
        self.heads = cfg.num_heads
        self.deepstack = {layer: k for k, layer in enumerate(cfg.deepstack_visual_indexes)}

    def vision(self, rows):
        """rows [n * P, 1536] -> merged tokens [n * P / 4, D] and DeepStack features, like the stock tower."""
        import torch

        visual = self.model.model.visual
        patches = self.side * self.side
        x = visual.patch_embed(rows).reshape(-1, patches, visual.config.hidden_size)
        x = x + (visual.pos_embed(self.taps) * self.weights.unsqueeze(-1)).sum(1)
        deepstack = []
        for layer, block in enumerate(visual.blocks):
            h = block.norm1(x)
            n, p, width = h.shape
            q, k, v = block.attn.qkv(h).reshape(n, p, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            q, k = rope(q, self.cos, self.sin), rope(k, self.cos, self.sin)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=block.attn.scaling)
            x = x + block.attn.proj(out.transpose(1, 2).reshape(n, p, width))
            x = x + block.mlp(block.norm2(x))
            if layer in self.deepstack:
                deepstack.append(_merge(visual.deepstack_merger_list[self.deepstack[layer]], x))
        return _merge(visual.merger, x), deepstack

    def __call__(self, inputs, rows=None):
        """Logits [N, V] of the fed tokens (only `rows` of them if given) and the merged vision tokens."""
        model, steps = self.model, inputs["steps"]
        lm = model.model.language_model
        ids = inputs["tokens"]
        x = lm.embed_tokens(ids)
        visual = ids == model.config.video_token_id
        merged, deepstack = self.vision(inputs["pixel_values_videos"])
        x = x.masked_scatter(visual.unsqueeze(-1), merged.to(x.dtype))
        n = len(ids)
        self.values = []  # per layer, the vision tokens' attention values (the training probe reads them)
        for i, layer in enumerate(lm.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_norm(attn.q_proj(h).view(n, -1, attn.head_dim))
            k = attn.k_norm(attn.k_proj(h).view(n, -1, attn.head_dim))
            v = attn.v_proj(h).view(n, -1, attn.head_dim)
            self.values.append(v[visual].flatten(1))
            x = x + attn.o_proj(steps.attention(attn, q, k, v))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            if i < len(deepstack):
                x = x.masked_scatter(visual.unsqueeze(-1), x[visual] + deepstack[i])
        if rows is not None:
            x = x[rows]
        return model.lm_head(lm.norm(x)), merged


def check_forward(model, forward, example: dict) -> float:
    """Max abs difference between our forward and the stock one on a stream stretch without eviction (where the
    runtime's cache holds exactly what a forward over the whole context computes)."""
    import torch

    inputs, _ = collate([example], model)
    keys, positions, _ = example["steps"][-1]
    assert np.array_equal(keys, np.arange(len(example["tokens"]))), "the example evicted"
    blocks = len(example["frames"])
    with torch.no_grad():
        ours = forward(inputs)[0]
        stock = model(input_ids=inputs["tokens"][None], position_ids=torch.from_numpy(positions)[:, None],
                      pixel_values_videos=inputs["pixel_values_videos"],
                      video_grid_thw=torch.tensor([[1, 8, 8]] * blocks)).logits[0]
    return float((ours - stock).abs().max())


class Probe:
    """Training only: linear maps from a chunk's merged vision tokens to what the chunk shows. From the tokens'
    mean and max: the event, its colour and its shape. From each token (one grid cell): what stands in that cell in
    the chunk's first and in its last frame (nothing, or one of the 12 objects), so that the tokens carry what is
    where, not only what changed. From the attention values of each vision token in each text layer: its own row
    and column, so that a head that finds an object also copies where it stands."""

    def __init__(self, width: int, values: int, layers: int):
        import torch

        self.linear = torch.nn.Linear(2 * width, len(EVENTS) + len(COLOURS) + 1 + len(SHAPES) + 1)
        self.cells = torch.nn.Linear(width, 2 * CELL_CLASSES)
        self.place = [torch.nn.Linear(values, 2 * GRID) for _ in range(layers)]  # per layer: row and column

    def parameters(self):
        return [*self.linear.parameters(), *self.cells.parameters(), *(w for p in self.place for w in p.parameters())]

    def loss(self, merged, truth, cells, values):
        """merged [n * 16, D]; truth [n, 3] (event, colour, shape); cells [n, 2, 16] (first and last frame); values:
        per text layer, the vision tokens' attention values [n * 16, kv heads * head_dim]."""
        import torch
        import torch.nn.functional as F

        # normalized per token (the merged tokens start tiny: std ~0.06, ~0.01 across inputs), then the mean and the
        # max over the chunk's tokens: narrow enough for Adam, and what attention over the block can read
        normed = F.layer_norm(merged, merged.shape[-1:])
        tokens = normed.reshape(len(truth), FRAME_TOKENS, -1)
        logits = self.linear(torch.cat([tokens.mean(1), tokens.amax(1)], dim=-1))
        cuts = np.cumsum([len(EVENTS), len(COLOURS) + 1])
        parts = logits[:, :cuts[0]], logits[:, cuts[0]:cuts[1]], logits[:, cuts[1]:]
        losses = [F.cross_entropy(p, truth[:, k]) for k, p in enumerate(parts)]
        accuracy = [float((p.argmax(-1) == truth[:, k]).float().mean()) for k, p in enumerate(parts)]
        where = self.cells(normed).reshape(len(truth), FRAME_TOKENS, 2, CELL_CLASSES).transpose(1, 2)
        losses.append(F.cross_entropy(where.reshape(-1, CELL_CLASSES), cells.reshape(-1)))
        accuracy.append(float((where.argmax(-1) == cells).float().mean()))
        # Attention copies values, and RoPE moves only queries and keys: unless the values a vision token offers say
        # which cell it is, the language model can find the object asked about and still not say where it stands.
        # Left alone, the tower erased its position embedding (a linear read of a merged token's cell: 7.5%, chance
        # 6.3%; "where" answers 33%), and with the cell read from the merged tokens only, the model attended to the
        # right token (0.8-0.9 of a layer's attention) and still answered wrong half the time.
        place = torch.arange(FRAME_TOKENS).repeat(len(cells))
        place = torch.stack([place // GRID, place % GRID], dim=-1)
        right = []
        for linear, v in zip(self.place, values):
            guess = linear(F.layer_norm(v, v.shape[-1:])).reshape(-1, 2, GRID)
            losses.append(F.cross_entropy(guess.reshape(-1, GRID), place.reshape(-1)) / len(values))
            right.append(float((guess.argmax(-1) == place).all(-1).float().mean()))
        accuracy.append(min(right))
        return sum(losses) / 5, accuracy


def reply_loss(logits, label):
    """Cross-entropy over the positions that predict a reply token or its <|im_end|>; whether each argmax is right."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.float(), label), logits.argmax(-1) == label


def evaluate(model, forward, data: Streams, seeds: range, shuffle: bool, rng) -> dict:
    """Teacher-forced check of every chunk's reply in held-out stream stretches (greedy decoding reproduces a reply
    exactly when each of its teacher-forced argmaxes is right): captions, and answers per question kind. With
    shuffle, each stretch's chunks get one another's frames."""
    import torch

    right: dict[str, list[bool]] = {}
    with torch.no_grad():
        for seed in seeds:
            first = int(rng.choice([0, rng.integers(1, 300), rng.integers(300, 3600)]))
            e = data.example(rng, seed, first, first + 29, int(rng.integers(1, 5)), 0.0, questions=0.2)
            if shuffle:  # its own generator: the shuffled run sees the same stretches as the real one
                e["frames"] = e["frames"][np.random.default_rng(seed).permutation(len(e["frames"]))]
            inputs, _ = collate([e], model)
            rows = torch.nonzero(inputs["label"] >= 0).ravel()
            correct = (forward(inputs, rows)[0].argmax(-1) == inputs["label"][rows]).numpy()
            chunk = np.concatenate([np.full(fresh, k) for k, (_, _, fresh) in enumerate(e["steps"])])[rows.numpy()]
            for k, question in enumerate(e["questions"]):
                kind = "caption" if question is None else question.kind
                right.setdefault(kind, []).append(bool(correct[chunk == k].all()))
    return {kind: {"exact": float(np.mean(v)), "n": len(v)} for kind, v in sorted(right.items())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.train_micro", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--minutes", type=float, default=42.0,
                        help="training time budget (the schedule fits it; with the final check, 45 minutes)")
    parser.add_argument("--steps", type=int,
                        help="train this many steps instead (the schedule then follows steps, not the clock, so "
                             "a seeded run does not depend on the machine's speed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=48, help="chunks (replies) per batch")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval", type=int, default=60, help="held-out 30-chunk stretches for the final check")
    args = parser.parse_args(argv)

    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    write_folder_files(args.out)
    config = Qwen3VLConfig.from_json_file(str(args.out / "config.json"))
    model = Qwen3VLForConditionalGeneration(config).float().train()
    params = sum(p.numel() for p in model.parameters())
    length = f"{args.steps} steps" if args.steps else f"{args.minutes:g} minutes"
    print(f"micro Qwen3-VL: {params:,} parameters; training for {length} on {args.threads} threads", flush=True)
    text = config.text_config
    probe = Probe(text.hidden_size, text.num_key_value_heads * text.head_dim, text.num_hidden_layers)
    forward = Forward(model)
    data = Streams(args.out)
    unevicted = data.example(rng, TRAIN_SEEDS, 0, 9, 4, 4.0, questions=0.3)
    error = check_forward(model, forward, unevicted)
    print(f"training forward vs the stock forward: max abs logit difference {error:.1e}", flush=True)
    if error > 1e-4:
        raise SystemExit("the training forward does not match transformers")
    optimizer = torch.optim.AdamW([*model.parameters(), *probe.parameters()], lr=args.lr,
                                  weight_decay=0.01, betas=(0.9, 0.98))
    budget, start, step, history = args.minutes * 60, time.time(), 0, []
    tally = np.zeros((len(KINDS), 2))  # per reply kind: tokens right, tokens, since the last report
    while (progress := (time.time() - start) / budget if args.steps is None else step / args.steps) < 1:
        elapsed = time.time() - start
        lr = args.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        examples = batch(data, rng, progress, args.chunks, noise=4.0)
        inputs, truth = collate(examples, model)
        rows = torch.nonzero(inputs["label"] >= 0).ravel()
        logits, merged = forward(inputs, rows)
        loss, right = reply_loss(logits, inputs["label"][rows])
        probe_loss, probe_accuracy = probe.loss(merged, *truth, forward.values)
        optimizer.zero_grad()
        (loss + probe_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append((loss.item(), right.float().mean().item(), *probe_accuracy))
        kinds = reply_kinds(examples)[rows.numpy()]
        tally += np.stack([np.bincount(kinds, right.numpy(), len(KINDS)), np.bincount(kinds, None, len(KINDS))], 1)
        step += 1
        if step % 25 == 0:
            h = np.mean(history[-25:], axis=0)
            answers = " ".join(f"{name} {r / max(n, 1):.2f}" for name, (r, n) in zip(KINDS, tally))
            print(f"step {step} {elapsed / 60:5.1f} min  lr {lr:.2e}  loss {h[0]:.3f}  token acc {h[1]:.3f}  "
                  f"probe event/colour/shape/cells/place {h[2]:.2f}/{h[3]:.2f}/{h[4]:.2f}/{h[5]:.3f}/{h[6]:.3f}  "
                  f"tokens right: {answers}", flush=True)
            tally[:] = 0
        if step % 200 == 0:
            save(model, args.out)
    minutes = (time.time() - start) / 60
    model.eval()
    save(model, args.out)
    held_out = evaluate(model, forward, data, range(0, args.eval), False, np.random.default_rng(1))
    shuffled = evaluate(model, forward, data, range(0, args.eval), True, np.random.default_rng(1))
    report = {"parameters": params, "steps": step, "minutes": round(minutes, 1), "threads": args.threads,
              "seed": args.seed, "held_out_teacher_forced": held_out, "shuffled_frames": shuffled}
    (args.out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    caption, control = held_out["caption"]["exact"], shuffled["caption"]["exact"]
    answers = min(v["exact"] for k, v in held_out.items() if k != "caption")
    ok = caption >= 0.97 and answers >= 0.8 and control < 0.3
    print("trained: held-out exact captions {:.1%} (worst question kind {:.1%}), with shuffled frames {:.1%}: {}"
          .format(caption, answers, control, "OK" if ok else "FAILED (collapsed or undertrained)"))
    return 0 if ok else 1


def save(model, out: Path) -> None:
    """fp16 safetensors (half the bytes; the export loads them as fp32)."""
    import torch

    half = {name: value.detach().to(torch.float16) for name, value in model.state_dict().items()}
    model.save_pretrained(out, state_dict=half, safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)  # save_pretrained wrote its own; ours has both stops
    write_folder_files(out)


if __name__ == "__main__":
    sys.exit(main())
