"""Prompt tokenisation for the rewards, each the way its reference package does it, and a warning
(once per reward instance) when prompts are longer than the text encoder's context.

Per reference package:

- **OpenCLIP** (HPSv2, whose package bundles a fork of open_clip, and OpenCLIP-folder checkpoints):
  ``tokenize`` cleans every prompt before BPE (``open_clip/tokenizer.py`` and
  ``hpsv2/src/open_clip/tokenizer.py``: ``basic_clean`` = ``ftfy.fix_text``, ``html.unescape`` twice,
  strip; ``whitespace_clean`` = whitespace runs to one space, strip; then ``.lower()``). Then
  ``[sot] + bpe + [eot]``, cut to the context with ``[eot]`` kept last; that is what the HF tokenizer
  does with ``truncation=True`` on the cleaned text. ftfy (repairs mojibake, straightens curly quotes,
  unfolds ligatures and full-width forms, NFC) cannot be restated exactly, so it is a dependency: the
  reward refuses to load without it rather than tokenise differently.
- **HF CLIP** (PickScore, CLIP score, aesthetic, video CLIP; their recipes call ``CLIPProcessor``,
  whose default tokenizer is ``CLIPTokenizerFast``): normaliser NFC, whitespace runs to one space,
  lowercase; no ftfy and no HTML unescaping. Loaded as ``CLIPTokenizerFast`` explicitly: under
  transformers 4.x ``CLIPTokenizer`` is the slow Python tokenizer, whose output depends on whether
  ftfy is installed (ftfy's fix, else BERT's ``BasicTokenizer``).
- **ImageReward**: BLIP's ``bert-base-uncased`` WordPiece tokenizer, ``max_length=35``, no cleaning.
"""

from __future__ import annotations

import html
import warnings
from collections.abc import Callable, Sequence

from diffalign.errors import ConfigError


def require_ftfy(who: str) -> None:
    """One-line error when ftfy (a declared dependency, needed by open_clip's cleaning) is missing."""
    try:
        import ftfy  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"{who}: open_clip's prompt cleaning needs the ftfy package (a dependency of diffalign); "
            "pip install ftfy"
        ) from None


def open_clip_clean(text: str) -> str:
    """open_clip's ``whitespace_clean(basic_clean(text)).lower()``, applied before BPE."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class PromptTokenizer:
    """Tokenises prompts for one reward and warns once when some are cut to ``max_length``.

    ``tokenizer`` is a transformers tokenizer (the model's vocabulary); ``clean`` maps each prompt
    before it (open_clip's cleaning, or ``None``); ``padding`` is ``"longest"`` or ``"max_length"``.
    """

    def __init__(
        self,
        tokenizer,
        max_length: int,
        name: str,
        clean: Callable[[str], str] | None = None,
        padding: str = "longest",
    ) -> None:
        self.tokenizer, self.max_length, self.name = tokenizer, int(max_length), name
        self.clean, self.padding = clean, padding
        self.warned = False

    def prepare(self, prompts: Sequence[str]) -> list[str]:
        return [self.clean(p) for p in prompts] if self.clean is not None else list(prompts)

    def lengths(self, prompts: Sequence[str]) -> list[int]:
        """Token counts with the special tokens, before truncation."""
        ids = self.tokenizer(self.prepare(prompts), add_special_tokens=True, truncation=False, verbose=False)
        return [len(x) for x in ids["input_ids"]]

    def check(self, prompts: Sequence[str]) -> int:
        """How many prompts exceed ``max_length`` tokens; the first time any do, one ``UserWarning``."""
        if self.warned:
            return 0
        n = sum(length > self.max_length for length in self.lengths(prompts))
        if n:
            self.warned = True
            warnings.warn(
                f"{self.name}: {n} of {len(prompts)} prompts were longer than {self.max_length} tokens "
                f"and were truncated (the text encoder's context); shown once per reward",
                UserWarning,
                stacklevel=4,  # the caller of reward(...), past torch.inference_mode's wrapper
            )
        return n

    def __call__(self, prompts: Sequence[str]):
        """``BatchEncoding`` with ``input_ids`` / ``attention_mask`` ``[B, L]`` (L <= max_length)."""
        return self.tokenizer(
            self.prepare(prompts),
            padding=self.padding,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
