"""A genuine CLIP byte-level BPE tokenizer with a small vocabulary built offline.

Real CLIP vocabularies are downloaded with checkpoints; tiny test pipelines and the toy worlds
instead get a vocabulary made here: every byte symbol (alone and word-final), the two special
tokens, plus merges that turn each word of ``words`` into a single token. Any text
still tokenizes (unknown words fall back to bytes), through the standard ``CLIPTokenizer`` class,
so pipelines save and reload it with ``save_pretrained``/``from_pretrained`` like a real one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from transformers import CLIPTokenizer


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE uses for raw bytes (GPT-2/CLIP scheme)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    by_byte = dict(zip(printable, codes, strict=True))
    return [chr(by_byte[b]) for b in range(256)]


def build_clip_tokenizer(
    words: Iterable[str] = (),
    model_max_length: int = 77,
    merges_from: Literal["pieces", "letters"] = "pieces",
) -> CLIPTokenizer:
    """Each word of ``words`` (ASCII letters, 2+ characters) becomes one token.

    Each word is first split by the merges made so far, then its pieces are merged left to right
    with new, higher-ranked merges (as in :func:`build_roberta_tokenizer`). Merging every word from
    its letters instead breaks words whose letters an earlier word already merged differently: BPE
    applies the lowest-ranked merge first, so with "right" before it, "triangle" stopped at
    ``t ri an g l e</w>`` (6 tokens), which pushed ShapesWorld-video captions past 16 tokens.
    ``merges_from="letters"`` is that old construction, kept only to rebuild the vocabulary of
    models and checkpoints made with it (the shipped toy models save their own tokenizer files)."""
    symbols = byte_symbols()
    vocab: list[str] = symbols + [s + "</w>" for s in symbols]
    rank: dict[tuple[str, str], int] = {}
    known = set(vocab)
    for word in sorted({w.lower() for w in words}):
        if not word.isascii() or not word.isalpha() or len(word) < 2:
            continue
        _add_word(list(word[:-1]) + [word[-1] + "</w>"], rank, vocab, known, merges_from == "pieces")
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # endoftext last: CLIP pools at argmax(input_ids)
    merges = sorted(rank, key=rank.get)
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=model_max_length
    )


def _add_word(
    letters: list[str],
    rank: dict[tuple[str, str], int],
    vocab: list[str],
    known: set[str],
    existing_first: bool = True,
) -> None:
    """New merges (and tokens) that make ``letters`` one token: split by the merges made so far
    (``existing_first``), then its first two pieces merged with a new, higher-ranked merge, repeatedly."""
    parts = _bpe_pieces(letters, rank) if existing_first else list(letters)
    while len(parts) > 1:
        pair = (parts[0], parts[1])
        if pair not in rank:
            rank[pair] = len(rank)
        if pair[0] + pair[1] not in known:
            vocab.append(pair[0] + pair[1])
            known.add(pair[0] + pair[1])
        parts = [pair[0] + pair[1]] + parts[2:]
        if existing_first:
            parts = _bpe_pieces(parts, rank)


def _bpe_pieces(pieces: list[str], rank: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges (lowest rank first, leftmost first) to a list of symbols."""
    pieces = list(pieces)
    while len(pieces) > 1:
        pairs = [(rank.get((a, b), len(rank)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        best, i = min(pairs)
        if best == len(rank):
            break
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def build_roberta_tokenizer(words: Iterable[str] = (), model_max_length: int = 512):
    """A genuine RoBERTa byte-level BPE tokenizer (``RobertaTokenizer``) with a small vocabulary.

    Layout as in ``roberta-base``: ``<s>=0, <pad>=1, </s>=2, <unk>=3`` first (CLAP and AudioLDM's
    ``ClapTextModelWithProjection`` configs assume those ids), then the 256 byte symbols, then one
    token per merge, ``<mask>`` last. RoBERTa marks a preceding space with the ``Ġ`` byte symbol and
    has no end-of-word suffix, so each word of ``words`` becomes one token in both forms: bare (first
    word of a text) and ``Ġ``-prefixed (every later word). Each word is first split by the merges
    made so far, then its pieces are merged left to right with new, higher-ranked merges, so words
    that share prefixes or suffixes ("a", "an", "cat", "at") do not break one another. Any other
    text falls back to byte tokens.
    """
    from transformers import RobertaTokenizer

    symbols = byte_symbols()
    space = symbols[ord(" ")]  # "Ġ"
    vocab: list[str] = ["<s>", "<pad>", "</s>", "<unk>"] + symbols
    rank: dict[tuple[str, str], int] = {}
    known = set(vocab)
    for word in sorted({w.lower() for w in words}):
        if not word.isascii() or not word.isalpha():
            continue
        for start in (list(word), [space] + list(word)):
            _add_word(start, rank, vocab, known)
    vocab.append("<mask>")
    merges = sorted(rank, key=rank.get)
    return RobertaTokenizer(
        vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=model_max_length
    )


def build_t5_tokenizer(words: Iterable[str] = (), model_max_length: int = 512):
    """A genuine T5 SentencePiece-Unigram tokenizer (``T5Tokenizer``) with a small vocabulary, for the
    tiny FLUX (T5-XXL) and Wan (UMT5-XXL) pipelines.

    Layout as in ``t5-base``: ``<pad>=0, </s>=1, <unk>=2``, then one ``▁word`` piece per word of
    ``words`` (score -1), the bare ASCII letters and digits (score -5, so unknown words still
    tokenize, letter by letter) and ``▁`` alone; no ``<extra_id_*>`` sentinels."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -1.0) for w in sorted({w.lower() for w in words})]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"] + [("▁", -3.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


QWEN_TEMPLATE_WORDS = (
    "system user assistant Describe the image by detailing color shape size texture quantity text "
    "spatial relationships of objects and background"
).split()
"""The words of Qwen-Image's prompt template (``pipeline_qwenimage.py``): one token each, so the
template's system part is exactly the 34 tokens the pipeline drops, as with the real tokenizer."""


def build_qwen2_tokenizer(words: Iterable[str] = ()):
    """A genuine Qwen2 byte-level BPE tokenizer (``Qwen2Tokenizer``) with a small vocabulary, for the
    tiny Qwen-Image pipeline: the 256 byte symbols, one token per word of ``words`` and of the
    pipeline's prompt template (bare and ``Ġ``-prefixed, case kept), then the chat special tokens
    ``<|endoftext|>``, ``<|im_start|>`` and ``<|im_end|>``."""
    from transformers import AddedToken, Qwen2Tokenizer

    symbols = byte_symbols()
    space = symbols[ord(" ")]  # "Ġ"
    vocab: list[str] = list(symbols)
    rank: dict[tuple[str, str], int] = {}
    known = set(vocab)
    for word in sorted({w.lower() for w in words} | set(QWEN_TEMPLATE_WORDS)):
        if word.isascii() and word.isalpha() and len(word) > 1:
            for start in (list(word), [space] + list(word)):
                _add_word(start, rank, vocab, known)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Qwen2Tokenizer(
        vocab={t: i for i, t in enumerate(vocab + specials)},
        merges=sorted(rank, key=rank.get),
        model_max_length=32768,
    )
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(s, special=True) for s in specials[1:]]})
    return tok
