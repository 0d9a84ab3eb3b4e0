"""ToneWorld-audio: determinism, captions, held-out split, and the judge's accuracy and robustness."""

from __future__ import annotations

import re

import numpy as np
import pytest

from diffalign.benchmarks.toyworlds.tones import (
    HELDOUT_COUNTS,
    HELDOUT_ORDERS,
    HELDOUT_SILENCE,
    HELDOUT_TAGS,
    KINDS,
    N_SAMPLES,
    SILENCE_AFTER,
    SR,
    TAGS,
    Event,
    build_metadata,
    detect_events,
    heldout_combinations,
    judge_audio,
    make_dataset,
    perturb_metadata,
    plan_events,
    prompts,
    render_events,
    sample_metadata,
    synthesize,
)

N_PER_TAG = 200  # ground-truth clips per tag and split for the accuracy checks
SPLITS = ("train", "heldout")

_NOUN = r"(?:a low beep|a high beep|a noise burst)"
TEMPLATES = {
    "single": _NOUN,
    "order": rf"{_NOUN} followed by {_NOUN}(?: followed by {_NOUN})?",
    "counting": rf"(?:two|three) (?:low|high) beeps(?: followed by {_NOUN})?",
    "silence": rf"{_NOUN}(?: followed by {_NOUN})? then silence",
}


def _smooth(wave: np.ndarray) -> np.ndarray:
    """3-tap moving average: a light low-pass, as a vocoder's smearing."""
    return np.convolve(wave, np.ones(3) / 3, mode="same").astype(np.float32)


@pytest.fixture(scope="module")
def judged():
    """Per (split, tag): rows (clean ok, noisy ok, smoothed ok, perturbed ok, reason)."""
    rng = np.random.default_rng(1234)
    out: dict[tuple[str, str], list[tuple[bool, bool, bool, bool, str]]] = {}
    for split in SPLITS:
        for tag in TAGS if split == "train" else HELDOUT_TAGS:
            rows = []
            for _ in range(N_PER_TAG):
                md = sample_metadata(tag, rng, split)
                wave = synthesize(md, rng, split)
                ok, reason = judge_audio(wave, md)
                noisy = np.clip(wave + rng.normal(0, 0.02, wave.shape), -1, 1)
                noisy_ok, _ = judge_audio(noisy, md)
                smooth_ok, _ = judge_audio(_smooth(wave), md)
                wrong_ok, _ = judge_audio(wave, perturb_metadata(md, rng))
                rows.append((ok, noisy_ok, smooth_ok, wrong_ok, reason))
            out[split, tag] = rows
    return out


_CASES = [(s, t) for s in SPLITS for t in (TAGS if s == "train" else HELDOUT_TAGS)]


@pytest.mark.parametrize(("split", "tag"), _CASES)
def test_judge_accepts_ground_truth_clips(judged, split, tag):
    rows = judged[split, tag]
    acc = np.mean([r[0] for r in rows])
    failures = [r[4] for r in rows if not r[0]][:3]
    assert acc >= 0.99, f"{split}/{tag}: accuracy {acc:.3f}, e.g. {failures}"


@pytest.mark.parametrize(("split", "tag"), _CASES)
def test_judge_tolerates_noise_and_smoothing(judged, split, tag):
    rows = judged[split, tag]
    noisy, smooth = np.mean([r[1] for r in rows]), np.mean([r[2] for r in rows])
    assert noisy >= 0.97, f"{split}/{tag}: {noisy:.3f} with white noise"
    assert smooth >= 0.97, f"{split}/{tag}: {smooth:.3f} after smoothing"


@pytest.mark.parametrize(("split", "tag"), _CASES)
def test_judge_rejects_perturbed_prompts(judged, split, tag):
    rejected = np.mean([not r[3] for r in judged[split, tag]])
    assert rejected >= 0.99, f"{split}/{tag}: only {rejected:.3f} of perturbed prompts rejected"


def test_make_dataset_is_deterministic():
    first = list(make_dataset(12, seed=7))
    again = list(make_dataset(12, seed=7))
    other = list(make_dataset(12, seed=8))
    assert all(a[0].tobytes() == b[0].tobytes() and a[1:] == b[1:] for a, b in zip(first, again))
    assert any(a[0].tobytes() != b[0].tobytes() for a, b in zip(first, other))
    assert [m["tag"] for _, _, m in first[:4]] == list(TAGS)  # round-robin, balanced
    short = list(make_dataset(5, seed=7))
    assert short[4][0].tobytes() == first[4][0].tobytes()  # item i does not depend on n
    held = list(make_dataset(6, seed=7, split="heldout"))
    assert [m["tag"] for _, _, m in held[:3]] == list(HELDOUT_TAGS)
    assert all(heldout_combinations(m) for _, _, m in held)


