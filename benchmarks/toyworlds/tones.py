"""ToneWorld-audio: a toy text-to-audio world of beeps and noise bursts, with an exact judge.

The audio counterpart of :mod:`.shapes`: clips are 1.024 s of near-silence at 8 kHz
holding a few short events of three kinds, a low beep (a 375 Hz sine), a high
beep (1500 Hz) and a noise burst (white noise band-limited to 300-3000 Hz).
Captions name the events in temporal order, so prompts test the things text-to-audio
models get wrong: the right sound (``single``), temporal order of two or three events
(``order``: "a low beep followed by a noise burst followed by a high beep"), counting,
alone or followed by another event (``counting``: "three low beeps followed by a noise
burst") and nothing after one or two sounds (``silence``). Every prompt carries a
metadata dict listing the events it asks for; :func:`judge_audio` decides a clip
exactly by detecting its events (:func:`detect_events`) and comparing the list.

The world is built so that the judge is trivial on true clips and still right on
degraded ones (a small neural vocoder's output is noisy and smeared): kinds are far
apart in frequency (2 octaves between the beeps, noise spread over 3.3 octaves),
events are at least 0.08 s apart and away from the clip edges, and silence is
really quiet (a background hiss of ~0.001 RMS, 40 dB below the quietest event).

Splits are compositional, as in ShapesWorld: ``"heldout"`` prompts are whole event
sequences no train prompt asks for (:data:`HELDOUT_ORDERS`, :data:`HELDOUT_COUNTS`,
:data:`HELDOUT_SILENCE`), built from parts that train prompts do show (every adjacent pair
of a held-out order occurs inside a train order, "three high beeps" occurs with a tail),
and no train clip shows one even where the prompt does not name it (a train clip made of a
single noise burst never ends before :data:`SILENCE_AFTER`, which would show "a noise burst
then silence"). ``single`` prompts are all train prompts, so the heldout split has only the
three other tags. (The first version held out pairs of events that no train prompt put next
to each other, with 12 train prompts in all; a tiny AudioLDM, which sees the caption only
through one pooled text embedding, drew such prompts as the nearest train caption and was
judged 0.06 on them after 192k clips, so alignment had nothing to improve on.)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Kind = Literal["low", "high", "noise"]
Pitch = Literal["low", "high"]
Tag = Literal["single", "order", "counting", "silence"]
Split = Literal["train", "heldout"]

SR = 8000  # Hz
N_SAMPLES = 8192  # 1.024 s clips (a power of two, convenient for audio models)
CLIP_S = N_SAMPLES / SR
KINDS: tuple[Kind, ...] = ("low", "high", "noise")
PITCHES: tuple[Pitch, ...] = ("low", "high")  # the kinds that are beeps (countable)
TAGS: tuple[Tag, ...] = ("single", "order", "counting", "silence")
COUNTS: tuple[int, ...] = (2, 3)
NUMBERS: dict[int, str] = {1: "one", 2: "two", 3: "three"}
NOUNS: dict[Kind, str] = {"low": "a low beep", "high": "a high beep", "noise": "a noise burst"}
ORDER_LENGTHS: tuple[int, ...] = (2, 3)  # events named by an ``order`` prompt
SILENCE_LENGTHS: tuple[int, ...] = (
    1,
    2,
)  # events before "then silence" (two short ones fit before SILENCE_AFTER)

# Synthesis (seconds, Hz, linear amplitude).
# Both pitches are whole multiples of the 125 Hz frame rate of the toy audio model's mel front end
# (8 kHz / hop 64): every 64-sample frame of a beep then holds a whole number of periods, which a
# tiny HiFi-GAN vocoder trained for minutes learns to render (at 400/1600 Hz with per-event jitter
# it rendered noise bursts but no beeps after 13k clips). No frequency jitter for the same reason.
TONE_HZ: dict[Pitch, float] = {"low": 375.0, "high": 1500.0}
FREQ_JITTER = 0.0  # relative, per event
NOISE_BAND_HZ = (300.0, 3000.0)
DURATION_S = (0.10, 0.16)  # beeps ("short") and noise bursts alike
FADE_S = 0.010  # raised-cosine fade in and out
AMPLITUDE = (0.35, 0.6)  # peak amplitude of an event
MIN_GAP_S = 0.08  # between consecutive events
EDGE_S = 0.03  # no event this close to the clip's start or end
BACKGROUND_RMS = 0.001  # faint white hiss under the whole clip (peaks ~0.003-0.004)
SILENCE_AFTER = 0.45  # "X then silence": every event ends before this time
# True "then silence" events end this much before SILENCE_AFTER, and train `single`
# noise bursts end this much after it, so that detected ends (smeared by up to half
# an analysis window, 16 ms) never land on the wrong side.
SILENCE_MARGIN_S = 0.05

# Held-out prompts (the definition of the "heldout" split): whole event sequences of a tag. Every
# part of one is seen in training (each adjacent pair of a held-out order inside a train order, the
# held-out count with a tail or in the other pitch, the held-out final noise burst after other
# events), so the split asks for new arrangements of familiar parts, not for unseen parts.
HELDOUT_ORDERS: frozenset[tuple[Kind, ...]] = frozenset(
    {("low", "high"), ("noise", "low"), ("high", "noise", "low"), ("low", "noise", "high")}
)
HELDOUT_COUNTS: frozenset[tuple[int, Pitch]] = frozenset({(3, "high")})  # (count, pitch) with no tail
HELDOUT_SILENCE: frozenset[tuple[Kind, ...]] = frozenset(
    {("noise",), ("high", "noise")}
)  # "... then silence"
HELDOUT_TAGS: tuple[Tag, ...] = tuple(t for t in TAGS if t != "single")

# Analysis (see detect_events).
N_FFT = 256  # 32 ms Hann window, 31.25 Hz bins
HOP = 64  # 8 ms
BAND_HZ = (200.0, 3400.0)  # every event's energy lies here; hiss and DC outside are ignored
# In-band frame RMS above which a frame is active. The quietest true event (a noise
# burst of peak 0.35, RMS ~0.09) sits ~8 dB above it, silence (~0.001) ~30 dB below,
# and white noise of RMS 0.02 added everywhere (a noisy vocoder; ~0.018 in band)
# ~6 dB below. Measured: true clips are judged right up to added noise of RMS 0.03
# or an overall gain of 0.3.
ENERGY_THRESHOLD = 0.035
MIN_EVENT_S = 0.03  # shorter active runs are clicks, not events
MERGE_GAP_S = 0.03  # shorter inactive runs inside an event are dropouts, not gaps
PEAK_HALF_WIDTH_HZ = 125.0  # a tone's power lies within this of its spectral peak...
TONE_CONCENTRATION = 0.5  # ...for at least this fraction of the in-band power
PITCH_BOUNDARY_HZ = 750.0  # geometric middle of 375 and 1500 Hz


@dataclass(frozen=True)
class Event:
    """One sound event: its kind, extent in seconds and dominant frequency (nan for noise)."""

    kind: Kind
    start: float
    end: float
    freq: float = math.nan

    @property
    def duration(self) -> float:
        return self.end - self.start


# --------------------------------------------------------------------------- prompts


def build_metadata(tag: Tag, params: tuple) -> dict[str, Any]:
    """Metadata for ``tag`` from its parameters (see :func:`metadata_params`).

    single: (kind,); order: 2 or 3 kinds in temporal order, neighbours different; counting:
    (pitch, n) or (pitch, n, tail), n beeps of one pitch then, with a tail, one event of another
    kind; silence: 1 or 2 kinds (neighbours different). ``events`` lists the asked-for kinds in
    temporal order (a counting prompt repeats its pitch n times).
    """
    if any(k not in KINDS for k in params if isinstance(k, str)):
        raise ValueError(f"unknown kind in {params}; valid kinds: {', '.join(KINDS)}")
    if tag == "single":
        (kind,) = params
        events, prompt = [kind], NOUNS[kind]
    elif tag in ("order", "silence"):
        lengths = ORDER_LENGTHS if tag == "order" else SILENCE_LENGTHS
        if len(params) not in lengths or any(a == b for a, b in zip(params, params[1:])):
            raise ValueError(
                f"{tag} prompts name {' or '.join(map(str, lengths))} kinds, "
                f"neighbours different; got {params}"
            )
        events, prompt = list(params), " followed by ".join(NOUNS[k] for k in params)
        if tag == "silence":
            prompt += " then silence"
    elif tag == "counting":
        pitch, n, *tail = params
        if pitch not in PITCHES or n not in COUNTS or len(tail) > 1 or pitch in tail:
            raise ValueError(
                f"counting prompts count {COUNTS} beeps of {PITCHES} (+ one event of another kind), "
                f"got {params}"
            )
        events, prompt = [pitch] * n + tail, f"{NUMBERS[n]} {pitch} beeps"
        if tail:
            prompt += f" followed by {NOUNS[tail[0]]}"
    else:
        raise ValueError(f"unknown tag {tag!r}; valid choices: {', '.join(TAGS)}")
    md: dict[str, Any] = {"tag": tag, "prompt": prompt, "events": list(events)}
    if tag == "silence":
        md["silence_after"] = SILENCE_AFTER
    return md


def metadata_params(metadata: Mapping[str, Any]) -> tuple:
    """Inverse of :func:`build_metadata`."""
    tag, events = metadata["tag"], tuple(metadata["events"])
    if tag in ("single", "order", "silence"):
        return events
    if tag == "counting":
        n = len(events) - (events[-1] != events[0])  # a tail is the one event of another kind
        return (events[0], n, *events[n:])
    raise ValueError(f"unknown tag {tag!r}")


def heldout_combinations(metadata: Mapping[str, Any]) -> list[tuple]:
    """Held-out prompts this one is, e.g. [("order", "low", "high")] (one at most)."""
    tag, params = metadata["tag"], metadata_params(metadata)
    if tag == "order" and params in HELDOUT_ORDERS:
        return [("order", *params)]
    if tag == "counting" and len(params) == 2 and (params[1], params[0]) in HELDOUT_COUNTS:
        return [("count", params[1], params[0])]
    if tag == "silence" and params in HELDOUT_SILENCE:
        return [("silence", *params)]
    return []


def _in_split(metadata: Mapping[str, Any], split: Split) -> bool:
    return bool(heldout_combinations(metadata)) == (split == "heldout")


def _sequences(lengths: Sequence[int]) -> list[tuple[Kind, ...]]:
    """Every kind sequence of the given lengths with different neighbours (in a fixed order)."""
    return [
        s
        for n in lengths
        for s in itertools.product(KINDS, repeat=n)
        if all(a != b for a, b in zip(s, s[1:]))
    ]


def _all_params(tag: Tag) -> list[tuple]:
    """Every parameter tuple of ``tag`` (the world is small enough to enumerate)."""
    if tag == "single":
        return _sequences((1,))
    if tag == "order":
        return _sequences(ORDER_LENGTHS)
    if tag == "silence":
        return _sequences(SILENCE_LENGTHS)
    if tag == "counting":
        return [
            (p, n, *tail) for p in PITCHES for n in COUNTS for tail in [(), *((k,) for k in KINDS if k != p)]
        ]
    raise ValueError(f"unknown tag {tag!r}")


def sample_metadata(tag: Tag, rng: np.random.Generator, split: Split = "train") -> dict[str, Any]:
    """Draw one prompt of ``tag`` belonging to ``split``, uniformly over that split's prompts."""
    if split not in _SPLIT_ID:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if split == "heldout" and tag not in HELDOUT_TAGS:
        raise ValueError(f"tag {tag!r} has no held-out prompts; use one of {HELDOUT_TAGS}")
    cands = [md for p in _all_params(tag) if _in_split(md := build_metadata(tag, p), split)]
    return cands[int(rng.integers(len(cands)))]


