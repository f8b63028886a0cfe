"""The built-in micro model's Hugging Face folder (config, tokenizer, processor configs) and its training data.

The tokenizer is word-level in the `tokenizers` format: digits split one by one, then GPT-2's byte-level split
(so " red" and "red" are different words and decoding restores the spaces), a vocabulary of exactly the words the
runtime's prompts and the world's captions, questions and answers use, and the Qwen chat tokens as special tokens.
Training examples are stretches of streams fed as the runtime feeds them: built by the runtime's own `Prompter`
and evicted by its own `Context`, so the model sees exactly the retained layouts the stream produces (previous
text with folded replies, turns without frames, dropped turns) and exactly the cached keys and values.
"""

import json
from pathlib import Path

import numpy as np

from runtime.context import Context, Segment, Settings
from runtime.manifest import Manifest
from runtime.prompt import Prompter
from runtime.world import COLOURS, EVENTS, SHAPES, SIZE, Asker, Event, Said, World, cells, question_corpus

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>", "<unk>")
QUERY = "Commentate on this match"  # the runtime's default query
VOCAB_SIZE = 96  # the words below (80) fit with room to spare
FRAME_TOKENS = (SIZE // 32) ** 2  # merged vision tokens per frame pair (patch 16 x merge 2)


def _corpus() -> list[str]:
    """Every string the runtime's prompts, the captions, the questions and their answers are made of."""
    words = ["system", "user", "assistant", "previous text", QUERY, "\n", " ...", "\n ...", "Time=0.0-1.0s",
             "0123456789", "<0.5 seconds>"]
    for colour in COLOURS:
        for shape in SHAPES:
            words += [Event(kind, colour, shape).reply() for kind in EVENTS if kind != "nothing"]
    return words + question_corpus()


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    pieces = []
    for text in _corpus():
        pieces += [p for p, _ in pre.pre_tokenize_str(text)]
    vocab = {token: i for i, token in enumerate(SPECIAL)}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    assert len(vocab) <= VOCAB_SIZE, len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL))
    return tokenizer