def test_clip_format():
    for wave, caption, md in make_dataset(8, seed=0):
        assert wave.shape == (N_SAMPLES,) and wave.dtype == np.float32
        assert np.abs(wave).max() <= 1.0
        assert caption == md["prompt"]
        edge = round(0.03 * SR)
        assert np.abs(wave[:edge]).max() < 0.01 and np.abs(wave[-edge:]).max() < 0.01  # quiet edges


def test_captions_and_metadata():
    for split in SPLITS:
        for md in prompts(split, 200, seed=3):
            assert re.fullmatch(TEMPLATES[md["tag"]], md["prompt"]), md["prompt"]
            assert set(md["events"]) <= set(KINDS)
            assert ("silence_after" in md) == (md["tag"] == "silence")
    assert build_metadata("order", ("high", "noise")) == {
        "tag": "order",
        "prompt": "a high beep followed by a noise burst",
        "events": ["high", "noise"],
    }
    assert build_metadata("counting", ("low", 3))["events"] == ["low"] * 3
    assert build_metadata("counting", ("high", 2))["prompt"] == "two high beeps"
    assert build_metadata("counting", ("high", 3, "noise")) == {
        "tag": "counting",
        "prompt": "three high beeps followed by a noise burst",
        "events": ["high", "high", "high", "noise"],
    }
    assert build_metadata("order", ("low", "noise", "low"))["prompt"] == (
        "a low beep followed by a noise burst followed by a low beep"
    )
    assert (
        build_metadata("silence", ("low", "high"))["prompt"]
        == "a low beep followed by a high beep then silence"
    )
    for tag, bad in (
        ("order", ("low", "low")),
        ("order", ("low",)),
        ("silence", ("low", "high", "low")),
        ("counting", ("high", 2, "high")),
        ("counting", ("noise", 2)),
        ("single", ("hum",)),
    ):
        with pytest.raises(ValueError):
            build_metadata(tag, bad)
    assert build_metadata("silence", ("noise",)) == {
        "tag": "silence",
        "prompt": "a noise burst then silence",
        "events": ["noise"],
        "silence_after": SILENCE_AFTER,
    }


def test_prompts_are_balanced():
    tags = [md["tag"] for md in prompts("train", 400, seed=1)]
    assert {t: tags.count(t) for t in TAGS} == dict.fromkeys(TAGS, 100)
    tags = [md["tag"] for md in prompts("heldout", 300, seed=1)]
    assert {t: tags.count(t) for t in HELDOUT_TAGS} == dict.fromkeys(HELDOUT_TAGS, 100)


def test_heldout_split():
    train = prompts("train", 2000, seed=0)
    assert not any(heldout_combinations(md) for md in train)
    seen = {(md["tag"], tuple(md["events"])) for md in train}
    assert not seen & {("order", s) for s in HELDOUT_ORDERS}
    assert ("counting", ("high",) * 3) not in seen and ("counting", ("low",) * 3) in seen
    assert not seen & {("silence", s) for s in HELDOUT_SILENCE}
    assert len(seen) == 3 + 14 + 11 + 7  # every train prompt of every tag is drawn
    heldout = prompts("heldout", 600, seed=0)
    assert all(heldout_combinations(md) for md in heldout)
    assert {c[0] for md in heldout for c in heldout_combinations(md)} == {"order", "count", "silence"}
    # Every part of a held-out prompt is seen in training: each adjacent pair of a held-out order
    # inside a train order, the held-out count with a tail, the final noise burst before silence.
    train_pairs = {p for tag, ev in seen if tag == "order" for p in zip(ev, ev[1:])}
    assert all(set(zip(s, s[1:])) <= train_pairs for s in HELDOUT_ORDERS)
    assert {("counting", ("high",) * n + (k,)) for n, _ in HELDOUT_COUNTS for k in ("low", "noise")} <= seen
    assert ("silence", ("low", "noise")) in seen
    # No train clip shows a held-out "... then silence" sequence, named or not.
    rng = np.random.default_rng(5)
    for params in HELDOUT_SILENCE:
        md = build_metadata("single" if len(params) == 1 else "order", params)
        for _ in range(100):
            assert plan_events(md, rng, "train")[-1].end > SILENCE_AFTER
    with pytest.raises(ValueError):
        sample_metadata("single", rng, "heldout")