def _one_edit(p: tuple, q: tuple) -> bool:
    """``q`` is ``p`` with one element changed, two neighbours swapped, or one element added or removed."""
    if len(p) == len(q):
        diff = [i for i, (a, b) in enumerate(zip(p, q)) if a != b]
        return len(diff) == 1 or (
            len(diff) == 2
            and diff[1] == diff[0] + 1
            and p[diff[0]] == q[diff[1]]
            and p[diff[1]] == q[diff[0]]
        )
    short, long = sorted((p, q), key=len)
    return len(long) == len(short) + 1 and any(long[:i] + long[i + 1 :] == short for i in range(len(long)))


def _mismatches(tag: Tag, params: tuple) -> list[tuple]:
    """Same-tag parameters one edit away from ``params`` (their event lists differ from its)."""
    events = build_metadata(tag, params)["events"]
    return [
        q for q in _all_params(tag) if _one_edit(params, q) and build_metadata(tag, q)["events"] != events
    ]


def perturb_metadata(
    metadata: Mapping[str, Any], rng: np.random.Generator, split: Split | None = None
) -> dict[str, Any]:
    """A same-tag prompt that a clip synthesised for ``metadata`` does *not* satisfy.

    Changes one thing: swaps the order, changes one kind, the count or the pitch, or
    (silence) the kind. Every result asks for a different event list, so the judge
    tells it apart. With ``split`` given, the result also belongs to that split.
    Useful as hard negatives (e.g. for a toy CLAP reward).
    """
    tag = metadata["tag"]
    cands = [build_metadata(tag, p) for p in _mismatches(tag, metadata_params(metadata))]
    if split is not None:
        cands = [md for md in cands if _in_split(md, split)]
    if not cands:
        raise ValueError(f"no {split} perturbation of {metadata['prompt']!r}")
    return cands[int(rng.integers(len(cands)))]


