"""The declared dependency range holds what the rewards need (issue #25, item 3).

``transformers.initialization`` (image_reward's ``no_init_weights``) and tokenizers-backed CLIP/BERT
tokenizers built from an in-memory vocabulary first exist in transformers 5.0.0: the 5.0.0 wheel has
``transformers/initialization.py``, the last 4.x (4.57.6) has not, and 4.x's ``CLIPTokenizer`` needs
vocab/merges *files*. image_reward's tests pass on 5.0.0 (checked once in a private install, with
``do_lower_case=True`` stated: 5.0.0 did not lowercase a vocab.txt-only folder).
"""

from __future__ import annotations

import re
from pathlib import Path

from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
FIRST_TRANSFORMERS = Version("5.0.0")  # first release with what the rewards import (see the docstring)


def declared_floor(package: str) -> Version:
    """The ``>=`` bound of ``package`` in ``[project] dependencies`` (a quoted ``"name>=X..."`` line)."""
    text = PYPROJECT.read_text()
    deps = text[text.index("dependencies = [") : text.index("]", text.index("dependencies = ["))]
    m = re.search(rf'^\s*"{re.escape(package)}\s*>=\s*([0-9][0-9.]*)[^"]*",', deps, re.MULTILINE)
    assert m, f"pyproject.toml declares no lower bound for {package}"
    return Version(m.group(1))


def test_transformers_floor_covers_what_image_reward_imports():
    import transformers
    from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel
    from transformers.initialization import no_init_weights  # the symbol that 4.x lacks

    assert all(
        (BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel, no_init_weights)
    )
    floor = declared_floor("transformers")
    assert floor >= FIRST_TRANSFORMERS, (
        f"transformers>={floor} is declared but the rewards need {FIRST_TRANSFORMERS}"
    )
    assert Version(transformers.__version__) >= floor


def test_clip_tokenizer_from_in_memory_vocab_is_what_the_floor_provides():
    """``clip_tokenizer_from_bpe`` and the toy tokenizers build ``CLIPTokenizer(vocab=dict, merges=list)``."""
    from transformers import CLIPTokenizer

    sym = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {
        t: i for i, t in enumerate(sym + [s + "</w>" for s in sym] + ["<|startoftext|>", "<|endoftext|>"])
    }
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    assert tok.is_fast and tok("ab").input_ids == [
        vocab["<|startoftext|>"],
        0,
        vocab["b</w>"],
        vocab["<|endoftext|>"],
    ]


def test_ftfy_is_declared_for_open_clip_cleaning():
    assert declared_floor("ftfy") >= Version("6.3")
