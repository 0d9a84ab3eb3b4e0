"""Prompt tokenisation per reward matches its reference package (issue #25, items 1 and 2).

- HPSv2 and OpenCLIP-folder rewards clean prompts as open_clip's ``tokenize`` does; the expected ids
  come from open_clip's ``basic_clean`` / ``whitespace_clean`` restated here (not diffalign's helper).
- PickScore / CLIP score / video CLIP use ``CLIPTokenizerFast`` as ``CLIPProcessor`` does (no
  cleaning); ImageReward uses BLIP's BERT tokenizer unchanged.
- Prompts longer than the text encoder's context warn once per reward instance, with the count.
"""

from __future__ import annotations

import html
import re
import sys
import warnings

import pytest
import test_image_reward as _ir
import torch
from test_rewards import LONG, build_tiny_open_clip, images, quantised

from diffalign.errors import ConfigError

try:
    import ftfy  # the reference's own dependency (open_clip's basic_clean), declared by diffalign too
except ImportError:  # an incomplete install: the cleaning tests fail with this message, the rest run
    ftfy = None

# curly quotes, HTML entities (single and double escaped), doubled spaces, tabs/newlines, mixed case,
# mojibake (UTF-8 read as cp1252), a ligature and full-width letters
MESSY = [
    "A \u201ccurly\u201d photo of a RED  circle",
    "fish &amp; chips on a blue square",
    "&quot;two&quot;   yellow\tcircles\n",
    "caf\u00c3\u00a9 with a Green Triangle",
    "&amp;amp; \ufb01ne \uff32\uff45\uff44 square",
    "  plain red circle  ",
]
CLEAN_EQUIVALENT = {  # what open_clip's cleaning turns each messy prompt into, written out by hand
    MESSY[0]: 'a "curly" photo of a red circle',
    MESSY[1]: "fish & chips on a blue square",
    MESSY[2]: '"two" yellow circles',
    MESSY[3]: "caf\u00e9 with a green triangle",
    MESSY[4]: "& fine red square",
    MESSY[5]: "plain red circle",
}


def open_clip_cleaning(text: str) -> str:
    """open_clip / hpsv2 ``tokenizer.py``: ``whitespace_clean(basic_clean(text)).lower()``."""
    assert ftfy is not None, "ftfy is a dependency of diffalign: pip install ftfy"
    text = ftfy.fix_text(text)  # basic_clean
    text = html.unescape(html.unescape(text))
    text = text.strip()
    text = re.sub(r"\s+", " ", text)  # whitespace_clean (the hpsv2 fork's form)
    text = text.strip()
    return text.lower()


def open_clip_ids(tok, prompts: list[str], context: int = 77) -> list[list[int]]:
    """open_clip ``tokenize``: [sot] + bpe(clean(p)) + [eot], cut to the context with eot last."""
    out = []
    for p in prompts:
        ids = [tok.bos_token_id] + tok.encode(open_clip_cleaning(p), add_special_tokens=False)
        ids = ids[: context - 1] + [tok.eos_token_id]
        out.append(ids)
    return out


def unpadded(enc) -> list[list[int]]:
    return [ids[m.bool()].tolist() for ids, m in zip(enc.input_ids, enc.attention_mask)]


@pytest.fixture(scope="module")
def hps_dir(tmp_path_factory):
    return build_tiny_open_clip(tmp_path_factory.mktemp("hps_text") / "hps")


# ----------------------------------------------------------------------------- item 1: cleaning


def test_restated_cleaning_gives_the_hand_written_results():
    """The restatement in this file is itself right (so the parity tests below mean something)."""
    for messy, clean in CLEAN_EQUIVALENT.items():
        assert open_clip_cleaning(messy) == clean


def test_hpsv2_token_ids_follow_open_clip_cleaning(hps_dir):
    from transformers import CLIPTokenizerFast

    from diffalign.rewards import HPSv2

    tok = CLIPTokenizerFast.from_pretrained(str(hps_dir))
    reward = HPSv2(str(hps_dir))
    prompts = MESSY + [LONG + " &amp; more"]
    assert unpadded(reward.prompts(prompts)) == open_clip_ids(tok, prompts)
    # and they differ from tokenising the raw text, so cleaning is actually exercised
    # (the last prompt only has outer spaces, which the raw tokenizer drops as well)
    raw = [
        [tok.bos_token_id] + tok.encode(p, add_special_tokens=False) + [tok.eos_token_id] for p in MESSY[:-1]
    ]
    assert all(a != b for a, b in zip(unpadded(reward.prompts(MESSY[:-1])), raw))


def test_hpsv2_scores_do_not_see_entities_quotes_or_spacing(hps_dir):
    from diffalign.rewards import HPSv2

    reward = HPSv2(str(hps_dir), scale="cosine")
    imgs = quantised(images(len(MESSY), 40, 56, seed=3))
    messy = reward(imgs, MESSY).scores
    clean = reward(imgs, [CLEAN_EQUIVALENT[p] for p in MESSY]).scores
    torch.testing.assert_close(messy, clean, atol=1e-6, rtol=0)


def test_open_clip_folder_reward_cleans_too(tmp_path, hps_dir):
    """A CLIPScore on an OpenCLIP hub-layout folder follows open_clip's tokenize, not CLIPProcessor."""
    import shutil

    from safetensors.torch import save_file
    from transformers import CLIPTokenizerFast

    from diffalign.rewards import CLIPScore

    d = tmp_path / "oc"
    shutil.copytree(hps_dir, d)
    sd = torch.load(d / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "open_clip_model.safetensors"))
    (d / "HPS_v2.1_compressed.pt").unlink()
    reward = CLIPScore(str(d))
    tok = CLIPTokenizerFast.from_pretrained(str(d))
    assert unpadded(reward.prompts(MESSY)) == open_clip_ids(tok, MESSY)


