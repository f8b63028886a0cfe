"""Train the built-in micro Qwen3-VL from scratch on the synthetic world: `make train-micro`.

python -m export.train_micro [--out export/presets/micro] [--minutes 45 | --steps N] [--seed 0] [--threads 2]

A stock `Qwen3VLForConditionalGeneration` of about a million parameters learns to say, each second, which event
happened between the second's two frames, in conversations built and evicted by the runtime's own code. Two
things make it learn on 2 CPU cores in well under an hour (a plain recipe lets the vision tower collapse: the
language model learns the caption prior and the loss with shuffled videos equals the real loss):
- a linear probe on each chunk's merged vision tokens (normalized; their mean and max) predicts the event, colour
  and shape (training only; it is not part of the saved model), so the vision tower must carry them;
- a curriculum: one object and short conversations first, then up to four objects and contexts at any point of
  an hour-long stream (previous text full of folded replies and trimmed).
It ends with a teacher-forced check on held-out worlds, with real and with shuffled frames: exact captions must be
>= 90% with real frames and near chance with shuffled ones, or the run fails. World seeds >= 1,000,000 are for
training; the tests and the demo use smaller ones.
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
from runtime.world import COLOURS, EVENTS, SHAPES, SIZE

from .decoder import rope
from .micro import FRAME_TOKENS, QUERY, Conversations, labels, write_folder_files
from .vision import _merge

DEFAULT_OUT = Path(__file__).parent / "presets" / "micro"
TRAIN_SEEDS = 1_000_000  # world seeds from here up are training data; below are held out


def pixels(frames: np.ndarray) -> np.ndarray:
    """[n, 2, H, W, 3] uint8 -> the HF processor's pixel_values_videos rows [n * P, 1536] (runtime layout)."""
    if not len(frames):
        return np.zeros((0, 1536), np.float32)
    rows = [patchify(pair, 16, 2, 2, [0.5] * 3, [0.5] * 3, 1 / 255) for pair in frames]
    return np.concatenate(rows).reshape(-1, rows[0].shape[-1])


def phase(progress: float, rng: np.random.Generator) -> dict:
    """The curriculum: what one example looks like at this point of training (0..1)."""
    if progress < 0.12:
        return {"max_objects": 1, "last": int(rng.integers(0, 6))}
    if progress < 0.3:
        return {"max_objects": int(rng.integers(1, 5)), "last": int(rng.integers(0, 20))}
    draw = rng.random()
    last = (rng.integers(0, 24) if draw < 0.55 else rng.integers(24, 400) if draw < 0.8 else rng.integers(400, 4000))
    return {"max_objects": int(rng.integers(1, 5)), "last": int(last)}


def batch(data: Conversations, rng: np.random.Generator, progress: float, token_budget: int,
          noise: float) -> list[dict]:
    """Training examples (world seeds >= TRAIN_SEEDS) until the batch holds `token_budget` tokens."""
    examples, tokens = [], 0
    while tokens < token_budget:
        spec = phase(progress, rng)
        seed = int(rng.integers(TRAIN_SEEDS, 2**62))
        query = None if rng.random() < 0.1 else QUERY  # the runtime's default query, sometimes none
        example = data.example(rng, seed, spec["last"], spec["max_objects"], noise, query=query)
        examples.append(example)
        tokens += len(example["tokens"])
    return examples


def collate(examples: list[dict], pad: int):
    import torch

    length = max(len(e["tokens"]) for e in examples)
    n = len(examples)
    ids = torch.full((n, length), pad, dtype=torch.long)
    positions = torch.zeros((3, n, length), dtype=torch.long)
    target = torch.zeros((n, length), dtype=torch.bool)
    mask = torch.zeros((n, length), dtype=torch.long)
    for i, e in enumerate(examples):
        s = len(e["tokens"])
        ids[i, :s] = torch.from_numpy(e["tokens"])
        positions[:, i, :s] = torch.from_numpy(e["positions"])
        target[i, :s] = torch.from_numpy(e["target"].astype(bool))
        mask[i, :s] = 1
    frames = np.concatenate([e["frames"] for e in examples])
    blocks = len(frames)
    probe = torch.tensor([labels(ev) for e in examples for ev in e["events"]], dtype=torch.long).reshape(-1, 3)
    return {"input_ids": ids, "position_ids": positions, "attention_mask": mask,
            "pixel_values_videos": torch.from_numpy(pixels(frames)),
            "video_grid_thw": torch.tensor([[1, 8, 8]] * blocks, dtype=torch.long).reshape(-1, 3)}, target, probe