# --------------------------------------------------------------------------- synthesis


def _place(durations: Sequence[float], lo: float, hi: float, rng: np.random.Generator) -> list[float]:
    """Random start times for consecutive events in [lo, hi], MIN_GAP_S apart.

    The free time is split into len + 1 pieces (before, between and after the
    events) at sorted uniform points, so every valid layout can come out.
    """
    slack = hi - lo - sum(durations) - MIN_GAP_S * (len(durations) - 1)
    if slack < -1e-9:  # (rounding when events were shrunk to fit exactly)
        raise ValueError(f"events of {sum(durations):.2f} s do not fit in [{lo:.2f}, {hi:.2f}] s")
    slack = max(slack, 0.0)
    cuts = np.sort(rng.uniform(0.0, slack, size=len(durations)))
    starts, t = [], lo
    for i, d in enumerate(durations):
        starts.append(t + float(cuts[i]))
        t += d + MIN_GAP_S
    return starts


def plan_events(metadata: Mapping[str, Any], rng: np.random.Generator, split: Split = "train") -> list[Event]:
    """Events (random durations, onsets and beep frequencies) that satisfy ``metadata``.

    ``silence`` events end at least SILENCE_MARGIN_S before ``silence_after`` (two of them are
    shortened to fit if needed). In the train split a clip whose events are a held-out "then
    silence" sequence (a single noise burst, a high beep followed by a noise burst) ends at least
    SILENCE_MARGIN_S after SILENCE_AFTER, otherwise it would show that held-out prompt; other
    events may lie anywhere.
    """
    kinds: list[Kind] = list(metadata["events"])
    durs = [float(rng.uniform(*DURATION_S)) for _ in kinds]
    gaps = MIN_GAP_S * (len(kinds) - 1)
    lo, hi = EDGE_S, CLIP_S - EDGE_S
    if metadata["tag"] == "silence":
        hi = metadata.get("silence_after", SILENCE_AFTER) - SILENCE_MARGIN_S
        if (total := sum(durs)) > hi - lo - gaps:
            durs = [d * (hi - lo - gaps) / total for d in durs]
    elif split == "train" and tuple(kinds) in HELDOUT_SILENCE:
        lo = max(
            lo, SILENCE_AFTER + SILENCE_MARGIN_S - sum(durs) - gaps
        )  # the last event then ends late enough
    events = []
    for kind, start, d in zip(kinds, _place(durs, lo, hi, rng), durs):
        freq = (
            TONE_HZ[kind] * float(1 + rng.uniform(-FREQ_JITTER, FREQ_JITTER)) if kind != "noise" else math.nan
        )
        events.append(Event(kind, start, start + d, freq))
    return events