def config(ids: dict) -> dict:
    """Qwen3-VL at about a million parameters: 4 text layers of width 128, a 3-block vision tower of width 64 whose
    8x8 position table matches a 128x128 frame."""
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": True,
        "text_config": {
            "model_type": "qwen3_vl_text", "vocab_size": VOCAB_SIZE, "hidden_size": 128, "intermediate_size": 256,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "hidden_act": "silu", "rms_norm_eps": 1e-6, "attention_bias": False, "attention_dropout": 0.0,
            "max_position_embeddings": 32768, "initializer_range": 0.02, "tie_word_embeddings": True,
            "use_cache": True, "rope_theta": 5000000,
            "rope_scaling": {"rope_type": "default", "mrope_section": [8, 4, 4], "mrope_interleaved": True},
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"]},
        "vision_config": {
            "model_type": "qwen3_vl", "depth": 3, "hidden_size": 64, "intermediate_size": 256, "num_heads": 2,
            "hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2,
            "temporal_patch_size": 2, "out_hidden_size": 128, "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0, 1], "initializer_range": 0.02},
    }


def write_folder_files(folder: Path) -> dict:
    """Everything but the weights: tokenizer, config.json, generation and processor configs. Returns token ids."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    tokenizer.save(str(folder / "tokenizer.json"))
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": "<unk>", "model_max_length": 32768}, indent=1) + "\n")
    (folder / "config.json").write_text(json.dumps(config(ids), indent=1) + "\n")
    (folder / "generation_config.json").write_text(json.dumps({
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"]},
        indent=1) + "\n")
    pixels = SIZE * SIZE
    processor = {"do_normalize": True, "do_rescale": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                 "merge_size": 2, "patch_size": 16, "temporal_patch_size": 2, "resample": 3,
                 "rescale_factor": 1 / 255,
                 # per-frame bounds: 128x128 frames stay 128x128 (the export honours these; see README)
                 "min_pixels": pixels, "max_pixels": pixels}
    (folder / "preprocessor_config.json").write_text(json.dumps({
        **processor, "image_processor_type": "Qwen2VLImageProcessorFast",
        "size": {"shortest_edge": pixels, "longest_edge": pixels}}, indent=1) + "\n")
    (folder / "video_preprocessor_config.json").write_text(json.dumps({
        **processor, "fps": 2, "video_processor_type": "Qwen3VLVideoProcessor",
        "size": {"shortest_edge": 2 * pixels, "longest_edge": 2 * pixels}}, indent=1) + "\n")
    return ids


def prompter(folder: Path, query: str = QUERY) -> Prompter:
    """The runtime's Prompter over the folder's tokenizer (a manifest holding only what the Prompter reads)."""
    ids = json.loads((folder / "config.json").read_text())
    tokens = {"video_pad": ids["video_token_id"]}
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    tokens |= {"im_start": added["<|im_start|>"], "im_end": added["<|im_end|>"], "endoftext": added["<|endoftext|>"]}
    return Prompter(Manifest(folder, {"tokenizer": {"dir": "."}, "tokens": tokens}), None, "", query)


class Streams:
    """Training examples: stretches of a world stream fed exactly as the runtime feeds them (the runtime's own
    `Prompter` and `Context`): each chunk evicts, re-positions, then feeds its prompt and its reply on top of the
    keys and values the earlier chunks left, so a token's keys and values are those computed when it was new, in the
    context it had then, and every later chunk sees them at the positions its eviction gave them."""

    def __init__(self, folder: Path, settings: Settings | None = None):
        self.prompter = prompter(folder)
        self.settings = settings or Settings()
        self.encoded = {}  # text -> token ids (the tokenizer is the slow part)
        self.grid = (SIZE // 32, SIZE // 32)

    def encode(self, text: str) -> np.ndarray:
        if text not in self.encoded:
            self.encoded[text] = self.prompter.encode(text)
        return self.encoded[text]

    def example(self, rng: np.random.Generator, seed: int, first: int, last: int, max_objects: int, noise: float,
                questions: float = 0.0, query: str | None = QUERY, replies=None, script=None,
                weights: dict | None = None) -> dict:
        """Chunks `first`..`last` of World(seed) fed as a stream; the commentary of the seconds before `first` is
        the previous text it starts from (their true captions, folded and trimmed as eviction would). That previous
        text is fed as one block with the first chunk's prompt, so its keys and values are the one part not computed
        as the runtime computed them (there, each caption was a reply in its own round); everything fed from `first`
        on is exactly the runtime's. `questions`:
        the chance that a chunk's user turn asks a question (world.Asker, with its kind `weights`), whose answer
        is then the reply.
        `replies` ({chunk: token ids}) and `script` ({chunk: question text}) replace the true replies and the
        world's questions (tests: what a runtime said and was asked).

        Returns, in feed order: tokens [T], label [T] (the token each position must predict, -1 where none: the
        assistant opener's last token predicts the first reply token, each reply token the next, the last one the
        <|im_end|>), `steps` (one per chunk: the retained context's token indices into the feed [K], their positions
        [3, K] and how many of them, at the end, the chunk fed), frames [n, 2, H, W, 3] of each chunk, events and
        questions per chunk (None where none was asked), cells [n, 2, 16] (world.cells of each chunk's first and
        last frame: the training probe's truth)."""
        s, p = self.settings, self.prompter
        p.query = query or ""
        feed: list[np.ndarray] = []
        fed = 0

        def segment(ids, kind="text", grid=None):
            nonlocal fed
            ids = np.asarray(ids, np.int64)
            feed.append(ids)
            fed += len(ids)
            return Segment(ids, np.arange(fed - len(ids), fed), grid, kind)

        world = World(seed, max_objects, noise)
        asker = Asker(rng, questions, weights=weights)
        said = []
        for index in range(first):  # the seconds before: captioned, without questions (no frames needed)
            event = world.advance()
            asker.history.append(Said(index, event, True))
            said.append(self.encode(event.reply())[:-len(p.suffix)])
        ctx = Context(s, suffix=p.suffix)
        ctx.head = segment(p.head())
        previous = np.concatenate([p.previous(), *said]).astype(np.int64)
        if len(previous) > s.text_sink + s.text_window:  # as eviction trims it
            previous = np.concatenate([previous[:s.text_sink], previous[-s.text_window:]])
        ctx.previous = segment(previous)
        ctx.previous_close = segment(p.previous_close())
        label, done = [], 0
        steps, frames, grid, events, asked = [], [], [], [], []
        for index in range(first, last + 1):
            before, held = world.frame(), cells(world.things)
            event = world.advance()
            question = asker.maybe(index, event, world.things)
            ctx.evict(index)  # slots need no freeing: every token has its own
            if script is not None:
                question = script.get(index)
            text = None if question is None else self.encode(getattr(question, "text", question))
            ctx.add_round(index, p, segment, float(index), index + 1.0, self.grid, 1, text)
            if replies is not None:
                reply = np.asarray(replies[index], np.int64)
            else:
                reply = self.encode(question.reply() if question else event.reply())
            ctx.rounds[-1].reply = segment(reply)
            fresh, done = fed - done, fed  # this chunk's prefill (and the head, at the first) and its reply
            steps.append((ctx.slots(), ctx.positions(), fresh))
            wanted = np.full(fresh, -1)
            wanted[fresh - len(reply) - 1:] = [*reply, p.ids["im_end"]]  # from the opener's last token on
            label.append(wanted)
            frames.append(np.stack([before, world.frame()]))
            grid.append(np.stack([held, cells(world.things)]))
            events.append(event)
            asked.append(question)
        tokens = np.concatenate(feed)
        return {"tokens": tokens, "label": np.concatenate(label), "steps": steps, "frames": np.stack(frames),
                "cells": np.stack(grid), "events": events, "questions": asked, "context": ctx}


def labels(event: Event) -> tuple[int, int, int]:
    """(event, colour, shape) class ids for the training-only probe; 'nothing' has colour and shape 'none'."""
    colour = list(COLOURS).index(event.colour) if event.colour else len(COLOURS)
    shape = SHAPES.index(event.shape) if event.shape else len(SHAPES)
    return EVENTS.index(event.kind), colour, shape