class Forward:
    """The stock model's forward for training, with the vision tower batched over chunks: transformers runs its
    block-diagonal vision attention as a Python loop over chunks (hundreds per batch here); this runs one batched
    product over the same weights (the index math is the runtime's, proven equal to transformers'). Checked against
    the stock forward before training starts."""

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

    def __call__(self, inputs):
        """Logits [B, S, V] and the merged vision tokens (for the probe)."""
        model = self.model
        ids = inputs["input_ids"]
        embeds = model.model.get_input_embeddings()(ids)
        visual = ids == model.config.video_token_id
        merged, deepstack = self.vision(inputs["pixel_values_videos"])
        embeds = embeds.masked_scatter(visual.unsqueeze(-1), merged.to(embeds.dtype))
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                                            position_ids=inputs["position_ids"], visual_pos_masks=visual,
                                            deepstack_visual_embeds=deepstack).last_hidden_state
        return model.lm_head(hidden), merged


def check_forward(model, forward, examples, pad: int) -> float:
    """Max abs difference between our training forward and the stock one on a batch (must be float noise)."""
    import torch

    inputs, _, _ = collate(examples, pad)
    with torch.no_grad():
        ours = forward(inputs)[0]
        stock = model(**inputs).logits
    mask = inputs["attention_mask"].bool()
    return float((ours - stock)[mask].abs().max())


class Probe:
    """Linear maps from a chunk's merged vision tokens (flattened) to event, colour and shape: training only."""

    def __init__(self, width: int):
        import torch

        self.linear = torch.nn.Linear(2 * width, len(EVENTS) + len(COLOURS) + 1 + len(SHAPES) + 1)

    def loss(self, merged, truth):
        import torch
        import torch.nn.functional as F

        # normalized per token (the merged tokens start tiny: std ~0.06, ~0.01 across inputs), then the mean and the
        # max over the chunk's tokens: narrow enough for Adam, and what attention over the block can read
        tokens = F.layer_norm(merged, merged.shape[-1:]).reshape(len(truth), FRAME_TOKENS, -1)
        features = torch.cat([tokens.mean(1), tokens.amax(1)], dim=-1)
        logits = self.linear(features)
        cuts = np.cumsum([len(EVENTS), len(COLOURS) + 1])
        parts = logits[:, :cuts[0]], logits[:, cuts[0]:cuts[1]], logits[:, cuts[1]:]
        losses = [F.cross_entropy(p, truth[:, k]) for k, p in enumerate(parts)]
        accuracy = [float((p.argmax(-1) == truth[:, k]).float().mean()) for k, p in enumerate(parts)]
        return sum(losses) / 3, accuracy


def reply_loss(logits, inputs, target):
    """Cross-entropy over the reply tokens (and their <|im_end|>); also whether each token's argmax is right."""
    import torch.nn.functional as F

    logits = logits[:, :-1]
    wanted = target[:, 1:]
    labels_ = inputs["input_ids"][:, 1:]
    chosen = logits[wanted]
    loss = F.cross_entropy(chosen.float(), labels_[wanted])
    return loss, chosen.argmax(-1) == labels_[wanted]