def test_perturb_metadata():
    rng = np.random.default_rng(0)
    for md in prompts("train", 200, seed=2):
        bad = perturb_metadata(md, rng, split="train")
        assert bad["tag"] == md["tag"] and bad["events"] != md["events"]
        assert not heldout_combinations(bad)
    edits = {
        tuple(perturb_metadata(build_metadata("order", ("high", "noise")), rng)["events"]) for _ in range(200)
    }
    assert ("noise", "high") in edits and ("high", "noise", "low") in edits  # swapped, one event added
    assert all(len(e) in (2, 3) and e != ("high", "noise") for e in edits)
    counts = {
        tuple(perturb_metadata(build_metadata("counting", ("high", 3)), rng)["events"]) for _ in range(100)
    }
    assert counts == {("low",) * 3, ("high",) * 2, ("high",) * 3 + ("low",), ("high",) * 3 + ("noise",)}


def test_silence_needs_the_event_early():
    rng = np.random.default_rng(4)
    for kind in KINDS:
        md = build_metadata("silence", (kind,))
        assert judge_audio(synthesize(md, rng), md)[0]
        late = render_events([Event(kind, 0.55, 0.68, 400.0 if kind == "low" else 1600.0)], rng)
        ok, reason = judge_audio(late, md)
        assert not ok and "ends at" in reason
        assert judge_audio(late, build_metadata("single", (kind,)))[0]
    two = build_metadata("silence", ("high", "low"))
    for _ in range(200):  # two events always fit before the silence (shortened when needed)
        evs = plan_events(two, rng)
        assert evs[-1].end <= SILENCE_AFTER - 0.05 + 1e-9 and evs[1].start - evs[0].end >= 0.08 - 1e-9


def test_silent_clips_have_no_events():
    rng = np.random.default_rng(0)
    assert detect_events(np.zeros(N_SAMPLES, dtype=np.float32)) == []
    assert detect_events(render_events([], rng)) == []
    ok, reason = judge_audio(render_events([], rng), build_metadata("single", ("low",)))
    assert not ok and reason.startswith("found []")


def test_detect_events_reports_kinds_times_and_frequencies():
    rng = np.random.default_rng(1)
    truth = [Event("low", 0.1, 0.23, 410.0), Event("noise", 0.4, 0.52), Event("high", 0.7, 0.81, 1550.0)]
    found = detect_events(render_events(truth, rng))
    assert [e.kind for e in found] == ["low", "noise", "high"]
    for t, f in zip(truth, found):
        assert abs(f.start - t.start) < 0.02 and abs(f.end - t.end) < 0.02
    assert abs(found[0].freq - 410) < 10 and abs(found[2].freq - 1550) < 20 and np.isnan(found[1].freq)


@pytest.mark.parametrize("kind", ["low", "high"])
def test_noisy_tone_is_still_a_tone(kind):
    """A beep with broadband noise 25 dB below it (by RMS) is a beep, not a noise burst."""
    rng = np.random.default_rng(2)
    freq = 400.0 if kind == "low" else 1600.0
    wave = render_events([Event(kind, 0.2, 0.32, freq)], rng).astype(np.float64)
    tone_rms = np.sqrt(np.mean(wave[round(0.21 * SR) : round(0.31 * SR)] ** 2))
    wave[round(0.2 * SR) : round(0.32 * SR)] += rng.normal(0, tone_rms * 10 ** (-25 / 20), round(0.12 * SR))
    assert [e.kind for e in detect_events(wave)] == [kind]


def test_smeared_onsets_and_dropouts_do_not_split_events():
    rng = np.random.default_rng(3)
    truth = [Event("high", 0.1, 0.25, 1600.0), Event("low", 0.4, 0.55, 400.0)]
    wave = render_events(truth, rng).astype(np.float64)
    wave[round(0.17 * SR) : round(0.18 * SR)] *= 0.05  # 10 ms dropout inside the first beep
    # Smear with a short reverb: direct sound plus a 30 ms noise tail decaying by 60 dB.
    n = round(0.03 * SR)
    ir = rng.normal(0, 1, n) * 10 ** (-3 * np.arange(n) / n)
    ir *= 0.5 / np.sqrt(np.sum(ir**2))  # tail 6 dB below the direct sound
    ir[0] = 1.0
    wave = np.convolve(wave, ir, mode="full")[:N_SAMPLES]
    assert [e.kind for e in detect_events(wave)] == ["high", "low"]