def _envelope(n: int) -> np.ndarray:
    """(n,) raised-cosine fade in and out of FADE_S each, 1 in between."""
    env = np.ones(n)
    k = min(round(FADE_S * SR), n // 2)
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(k) + 0.5) / k)  # (k,) from ~0 to ~1
    env[:k], env[n - k :] = ramp, ramp[::-1]
    return env


def _band_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) white noise band-limited to NOISE_BAND_HZ (brick-wall in the FFT domain)."""
    m = 2 * n  # filter a longer stretch and keep the middle: no wrap-around at the ends
    spec = np.fft.rfft(rng.standard_normal(m))
    f = np.fft.rfftfreq(m, 1 / SR)
    spec[(f < NOISE_BAND_HZ[0]) | (f > NOISE_BAND_HZ[1])] = 0
    return np.fft.irfft(spec, m)[n // 2 : n // 2 + n]


def render_events(events: Sequence[Event], rng: np.random.Generator) -> np.ndarray:
    """Float32 (N_SAMPLES,) clip with ``events`` (random peak amplitudes, clock-locked phases)
    on faint hiss."""
    wave = rng.normal(0.0, BACKGROUND_RMS, N_SAMPLES)
    for ev in events:
        i0, i1 = round(ev.start * SR), round(ev.end * SR)
        n = i1 - i0
        if ev.kind == "noise":
            sound = _band_noise(n, rng)
        else:
            # phase locked to the clip's clock: with pitches on the 125 Hz frame-rate harmonics every
            # 64-sample frame of a beep is the same waveform, so a vocoder can be trained with a
            # waveform loss (a random phase is unknowable from a magnitude spectrogram)
            t = (i0 + np.arange(n)) / SR
            sound = np.sin(2 * np.pi * ev.freq * t)
        sound = sound * _envelope(n)
        sound *= rng.uniform(*AMPLITUDE) / np.abs(sound).max()  # peak amplitude as drawn
        wave[i0:i1] += sound
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


def synthesize(metadata: Mapping[str, Any], rng: np.random.Generator, split: Split = "train") -> np.ndarray:
    """A float32 (N_SAMPLES,) clip in [-1, 1] that satisfies ``metadata`` (see :func:`plan_events`)."""
    return render_events(plan_events(metadata, rng, split), rng)


# --------------------------------------------------------------------------- datasets

_SPLIT_ID = {"train": 0, "heldout": 1}


def _split_tags(split: Split) -> tuple[Tag, ...]:
    if split not in _SPLIT_ID:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return TAGS if split == "train" else HELDOUT_TAGS


def make_dataset(
    n: int, seed: int, split: Split = "train"
) -> Iterator[tuple[np.ndarray, str, dict[str, Any]]]:
    """Yield ``n`` (wave float32 (N_SAMPLES,), caption, metadata) items, tags round-robin.

    Deterministic in (seed, split); item i has its own generator, so it does not
    depend on n.
    """
    tags = _split_tags(split)
    for i in range(n):
        rng = np.random.default_rng([seed, _SPLIT_ID[split], 0, i])
        md = sample_metadata(tags[i % len(tags)], rng, split)
        yield synthesize(md, rng, split), md["prompt"], md


def prompts(split: Split, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` metadata dicts of ``split``, tags balanced round-robin.

    Not de-duplicated: ToneWorld has few distinct prompts per tag (train: 3 single, 14 order, 11
    counting, 7 silence; held-out: 4 order, 1 counting, 2 silence).
    """
    tags = _split_tags(split)
    rng = np.random.default_rng([seed, _SPLIT_ID[split], 1])
    return [sample_metadata(tags[i % len(tags)], rng, split) for i in range(n)]


