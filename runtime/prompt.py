"""Token ids of the StreamingVLM prompt pieces, built from strings with the exported tokenizer.

Qwen3-VL's chat template adds no default system prompt, so the strings are written here rather than sliced from
a rendered template. Special token ids come from the manifest; the tokenizer splits on special tokens first, so
encoding the pieces separately gives exactly the ids of the whole prompt string.
"""

import numpy as np
from tokenizers import Tokenizer

from .manifest import Manifest

SUFFIX = " ..."  # how the trained model ends each second's commentary


class Prompter:
    def __init__(self, manifest: Manifest, system: str | None, previous_text: str, query: str,
                 timestamps: bool = False):
        self.tokenizer = Tokenizer.from_file(str(manifest.path(manifest["tokenizer"]["dir"]) / "tokenizer.json"))
        self.ids = manifest["tokens"]
        self.system, self.previous_text, self.query, self.timestamps = system, previous_text, query, timestamps
        self.suffix = tuple(self.encode(SUFFIX))

    def encode(self, text: str) -> np.ndarray:
        return np.array(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def head(self) -> np.ndarray:
        system = f"<|im_start|>system\n{self.system}<|im_end|>\n" if self.system else ""
        return self.encode(system + "<|im_start|>previous text\n")

    def previous(self) -> np.ndarray:
        return self.encode(self.previous_text)

    def previous_close(self) -> np.ndarray:
        return self.encode("<|im_end|>\n")

    def user_turn(self, start: float, end: float, tokens_per_patch: int, patches: int, first: bool,
                  question: np.ndarray | None = None):
        """[(kind, ids, is_patch)] of the user turn, `<|im_start|>user\\nTime=a-bs<|vision_start|>`, the video pads,
        `<|vision_end|>[query][question]<|im_end|>\\n`, cut where eviction cuts: the Time= text ("time"), the vision
        block ("vision": its markers, and one entry of video pads per temporal patch), the query and a question
        asked mid-stream (`question`: its token ids). The tokenizer never merges across these cuts (tested)."""
        stamp = f"<{(start + end) / 2:.1f} seconds>" if self.timestamps else ""
        pieces = [("text", self.encode("<|im_start|>user\n"), False),
                  ("time", self.encode(f"Time={start:.1f}-{end:.1f}s{stamp}"), False),
                  ("vision", self.encode("<|vision_start|>"), False)]
        pieces += [("vision", np.full(tokens_per_patch, self.ids["video_pad"], np.int64), True)] * patches
        pieces.append(("vision", self.encode("<|vision_end|>"), False))
        if first and self.query:
            pieces.append(("query", self.encode(self.query), False))
        if question is not None and len(question):
            pieces.append(("question", question, False))
        pieces.append(("text", self.encode("<|im_end|>\n"), False))
        return pieces

    def open(self) -> np.ndarray:
        return self.encode("<|im_start|>assistant\n")

    def close(self) -> np.ndarray:
        """Ends a reply: its <|im_end|> (generated or appended at the token cap) and the newline before the next
        user turn."""
        return np.array([self.ids["im_end"], *self.encode("\n")], dtype=np.int64)