def exact_last(model, data: Conversations, seeds: range, count: int, shuffle: bool, rng) -> dict:
    """Teacher-forced check of each example's last reply (greedy decoding reproduces a reply exactly when every
    one of its teacher-forced argmaxes is right). With shuffle, the vision blocks are permuted across examples."""
    import torch

    exact, attribute = [], {"event": [], "colour": [], "shape": []}
    with torch.no_grad():
        for k in range(count):
            spec = {"max_objects": int(rng.integers(1, 5)), "last": int(rng.integers(0, 700))}
            e = data.example(rng, seeds.start + k, spec["last"], spec["max_objects"], 0.0)
            if shuffle:
                e["frames"] = e["frames"][rng.permutation(len(e["frames"]))]
            inputs, target, _ = collate([e], data.prompter.ids["endoftext"])
            logits = model(**inputs).logits[0, :-1]
            want = inputs["input_ids"][0, 1:]
            where = torch.nonzero(target[0, 1:]).ravel()
            last = where[-(len(data.reply_ids(e["events"][-1])) + 1):]  # the last reply and its <|im_end|>
            right = (logits[last].argmax(-1) == want[last]).tolist()
            exact.append(all(right))
            event = e["events"][-1]
            # reply words: "the C S moves D" / "a C S appears" / "the C S disappears"; silence: "\n"
            if event.kind == "nothing":
                for key in attribute:
                    attribute[key].append(right[0])
            else:
                attribute["colour"].append(right[1])
                attribute["shape"].append(right[2])
                attribute["event"].append(all(right[3:-2]) and right[0])
    return {"exact": float(np.mean(exact)), **{k: float(np.mean(v)) for k, v in attribute.items()}, "n": count}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.train_micro", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--minutes", type=float, default=45.0, help="training time budget (the schedule fits it)")
    parser.add_argument("--steps", type=int,
                        help="train this many steps instead (the schedule then follows steps, not the clock, so "
                             "a seeded run does not depend on the machine's speed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2000, help="tokens per batch")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval", type=int, default=300, help="held-out examples for the final check")
    args = parser.parse_args(argv)

    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    ids = write_folder_files(args.out)
    config = Qwen3VLConfig.from_json_file(str(args.out / "config.json"))
    model = Qwen3VLForConditionalGeneration(config).float().train()
    params = sum(p.numel() for p in model.parameters())
    length = f"{args.steps} steps" if args.steps else f"{args.minutes:g} minutes"
    print(f"micro Qwen3-VL: {params:,} parameters; training for {length} on {args.threads} threads", flush=True)
    probe = Probe(config.text_config.hidden_size)
    forward = Forward(model)
    data = Conversations(args.out)
    error = check_forward(model, forward, batch(data, rng, 0.5, 1500, noise=4.0), ids["<|endoftext|>"])
    print(f"training forward vs the stock forward: max abs logit difference {error:.1e}", flush=True)
    if error > 1e-4:
        raise SystemExit("the batched training forward does not match transformers")
    optimizer = torch.optim.AdamW([*model.parameters(), *probe.linear.parameters()], lr=args.lr,
                                  weight_decay=0.01, betas=(0.9, 0.98))
    budget, start, step, history = args.minutes * 60, time.time(), 0, []
    while (elapsed := time.time() - start) < budget if args.steps is None else step < args.steps:
        progress = elapsed / budget if args.steps is None else step / args.steps
        lr = args.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, target, truth = collate(batch(data, rng, progress, args.tokens, noise=4.0), ids["<|endoftext|>"])
        logits, merged = forward(inputs)
        loss, right = reply_loss(logits, inputs, target)
        probe_loss, probe_accuracy = probe.loss(merged, truth)
        optimizer.zero_grad()
        (loss + probe_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append((loss.item(), right.float().mean().item(), *probe_accuracy))
        step += 1
        if step % 25 == 0:
            h = np.mean(history[-25:], axis=0)
            print(f"step {step} {elapsed / 60:5.1f} min  lr {lr:.2e}  loss {h[0]:.3f}  token acc {h[1]:.3f}  "
                  f"probe event/colour/shape {h[2]:.2f}/{h[3]:.2f}/{h[4]:.2f}", flush=True)
        if step % 200 == 0:
            save(model, args.out)
    minutes = (time.time() - start) / 60
    model.eval()
    save(model, args.out)
    held_out = exact_last(model, data, range(0, args.eval), args.eval, False, np.random.default_rng(1))
    shuffled = exact_last(model, data, range(0, args.eval), args.eval, True, np.random.default_rng(1))
    report = {"parameters": params, "steps": step, "minutes": round(minutes, 1), "threads": args.threads,
              "seed": args.seed, "held_out_teacher_forced": held_out, "shuffled_frames": shuffled}
    (args.out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    ok = held_out["exact"] >= 0.9 and shuffled["exact"] < 0.3
    print("trained: held-out exact captions {:.1%}, with shuffled frames {:.1%}: {}".format(
        held_out["exact"], shuffled["exact"], "OK" if ok else "FAILED (collapsed or undertrained)"))
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