# --------------------------------------------------------------------------- judge

_WINDOW = np.hanning(N_FFT + 1)[:N_FFT]  # periodic Hann
_FREQS = np.fft.rfftfreq(N_FFT, 1 / SR)  # (N_FFT // 2 + 1,)
_BAND = (_FREQS >= BAND_HZ[0]) & (_FREQS <= BAND_HZ[1])


def band_power(wave: np.ndarray) -> np.ndarray:
    """(frames, bins) power spectrogram, Hann N_FFT / HOP; frame j is centred on sample j * HOP.

    Scaled so that a frame's sum over all bins is the mean square of its samples
    (a stationary signal's power); bins outside BAND_HZ are zeroed.
    """
    x = np.pad(np.asarray(wave, dtype=np.float64), N_FFT // 2)
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::HOP]  # (frames, N_FFT)
    power = np.abs(np.fft.rfft(frames * _WINDOW, axis=1)) ** 2
    power[:, 1:-1] *= 2  # one-sided spectrum: fold the negative frequencies in
    return power * _BAND / (N_FFT * np.sum(_WINDOW**2))


def _runs(active: np.ndarray) -> list[tuple[int, int]]:
    """[(first, last)] frame indices of the runs of True in a 1-D bool array."""
    d = np.diff(np.concatenate([[0], active.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1) - 1))