@pytest.mark.parametrize("name", ["pickscore", "clip_score"])
def test_hf_clip_rewards_tokenise_like_clip_processor(tiny_clip, name):
    """CLIPProcessor's default tokenizer is CLIPTokenizerFast: NFC, whitespace runs, lowercase, and
    no HTML unescaping -- whatever transformers major version or ftfy installation."""
    from transformers import CLIPTokenizerFast

    from diffalign.rewards import REWARDS

    reward = REWARDS.get(name)(str(tiny_clip))
    assert reward.tokenizer.is_fast
    ref = CLIPTokenizerFast.from_pretrained(str(tiny_clip))(
        MESSY, padding=True, truncation=True, max_length=77, return_tensors="pt"
    )
    got = reward.prompts(MESSY)
    assert torch.equal(got.input_ids, ref.input_ids) and torch.equal(got.attention_mask, ref.attention_mask)
    amp = reward.prompts(["fish &amp; chips", "fish & chips"]).input_ids
    assert not torch.equal(amp[0], amp[1])  # as in the reference recipe, entities are not unescaped


def test_image_reward_tokenises_like_blip(tmp_path):
    from transformers import BertTokenizer

    from diffalign.rewards import ImageReward

    folder = _ir.write_folder(tmp_path / "ir", _ir.official_state_dict())
    reward = ImageReward(str(folder))
    ref = BertTokenizer.from_pretrained(str(folder))
    ref.add_special_tokens({"bos_token": "[DEC]"})
    ref.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    want = ref(MESSY, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    got = reward.prompts(MESSY)
    assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.attention_mask, want.attention_mask)


def test_missing_ftfy_is_one_clear_error(hps_dir, monkeypatch):
    from diffalign.rewards import HPSv2

    monkeypatch.setitem(sys.modules, "ftfy", None)  # import ftfy -> ImportError
    with pytest.raises(ConfigError, match="hpsv2: .*needs the ftfy package.*pip install ftfy"):
        HPSv2(str(hps_dir))


# ----------------------------------------------------------------------------- item 2: truncation warning


def caught(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fn()
    return [str(x.message) for x in w if "were truncated" in str(x.message)]


LONG2 = "a photo of " + " and ".join(["two yellow circles"] * 30)


@pytest.mark.parametrize("name", ["pickscore", "clip_score", "step_aware"])
def test_clip_rewards_warn_once_with_the_count(tiny_clip, name):
    from diffalign.rewards import REWARDS

    reward = REWARDS.get(name)(str(tiny_clip), batch_size=1)  # the count covers the call, not a chunk
    imgs = images(4, 32, 32)
    first = caught(lambda: reward(imgs, ["a red circle", LONG, LONG2, "a blue square"]))
    assert first == [f"{name}: 2 of 4 prompts were longer than 77 tokens and were truncated"
                     " (the text encoder's context); shown once per reward"]  # fmt: skip
    assert caught(lambda: reward(imgs, [LONG] * 4)) == []  # once per instance
    fresh = REWARDS.get(name)(str(tiny_clip))
    assert caught(lambda: fresh(imgs, ["a red circle", "a blue square", "two yellow circles", "x"])) == []


def test_hpsv2_counts_after_cleaning(hps_dir):
    from diffalign.rewards import HPSv2

    reward = HPSv2(str(hps_dir))
    imgs = images(3, 28, 28)
    msgs = caught(lambda: reward(imgs, [LONG, "a red circle", "&amp; " * 3]))
    assert len(msgs) == 1 and msgs[0].startswith("hpsv2: 1 of 3 prompts were longer than 77 tokens")


def test_image_reward_warns_at_35_tokens(tmp_path):
    from diffalign.rewards import ImageReward

    folder = _ir.write_folder(tmp_path / "ir", _ir.official_state_dict())
    reward = ImageReward(str(folder), batch_size=2)
    imgs = images(3, 40, 40)
    exactly_35 = " ".join(["red"] * 33)  # [CLS] + 33 + [SEP] = 35: fits
    assert caught(lambda: reward(imgs, [exactly_35, "a red circle", "two dogs"])) == []
    msgs = caught(lambda: reward(imgs, [exactly_35 + " dog", "a red circle", "a dog in a field " * 9]))
    assert msgs == [
        "image_reward: 2 of 3 prompts were longer than 35 tokens and were truncated (the text "
        "encoder's context); shown once per reward"
    ]
    assert caught(lambda: reward(imgs, ["a dog in a field " * 9] * 3)) == []


def test_aesthetic_ignores_prompts_so_never_warns(tiny_clip, tmp_path):
    import json

    from test_rewards import build_tiny_aesthetic_head

    from diffalign.rewards import AestheticV2

    dim = json.loads((tiny_clip / "config.json").read_text())["projection_dim"]
    reward = AestheticV2(str(tiny_clip), head=str(build_tiny_aesthetic_head(tmp_path / "h.pth", dim)))
    assert caught(lambda: reward(images(2, 32, 32), [LONG, LONG2])) == []


def test_video_clip_warns_once(tiny_clip):
    from diffalign.rewards import VideoCLIPScore

    reward = VideoCLIPScore(str(tiny_clip))
    v = torch.rand(2, 3, 3, 32, 32)
    assert caught(lambda: reward(v, ["a red circle", LONG]))[0].startswith(
        "video_clip: 1 of 2 prompts were longer than 77 tokens"
    )
    assert caught(lambda: reward(v, [LONG, LONG])) == []
