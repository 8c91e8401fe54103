"""Calibration text: a small corpus shipped in corpus/ (prose in a dozen languages, source
code, numbers and tables; origins and licences in corpus/README.md), tokenised on demand.

Each file is cut into pieces of about PIECE_CHARS characters at line ends; even pieces
belong to the "calibration" split, odd ones to "check". The two splits never share text,
whatever the tokenizer or seq_len.

    seqs = text_token_sequences(tokenizer, seq_len=64, n_tokens=256, split="calibration")
"""
import hashlib
import itertools
import random
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CORPUS_DIR = Path(__file__).with_name("corpus")
PIECE_CHARS = 2000
MIN_SEQUENCES = 3  # a small n_tokens is cut into shorter sequences so that prose, code and numbers all come in
Split = Literal["calibration", "check"]


def corpus_files() -> list[Path]:
    return sorted(CORPUS_DIR.glob("*.txt"))


def pieces(path: Path) -> list[str]:
    """The file's text in pieces of at most PIECE_CHARS characters, each ending at a line end
    where the text has one; joined, they give the file back."""
    text, out, start = path.read_text(encoding="utf-8"), [], 0
    while start < len(text):
        end = min(start + PIECE_CHARS, len(text))
        if end < len(text):
            end = text.rfind("\n", start, end) + 1 or end
        out.append(text[start:end])
        start = end
    return out


def split_pieces(path: Path, split: Split) -> list[str]:
    if split not in ("calibration", "check"):
        raise ValueError(f"split must be 'calibration' or 'check', not {split!r}")
    return pieces(path)[0 if split == "calibration" else 1::2]


def bos_prefix(tokenizer: "PreTrainedTokenizerBase") -> list[int]:
    """The tokens the tokenizer puts before a text (BOS; BERT's [CLS]); what it appends (EOS) is left out."""
    plain = tokenizer("a", add_special_tokens=False).input_ids
    full = tokenizer("a", add_special_tokens=True).input_ids
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return full[:k]
    return full[:1] if full and full[0] == tokenizer.bos_token_id else []


def mixed_files(rng: random.Random) -> list[Path]:
    """Every corpus file, kinds (the name up to the first '-': prose, code, numbers) taking turns."""
    kinds: dict[str, list[Path]] = {}
    for path in corpus_files():
        kinds.setdefault(path.name.split("-")[0], []).append(path)
    for files in kinds.values():
        rng.shuffle(files)
    return [p for turn in itertools.zip_longest(*kinds.values()) for p in turn if p is not None]


def token_stream(tokenizer: "PreTrainedTokenizerBase", texts: list[str]) -> Iterator[int]:
    for text in texts:  # a piece is tokenised only when the stream reaches it
        yield from tokenizer(text, add_special_tokens=False, verbose=False).input_ids


def text_token_sequences(tokenizer: "PreTrainedTokenizerBase", seq_len: int, n_tokens: int,
                         split: Split, seed: int = 0) -> list[list[int]]:
    """Sequences of at most seq_len tokens (BOS first where the tokenizer adds one, no EOS),
    about n_tokens in all (at least n_tokens while the split lasts), one sequence per file in
    turn so that every kind of text is drawn early; below MIN_SEQUENCES * seq_len tokens the
    sequences are shortened to make MIN_SEQUENCES of them. A file's pieces of the split are
    read one after another, so a sequence may span two of them. Deterministic for a seed."""
    prefix = bos_prefix(tokenizer)
    if seq_len <= len(prefix):
        raise ValueError(f"seq_len {seq_len} leaves no room for text after {len(prefix)} BOS token(s)")
    n_tokens = max(n_tokens, 1)
    length = seq_len if n_tokens >= MIN_SEQUENCES * seq_len else max(-(-n_tokens // MIN_SEQUENCES), len(prefix) + 1)
    rng = random.Random(seed)
    streams = []
    for path in mixed_files(rng):
        texts = split_pieces(path, split)
        start = rng.randrange(len(texts)) if texts else 0  # each file is read from a seeded piece on, wrapping
        streams.append(token_stream(tokenizer, texts[start:] + texts[:start]))
    sequences, total = [], 0
    while streams and total < n_tokens:
        for stream in list(streams):
            ids = list(itertools.islice(stream, length - len(prefix)))
            if not ids:
                streams.remove(stream)
                continue
            sequences.append(prefix + ids)
            total += len(sequences[-1])
            if total >= n_tokens:
                break
    return sequences


def describe() -> dict:
    """The corpus's identity, to record with what was calibrated on it."""
    digest, size, files = hashlib.sha256(), 0, corpus_files()
    for path in files:
        data = path.read_bytes()
        digest.update(path.name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
        size += len(data)
    return {"sha256": digest.hexdigest(), "files": len(files), "bytes": size, "piece_chars": PIECE_CHARS}
