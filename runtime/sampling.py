"""Next-token choice: repetition penalty, temperature, top-k, top-p, then a seeded draw (or argmax)."""

from dataclasses import dataclass

import numpy as np


@dataclass
class Sampling:
    temperature: float = 0.9  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.05  # over every token id in the retained context; 1 = off
    seed: int | None = None


class Sampler:
    def __init__(self, sampling: Sampling):
        self.s = sampling
        self.rng = np.random.default_rng(sampling.seed)

    def __call__(self, logits: np.ndarray, context: np.ndarray) -> int:
        """logits float [V]; context: token ids seen so far (penalised once each, however often they occur)."""
        s = self.s
        logits = logits.astype(np.float32, copy=True)
        if s.repetition_penalty != 1.0 and len(context):
            seen = np.unique(context)
            scores = logits[seen]
            # As in CTRL and transformers: shrink positive scores, grow negative ones.
            logits[seen] = np.where(scores > 0, scores / s.repetition_penalty, scores * s.repetition_penalty)
        if s.temperature <= 0:
            return int(np.argmax(logits))
        logits /= s.temperature
        if 0 < s.top_k < len(logits):
            kth = np.partition(logits, -s.top_k)[-s.top_k]
            logits[logits < kth] = -np.inf
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if s.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            # keep the smallest prefix whose mass reaches top_p (always at least the most likely token)
            drop = order[np.searchsorted(cumulative, s.top_p) + 1:]
            probs[drop] = 0.0
            probs /= probs.sum()
        return int(self.rng.choice(len(probs), p=probs))
