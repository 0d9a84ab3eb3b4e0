"""A genuine CLIP byte-level BPE tokenizer with a small vocabulary built offline.

Real CLIP vocabularies are downloaded with checkpoints; tiny test pipelines and the toy worlds
instead get a vocabulary made here: every byte symbol (alone and word-final), the two special
tokens, plus left-to-right merges that turn each word of ``words`` into a single token. Any text
still tokenizes (unknown words fall back to bytes), through the standard ``CLIPTokenizer`` class,
so pipelines save and reload it with ``save_pretrained``/``from_pretrained`` like a real one.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import CLIPTokenizer


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE uses for raw bytes (GPT-2/CLIP scheme)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    by_byte = dict(zip(printable, codes, strict=True))
    return [chr(by_byte[b]) for b in range(256)]


def build_clip_tokenizer(words: Iterable[str] = (), model_max_length: int = 77) -> CLIPTokenizer:
    symbols = _byte_symbols()
    vocab: list[str] = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    known = set(vocab)
    for word in sorted({w.lower() for w in words}):
        if not word.isascii() or not word.isalpha() or len(word) < 2:
            continue
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            a, b = parts[0], parts[1]
            merged = a + b
            if merged not in known:
                merges.append((a, b))
                vocab.append(merged)
                known.add(merged)
            parts = [merged] + parts[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # endoftext last: CLIP pools at argmax(input_ids)
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=model_max_length)
    return tok
