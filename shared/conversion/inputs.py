"""Token batches for calibration and checks: text through the checkpoint's own tokenizer when it
has one (corpus.py), random tokens otherwise or on request, or the caller's explicit ids.
Calibration and check batches never share text (the corpus' splits) or draws (other seeds)."""
from dataclasses import dataclass

import torch

from .errors import InvalidOptionsError


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor | None  # (B, T), 1 = real token; None when no sequence is padded
    kind: str  # "text", "random" or "explicit"

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum()) if self.attention_mask is not None else self.input_ids.numel()

    def describe(self) -> dict:
        return {"kind": self.kind, "sequences": self.input_ids.shape[0], "tokens": self.tokens}


def load_tokenizer(directory):
    """The checkpoint's tokenizer, or None when it has none that transformers can load."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        tokenizer("a")  # one built without a vocabulary (reformer's tiny model) loads but cannot encode
        return tokenizer
    except Exception:  # no tokenizer files, or files transformers cannot read: fall back to random tokens
        return None


def padded(sequences: list[list[int]], pad_id: int, kind: str) -> Batch:
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), T, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return Batch(ids, None if bool(mask.all()) else mask, kind)


def random_batch(vocab_size: int, n_tokens: int, seq_len: int, seed: int) -> Batch:
    n_seqs = max(1, -(-n_tokens // seq_len))
    generator = torch.Generator().manual_seed(seed)
    return Batch(torch.randint(0, vocab_size, (n_seqs, seq_len), generator=generator), None, "random")


def text_batch(tokenizer, vocab_size: int, n_tokens: int, seq_len: int, split: str, seed: int) -> Batch | None:
    from .corpus import text_token_sequences

    sequences = text_token_sequences(tokenizer, seq_len=seq_len, n_tokens=n_tokens, split=split, seed=seed)
    sequences = [[t for t in s if t < vocab_size] for s in sequences]
    sequences = [s for s in sequences if len(s) >= 2]
    if not sequences:
        return None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None and tokenizer.pad_token_id < vocab_size else 0
    return padded(sequences, pad, "text")


def calibration_batch(options, tokenizer, vocab_size: int, max_positions: int) -> Batch:
    seq_len = min(options.seq_len, max_positions)
    if options.calibration_token_ids is not None:
        bad = [t for s in options.calibration_token_ids for t in s if not 0 <= t < vocab_size]
        if bad:
            raise InvalidOptionsError(f"calibration token ids {bad[:5]} are outside the vocabulary (size {vocab_size})")
        return padded([s[:max_positions] for s in options.calibration_token_ids], 0, "explicit")
    if options.calibration == "text" and tokenizer is None:
        raise InvalidOptionsError("calibration 'text' needs a tokenizer in the source directory; it has none")
    if options.calibration != "random" and tokenizer is not None:
        batch = text_batch(tokenizer, vocab_size, options.calibration_tokens, seq_len, "calibration", options.seed)
        if batch is not None:
            return batch
    return random_batch(vocab_size, options.calibration_tokens, seq_len, options.seed)


def check_batch(options, tokenizer, vocab_size: int, max_positions: int, kind: str) -> Batch:
    """Two sequences the calibration never saw: random draws with another seed, or the corpus' check split."""
    seq_len = min(options.seq_len, max_positions)
    if kind == "text" and tokenizer is not None:
        batch = text_batch(tokenizer, vocab_size, 2 * seq_len, seq_len, "check", options.seed)
        if batch is not None:
            return batch
    return random_batch(vocab_size, 2 * seq_len, seq_len, options.seed + 1)