def _classify(power: np.ndarray) -> tuple[Kind, float]:
    """Kind and dominant frequency of one segment from its summed power spectrum (bins,).

    A tone puts nearly all its power within a Hann main lobe of its peak; band-limited
    noise spreads it over ~90 bins, so the peak's neighbourhood holds ~10%.
    """
    k = int(power.argmax())
    w = round(PEAK_HALF_WIDTH_HZ / (SR / N_FFT))
    concentration = power[max(k - w, 0) : k + w + 1].sum() / max(power.sum(), 1e-30)
    if concentration < TONE_CONCENTRATION:
        return "noise", math.nan
    # Parabolic interpolation of the log-power peak: a sub-bin frequency estimate.
    freq = _FREQS[k]
    if 0 < k < len(power) - 1 and min(power[k - 1], power[k + 1]) > 0:
        a, b, c = np.log(power[k - 1 : k + 2])
        if (den := a - 2 * b + c) < 0:
            freq += 0.5 * (a - c) / den * (SR / N_FFT)
    return ("low" if freq < PITCH_BOUNDARY_HZ else "high"), float(freq)


def detect_events(wave: np.ndarray, *, threshold: float = ENERGY_THRESHOLD) -> list[Event]:
    """Events in a mono (N,) clip at SR Hz, in temporal order.

    1. In-band frame energy: RMS over BAND_HZ of each Hann-windowed frame (N_FFT,
       HOP). The threshold is absolute (clips are not normalised): ~30 dB above
       ToneWorld's silence and ~8 dB below its quietest event.
    2. Segments: runs of active frames, after closing inactive gaps shorter than
       MERGE_GAP_S (dropouts, smeared onsets) and dropping runs shorter than
       MIN_EVENT_S (clicks). True events are >= 0.08 s apart, so they stay apart.
    3. Kind: a tone if the segment's power spectrum concentrates around its peak
       (PEAK_HALF_WIDTH_HZ, TONE_CONCENTRATION), else noise; a tone is low or high
       by its dominant frequency against PITCH_BOUNDARY_HZ.

    Start and end are the centres of the first and last active frames (so they
    can be off by up to half a window, 16 ms, towards the outside).
    """
    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise ValueError(f"expected a mono (N,) clip, got shape {wave.shape}")
    power = band_power(wave)  # (frames, bins)
    active = np.sqrt(power.sum(axis=1)) > threshold  # (frames,)
    merge, min_len = MERGE_GAP_S * SR / HOP, MIN_EVENT_S * SR / HOP
    for a, b in _runs(~active):  # close short inner gaps
        if a > 0 and b < len(active) - 1 and b - a + 1 < merge:
            active[a : b + 1] = True
    events = []
    for a, b in _runs(active):
        if b - a + 1 < min_len:
            continue
        kind, freq = _classify(power[a : b + 1].sum(axis=0))
        events.append(Event(kind, a * HOP / SR, b * HOP / SR, freq))
    return events


def judge_audio(wave: np.ndarray, metadata: Mapping[str, Any]) -> tuple[bool, str]:
    """Judge a clip against ToneWorld metadata: (correct, reason).

    Correct iff the detected kinds, in temporal order, are exactly ``events`` (extra
    or missing events fail) and, where the metadata has ``silence_after``, every
    detected event ends before it.
    """
    found = detect_events(wave)
    kinds = [e.kind for e in found]
    expected = list(metadata["events"])
    reason = f"found [{', '.join(kinds)}]; expected [{', '.join(expected)}]"
    if kinds != expected:
        return False, reason
    limit = metadata.get("silence_after")
    if limit is not None:
        last = max((e.end for e in found), default=0.0)
        reason += f"; last event ends at {last:.3f} s, silence expected from {limit:.3f} s"
        if last >= limit:
            return False, reason
    return True, reason
