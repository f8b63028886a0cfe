"""The built-in micro model's Hugging Face folder (config, tokenizer, processor configs) and its training data.

The tokenizer is word-level in the `tokenizers` format: digits split one by one, then GPT-2's byte-level split
(so " red" and "red" are different words and decoding restores the spaces), a vocabulary of exactly the words the
runtime's prompts and the world's captions use, and the Qwen chat tokens as special tokens. Training examples are
conversations built by the runtime's own `Prompter` and evicted by its own `Context`, so the model sees exactly the
retained layouts the stream produces: previous text with folded replies, turns without frames, dropped turns.
"""

import json
from pathlib import Path

import numpy as np

from runtime.context import Context, Round, Segment, Settings
from runtime.manifest import Manifest
from runtime.prompt import Prompter
from runtime.world import COLOURS, EVENTS, SHAPES, SIZE, Event, World

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>", "<unk>")
QUERY = "Commentate on this match"  # the runtime's default query
VOCAB_SIZE = 64  # the words below fit with room to spare
FRAME_TOKENS = (SIZE // 32) ** 2  # merged vision tokens per frame pair (patch 16 x merge 2)


def _corpus() -> list[str]:
    """Every string the runtime's prompts and the captions are made of."""
    words = ["system", "user", "assistant", "previous text", QUERY, "\n", " ...", "\n ...", "Time=0.0-1.0s",
             "0123456789", "<0.5 seconds>"]
    for colour in COLOURS:
        for shape in SHAPES:
            words += [Event(kind, colour, shape).reply() for kind in EVENTS if kind != "nothing"]
    return words


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


class Conversations:
    """Training examples: the retained context of a stream at a chunk, as the runtime holds it."""

    def __init__(self, folder: Path, settings: Settings | None = None):
        self.prompter = prompter(folder)
        self.settings = settings or Settings()
        self.replies = {}  # reply text -> token ids (the tokenizer is the slow part)
        self.grid = (SIZE // 32, SIZE // 32)

    def reply_ids(self, event: Event) -> np.ndarray:
        text = event.reply()
        if text not in self.replies:
            self.replies[text] = self.prompter.encode(text)
        return self.replies[text]

    def example(self, rng: np.random.Generator, seed: int, last: int, max_objects: int, noise: float,
                query: str | None = QUERY) -> dict:
        """The context at chunk `last` after its reply. The last max(windows)+4 chunks come from World(seed) (after
        a random warm-up); earlier ones, folded into the previous text, are random captions.

        Returns tokens [S], positions [3, S], target [S] (1 where the token is a reply token or the <|im_end|> that
        ends it: what the model must predict), frames [n, 2, H, W, 3] of the n retained vision blocks in order, and
        their events."""
        s, p = self.settings, self.prompter
        p.query = query or ""
        span = max(s.window_size, s.text_round) + 4
        first = max(0, last - span)
        ctx = Context(s, suffix=p.suffix)
        counter = iter(range(1 << 30))

        def segment(ids, kind="text", grid=None):
            return Segment(np.asarray(ids, np.int64), np.array([next(counter) for _ in ids], np.int64), grid, kind)

        ctx.head, ctx.previous_close = segment(p.head()), segment(p.previous_close())
        folded = [self.reply_ids(Event(EVENTS[k], *self._attributes(rng)))[:-len(p.suffix)]
                  for k in rng.integers(len(EVENTS), size=first)]
        previous = np.concatenate([np.zeros(0, np.int64), *folded])
        if len(previous) > s.text_sink + s.text_window:
            previous = np.concatenate([previous[:s.text_sink], previous[-s.text_window:]])
        ctx.previous = segment(previous)

        world = World(seed, max_objects, noise)
        for _ in range(rng.integers(0, 30) if first else 0):
            world.advance()
        frames, events = {}, {}
        for index, (pair, event) in zip(range(first, last + 1), world.chunks(last + 1 - first)):
            ctx.evict(index)
            if ctx.rounds and ctx.rounds[-1].index == index - 1 and not ctx.rounds[-1].folded:
                ctx.rounds[-1].close = segment(p.close())
            user = [segment(ids, kind, self.grid if patch else None)
                    for kind, ids, patch in p.user_turn(float(index), index + 1.0, self.grid[0] * self.grid[1],
                                                        1, index == 0)]
            ctx.rounds.append(Round(index, user, segment(p.open())))
            ctx.rounds[-1].reply = segment(self.reply_ids(event))
            frames[index], events[index] = pair, event
        ctx.rounds[-1].close = segment(p.close())

        tokens = ctx.tokens()
        blocks = [r.index for r in ctx.rounds if any(u.grid for u in r.user)]
        target = np.zeros(len(tokens), np.int8)
        offset = 0
        replies = {id(r.reply) for r in ctx.rounds if len(r.reply)}
        closes = {id(r.close) for r in ctx.rounds if len(r.reply)}
        for segment_ in ctx.segments():
            if id(segment_) in replies:
                target[offset:offset + len(segment_)] = 1
            elif id(segment_) in closes:
                target[offset] = 1  # the <|im_end|> that ends the reply
            offset += len(segment_)
        return {"tokens": tokens, "positions": ctx.positions(), "target": target,
                "frames": np.stack([frames[i] for i in blocks]) if blocks else np.zeros((0, 2, SIZE, SIZE, 3),
                                                                                          np.uint8),
                "events": [events[i] for i in blocks]}

    @staticmethod
    def _attributes(rng: np.random.Generator) -> tuple[str, str]:
        return list(COLOURS)[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]


def labels(event: Event) -> tuple[int, int, int]:
    """(event, colour, shape) class ids for the training-only probe; 'nothing' has colour and shape 'none'."""
    colour = list(COLOURS).index(event.colour) if event.colour else len(COLOURS)
    shape = SHAPES.index(event.shape) if event.shape else len(SHAPES)
    return EVENTS.index(event.kind), colour, shape

