"""Flow-GRPO with LoRA: ``diffalign train`` against the official flow_grpo trainer, side by side.

    python -m diffalign.benchmarks.perf.peer_grpo_bench --peer-repo PATH [--size tiny|small|both]
        [--rounds 3] [--epochs 6] [--threads 2] [--root runs/peer-grpo]

The peer is ``scripts/train_sd3.py`` of yifan123/flow_grpo (read at ``ac4c86e``), run unmodified from its
own tree. It is never committed here; obtain the tree with

    git clone https://github.com/yifan123/flow_grpo PEER

or, from a bare mirror of that repository,

    mkdir PEER && git --git-dir=FLOW_GRPO.git archive HEAD | tar -x -C PEER

and pass ``--peer-repo PEER``. Nothing in it is changed: the benchmark writes its own config file
(``RUN/peer_config.py``, which loads the official ``config/grpo.py`` and starts from its
``compressibility`` config) into the git-ignored run folder, and runs
``python PEER/scripts/train_sd3.py --config=RUN/peer_config.py`` with ``PEER`` on ``PYTHONPATH`` (the
trainer imports the ``flow_grpo`` package; its README installs it with ``pip install -e .``).

Identical inputs on both sides: one tiny SD3.5-M-shaped pipeline folder (``StableDiffusion3Pipeline`` with
two CLIP text encoders *and* a T5, which the trainer needs: it encodes with all three, ``train_sd3.py:384``;
SD3.5-M's dual-attention first block and RMS qk-norm; ``tiny``: 64 px, 2 blocks of 2 x 8-d heads;
``small``: 128 px, 4 blocks of 4 x 16-d heads), one prompt file in the trainer's ``general_ocr`` format
(``DATASET/train.txt``, one prompt a line, which diffalign reads as ``data.path``), and the same settings:
prompts per round x group size (``sample.num_image_per_prompt`` = ``objective.group_size``), images per
sampling / training batch (``sample.train_batch_size`` = ``train.batch_size`` there; diffalign samples and
trains in chunks of ``batch_size x group_size / (updates_per_rollout x grad_accum)``), 2 optimizer steps per
round, sampling steps, CFG 4.5 at sampling and at training (``train.cfg`` / ``objective.train_cfg``), SDE
noise level 0.7, the first ``int(steps x 0.99)`` steps trained, clip range 1e-4, advantage clip 5,
per-prompt advantages with the global std, KL weight (``--beta``, default 0 as the official
``compressibility`` config), LoRA rank 32 / alpha 64 / gaussian init on the eight joint-attention
projections (the trainer hard-codes them, ``train_sd3.py:419-432``), AdamW lr 3e-4 with weight decay
1e-4, grad-norm clip 1, fp32, no EMA, T5 prompts of 128 tokens (hard-coded there, ``:625``), the
``jpeg_compressibility`` reward (``flow_grpo/rewards.py:22-29``; diffalign's ``rewards/compressibility.py``),
no checkpoint, no tracker, and the same thread count (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``), CUDA
hidden from both.

How the official trainer runs on CPU, unmodified:

- it picks its device through accelerate, which is the CPU when no GPU is visible; its sampling and
  training path never names ``cuda`` (``torch.backends.cuda.matmul.allow_tf32``, ``:450``, is a no-op
  there; only the aesthetic reward calls ``.cuda()``, ``flow_grpo/rewards.py:34``, unused here);
- it trains forever (``while True``, ``train_sd3.py:600``): the benchmark ends it (SIGKILL to its process
  group) the moment its training bar of the last timed epoch closes, and times it to that moment;
- it evaluates at epoch 0 whatever ``eval_freq`` is (``0 % n == 0``, ``:603``): its test file holds one
  prompt, ``sample.test_batch_size=1`` and ``sample.eval_num_steps=1`` keep that evaluation to one
  image of one step (its test DataLoader still starts 8 worker processes, ``:534``); ``eval_freq`` and
  ``save_freq`` are past the run, so nothing else is evaluated or saved;
- ``--beta > 0`` needs ``transformer.module`` (``:877``), which only a DDP-wrapped model has: in one
  plain process the trainer stops there with ``AttributeError: 'SD3Transformer2DModel' object has no
  attribute 'module'`` (checked on CPU), so the default is the ``compressibility`` config's
  ``beta = 0`` (no reference forward on either side);
- its imports: ``wandb`` (when missing: a stand-in module on the peer's ``PYTHONPATH`` whose ``init``
  / ``log`` / ``Image`` do nothing but append the logged scalars to ``RUN/peer-<round>.wandb.jsonl``),
  ``ml_collections`` and ``absl`` (when missing: ``pip install --no-deps --target ROOT/peer-site/real``),
  and, on Python >= 3.12, ``imp`` (its ``config/grpo.py`` calls ``imp.load_source``; a module giving
  that one function through importlib). Nothing is installed into the environment diffalign runs in.

How it measures, the same way for both modes (``peer``, ``diffalign``), interleaved round by round with
the order rotating each round: each run is one child process (its own process group) that trains
``--epochs`` rounds of ``prompts x group`` images; its stderr is read as it comes and the end of every
round is time-stamped (the peer: the closing print of its ``Epoch N.0: training`` bar; diffalign: its
``train flow_grpo`` bar reaching the round's last optimizer step, with ``TQDM_MININTERVAL=0`` so every
step prints; the peer keeps tqdm's defaults and prints no more than it normally does). Reported:

- end-to-end images/s: every rollout image of the run over the process's wall time from start (imports,
  loading, the peer's evaluation) to its exit (diffalign: including its final checkpoint and the
  interpreter's exit, about a second with torch + diffusers loaded) or, for the peer, to the end of
  its last timed round; and "to last round": the same images over the time from start to the end of
  the last round on both sides (the exit is the ``exit s`` column);
- steady images/s: the images of rounds 2..N over the time from the end of round 1 to the end of round N
  (start-up and the first round excluded);
- CPU s per image over the same rounds (utime + stime of the child from ``/proc``);
- peak RSS (``ru_maxrss`` from ``os.wait4``: the child, or its largest reaped child process).

Medians over rounds; ratios are diffalign / peer. The issue's target: >= 1.5x end-to-end images/s at
<= 1.0x peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffalign.benchmarks.perf.peer_dpo_bench import importable, proc_cpu_s

PEER_SCRIPT = "scripts/train_sd3.py"
PEER_EPOCH_BAR = re.compile(r"Epoch (\d+)\.0: training:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)\s*\[")
DIFFALIGN_BAR = "train flow_grpo"
MODES = ("peer", "diffalign")
PEER_LORA_RANK, PEER_LORA_ALPHA = 32, 64  # train_sd3.py:430-431 (hard-coded)
T5_TOKENS = 128  # train_sd3.py:625 (hard-coded)


@dataclass(frozen=True)
class Size:
    resolution: int
    layers: int
    heads: int
    head_dim: int
    clip_hidden: int
    t5_dim: int


SIZES = {
    "tiny": Size(resolution=64, layers=2, heads=2, head_dim=8, clip_hidden=16, t5_dim=32),
    "small": Size(resolution=128, layers=4, heads=4, head_dim=16, clip_hidden=32, t5_dim=64),
}


# -- inputs -------------------------------------------------------------------------------------------


def build_pipeline(out: Path, size: Size, seed: int = 0) -> Path:
    """A tiny ``StableDiffusion3Pipeline`` folder with both CLIPs and a T5 (random weights, real classes,
    saved with ``save_pretrained``): SD3.5-M's dual-attention first block and RMS qk-norm, 16-channel VAE
    with SD3.5's scale and shift, static-shift-3 flow scheduler."""
    if (out / "model_index.json").exists():
        return out
    import diffusers
    import torch

    from diffalign.models.tiny import WORDS, _clip_text
    from diffalign.models.tiny_dit import _t5, _vae
    from diffalign.models.tokenizer import build_clip_tokenizer, build_t5_tokenizer

    assert 2 * size.clip_hidden <= size.t5_dim, "the CLIP states are zero-padded to the T5 width"
    torch.manual_seed(seed)
    tok, tok2, t5tok = build_clip_tokenizer(WORDS), build_clip_tokenizer(WORDS), build_t5_tokenizer(WORDS)
    proj = size.clip_hidden // 2

    def clip():
        return _clip_text(size.clip_hidden, proj, len(tok), tok.eos_token_id, tok.bos_token_id)

    transformer = diffusers.SD3Transformer2DModel(
        sample_size=size.resolution // 8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=size.layers,
        attention_head_dim=size.head_dim,
        num_attention_heads=size.heads,
        joint_attention_dim=size.t5_dim,
        caption_projection_dim=size.heads * size.head_dim,
        pooled_projection_dim=2 * proj,
        pos_embed_max_size=max(16, size.resolution // 16),
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(16, 1.5305, 0.0609),
        text_encoder=clip(),
        tokenizer=tok,
        text_encoder_2=clip(),
        tokenizer_2=tok2,
        text_encoder_3=_t5(t5tok, size.t5_dim),
        tokenizer_3=t5tok,
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out


def prompt_lines() -> list[str]:
    """30 distinct prompts in the tiny tokenizers' vocabulary."""
    colours = "red green blue yellow purple orange".split()
    things = "cat dog circle square triangle".split()
    return [f"a photo of a {c} {t}" for c in colours for t in things]


def write_prompts(folder: Path) -> Path:
    """``train.txt`` (every prompt) and ``test.txt`` (one: the trainer's forced epoch-0 evaluation)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = prompt_lines()
    (folder / "train.txt").write_text("\n".join(lines) + "\n")
    (folder / "test.txt").write_text(lines[0] + "\n")
    return folder


# -- settings and the two command lines ---------------------------------------------------------------


@dataclass
class Settings:
    resolution: int
    prompts: int = 4
    """Prompts per round (diffalign ``train.batch_size``)."""
    group: int = 4
    """Images per prompt."""
    chunk: int = 4
    """Images per sampling / training batch (peer ``sample.train_batch_size`` = ``train.batch_size``)."""
    updates: int = 2
    """Optimizer steps per round."""
    steps: int = 10
    guidance: float = 4.5
    noise_level: float = 0.7
    timestep_fraction: float = 0.99
    beta: float = 0.0
    clip_range: float = 1e-4
    adv_clip: int = 5
    """Advantage clip (an int in the official config: its ConfigDict refuses a float there)."""
    lr: float = 3e-4
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    epochs: int = 6
    """Rounds (the peer's epochs) per run."""
    seed: int = 42

    @property
    def images_per_round(self) -> int:
        return self.prompts * self.group

    @property
    def batches(self) -> int:
        return self.images_per_round // self.chunk

    @property
    def grad_accum(self) -> int:
        return self.batches // self.updates

    def check(self) -> None:
        """The shapes both trainers can express identically (one-line errors)."""
        if self.chunk % self.group:
            raise SystemExit(f"--chunk {self.chunk} must hold whole groups of --group {self.group}")
        if self.images_per_round % self.chunk or self.batches % self.updates:
            raise SystemExit(
                f"--prompts x --group = {self.images_per_round} images must split into --updates "
                f"{self.updates} x an integer number of --chunk {self.chunk} batches"
            )
        if self.beta > 0:
            print(
                "warning: --beta > 0: the official trainer needs a DDP-wrapped model for its reference "
                "forward (transformer.module, train_sd3.py:877) and fails in one plain process",
                file=sys.stderr,
            )


def yaml_float(x: float) -> str:
    """A float as YAML 1.1 reads it as a float (``1e-05`` would be a string there; ``1.0e-05`` is not)."""
    s = repr(float(x))
    mant, e, exp = s.partition("e")
    return f"{mant if '.' in mant else mant + '.0'}{e}{exp}"


def peer_overrides(s: Settings, pipe: Path, dataset: Path, logdir: Path) -> dict[str, Any]:
    """The official config's fields the benchmark sets (dotted names, on top of ``compressibility()``)."""
    return {
        "pretrained.model": str(pipe),
        "dataset": str(dataset),
        "resolution": s.resolution,
        "mixed_precision": "no",
        "use_lora": True,
        "seed": s.seed,
        "logdir": str(logdir),
        "save_dir": str(logdir),
        "eval_freq": 10**9,  # epoch 0 still evaluates (0 % n == 0): one test prompt, one step
        "save_freq": 10**9,
        "prompt_fn": "general_ocr",
        "reward_fn": {"jpeg_compressibility": 1.0},
        "per_prompt_stat_tracking": True,
        "sample.num_steps": s.steps,
        "sample.eval_num_steps": 1,
        "sample.guidance_scale": s.guidance,
        "sample.train_batch_size": s.chunk,
        "sample.num_image_per_prompt": s.group,
        "sample.num_batches_per_epoch": s.batches,
        "sample.test_batch_size": 1,
        "sample.global_std": True,
        "sample.noise_level": s.noise_level,
        "train.batch_size": s.chunk,
        "train.gradient_accumulation_steps": s.grad_accum,
        "train.num_inner_epochs": 1,
        "train.timestep_fraction": s.timestep_fraction,
        "train.beta": s.beta,
        "train.ema": False,
        "train.cfg": True,
        "train.learning_rate": s.lr,
        "train.adam_weight_decay": s.weight_decay,
        "train.max_grad_norm": s.max_grad_norm,
        "train.clip_range": s.clip_range,
        "train.adv_clip_max": s.adv_clip,
        "train.use_8bit_adam": False,
        "train.lora_path": None,
    }


def write_peer_config(path: Path, peer_repo: Path, overrides: dict[str, Any]) -> Path:
    """``RUN/peer_config.py``: the official ``config/grpo.py:compressibility`` plus ``overrides``."""
    grpo = peer_repo.resolve() / "config" / "grpo.py"
    lines = [
        '"""flow_grpo config written by diffalign\'s peer_grpo_bench: the official compressibility config',
        '(config/grpo.py, loaded as it is) with the benchmark\'s settings."""',
        "",
        "import importlib.util",
        "",
        f"_spec = importlib.util.spec_from_file_location('flow_grpo_config_grpo', {str(grpo)!r})",
        "_grpo = importlib.util.module_from_spec(_spec)",
        "_spec.loader.exec_module(_grpo)",
        "",
        "",
        "def get_config():",
        "    config = _grpo.compressibility()",
        *[f"    config.{k} = {v!r}" for k, v in overrides.items()],
        "    return config",
        "",
    ]
    path.write_text("\n".join(lines))
    return path


def peer_command(peer_repo: Path, config: Path) -> list[str]:
    return [sys.executable, str(peer_repo.resolve() / PEER_SCRIPT), f"--config={config}"]


def diffalign_command(config: Path, pipe: Path, prompts: Path, out: Path, s: Settings) -> list[str]:
    from diffalign.models.sd3 import SD3_LORA_TARGETS

    return [
        sys.executable,
        "-m",
        "diffalign.cli",
        "train",
        str(config),
        f"model.path={pipe}",
        f"model.max_sequence_length={T5_TOKENS}",
        f"data.path={prompts}",
        f"data.resolution={s.resolution}",
        f"lora.rank={PEER_LORA_RANK}",
        f"lora.alpha={PEER_LORA_ALPHA}",
        "lora.init=gaussian",
        f"lora.target_modules=[{', '.join(SD3_LORA_TARGETS)}]",
        "objective.rewards=jpeg_compressibility",
        f"objective.group_size={s.group}",
        f"objective.sample_steps={s.steps}",
        f"objective.guidance_scale={yaml_float(s.guidance)}",
        f"objective.noise_level={yaml_float(s.noise_level)}",
        f"objective.timestep_fraction={yaml_float(s.timestep_fraction)}",
        f"objective.beta={yaml_float(s.beta)}",
        f"objective.clip_range={yaml_float(s.clip_range)}",
        f"objective.adv_clip={yaml_float(s.adv_clip)}",
        "objective.global_std=true",
        "objective.train_cfg=true",
        f"objective.updates_per_rollout={s.updates}",
        f"train.batch_size={s.prompts}",
        f"train.grad_accum={s.grad_accum}",
        f"train.max_steps={s.epochs * s.updates}",
        f"train.lr={yaml_float(s.lr)}",
        f"train.weight_decay={yaml_float(s.weight_decay)}",
        f"train.max_grad_norm={yaml_float(s.max_grad_norm)}",
        "train.lr_scheduler=constant",
        "train.warmup_steps=0",
        f"train.seed={s.seed}",
        'train.mixed_precision="no"',
        "train.gradient_checkpointing=false",
        "train.ema_decay=0",
        "train.checkpoint_every=1000000",
        "train.report_to=none",
        f"train.output_dir={out}",
    ]


# -- the peer's environment ---------------------------------------------------------------------------

WANDB_STUB = '''"""Stand-in for wandb (peer_grpo_bench): logs nowhere but a JSONL file of scalars."""
import json
import os

_PATH = os.environ.get("PEER_GRPO_BENCH_WANDB_LOG")


def init(*args, **kwargs):
    return None


def log(data, step=None, **kwargs):
    if not _PATH:
        return
    row = {"step": step}
    for k, v in data.items():
        try:
            row[k] = float(v)
        except (TypeError, ValueError):
            pass
    with open(_PATH, "a") as f:
        f.write(json.dumps(row) + "\\n")


class Image:
    def __init__(self, *args, **kwargs):
        pass
'''

IMP_SHIM = '''"""imp.load_source through importlib (peer_grpo_bench; imp left Python in 3.12)."""
import importlib.machinery
import importlib.util
import sys


def load_source(name, path):
    loader = importlib.machinery.SourceFileLoader(name, path)
    spec = importlib.util.spec_from_loader(name, loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module
'''

PIP_NAMES = {"ml_collections": "ml-collections", "absl": "absl-py"}


def peer_env(site: Path, peer_repo: Path, base: dict[str, str]) -> dict[str, str]:
    """``base`` plus what the unmodified trainer needs to import (see the module docstring)."""
    env = dict(base)
    stub = site / "stub"
    stub.mkdir(parents=True, exist_ok=True)
    if not importable("wandb"):
        (stub / "wandb.py").write_text(WANDB_STUB)
    if not importable("imp"):
        (stub / "imp.py").write_text(IMP_SHIM)
    missing = [PIP_NAMES[m] for m in PIP_NAMES if not importable(m)]
    real = site / "real"
    if missing and not all((real / m.replace("-", "_")).exists() for m in missing):
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(real), *missing]
        subprocess.run(cmd, check=True, capture_output=True)
    paths = [str(stub), str(real), str(peer_repo.resolve())]
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def bench_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        CUDA_VISIBLE_DEVICES="",  # a CPU benchmark on both sides, GPU or not
    )
    for k in ("TQDM_MININTERVAL", "TQDM_MINITERS"):
        env.pop(k, None)
    return env


# -- round stamps -------------------------------------------------------------------------------------


def peer_rounds(text: str) -> list[int]:
    """Epochs whose training bar reached its total in ``text``, in order, each once."""
    done: list[int] = []
    for part in re.split(r"[\r\n]", text):
        for m in PEER_EPOCH_BAR.finditer(part):
            e, n, total = (int(g) for g in m.groups())
            if n == total and e not in done:
                done.append(e)
    return done


def diffalign_rounds(text: str, updates: int) -> list[int]:
    """Rounds whose last optimizer step the ``train flow_grpo`` bar printed in ``text``."""
    from .peer_dpo_bench import bar_pattern

    pat, steps = bar_pattern(DIFFALIGN_BAR), set()
    for part in re.split(r"[\r\n]", text):
        steps.update(int(m.group(1)) for m in pat.finditer(part))
    return [n // updates - 1 for n in sorted(steps) if n >= updates and n % updates == 0]


@dataclass
class Run:
    mode: str
    returncode: int
    wall_s: float
    """Start to exit, or (a run stopped by the benchmark) to the end of its last timed round."""
    peak_rss_kib: int
    stamps: list[tuple[int, float, float]] = field(default_factory=list)  # (round, wall s, CPU s) at its end
    log_tail: str = ""

    def steady_images_per_s(self, images: int) -> float:
        if len(self.stamps) < 2:
            return float("nan")
        (r0, t0, _), (r1, t1, _) = self.stamps[0], self.stamps[-1]
        return (r1 - r0) * images / (t1 - t0) if t1 > t0 else float("nan")

    def cpu_s_per_image(self, images: int) -> float:
        if len(self.stamps) < 2:
            return float("nan")
        (r0, _, c0), (r1, _, c1) = self.stamps[0], self.stamps[-1]
        return (c1 - c0) / ((r1 - r0) * images)

    def end_to_end_images_per_s(self, images: int) -> float:
        """Every image over the process's wall time (the peer: to the end of its last round)."""
        return len(self.stamps) * images / self.wall_s

    def to_last_round_images_per_s(self, images: int) -> float:
        """Every image over the time from start to the end of the last round, the same span on both
        sides (diffalign's final checkpoint and interpreter exit left out, as the peer never exits)."""
        return len(self.stamps) * images / self.stamps[-1][1] if self.stamps else float("nan")

    def exit_s(self) -> float:
        """From the end of the last round to the exit (0 for the peer, which is stopped there)."""
        return self.wall_s - self.stamps[-1][1] if self.stamps else float("nan")

    def first_round_s(self) -> float:
        return self.stamps[0][1] if self.stamps else float("nan")


def run_timed(
    cmd: list[str], env: dict[str, str], cwd: Path, mode: str, log: Path, rounds: int, updates: int
) -> Run:
    """Run ``cmd`` in its own process group, time-stamping the end of each round as its stderr
    arrives; a peer run is killed (with its workers) once its ``rounds``-th round has ended."""
    chunks: list[tuple[float, str, float]] = []
    seen: dict[int, tuple[float, float]] = {}
    stop_at: list[float] = []
    start = time.perf_counter()
    p = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    fd = p.stdout.fileno()

    def read() -> None:
        tail = ""
        while data := os.read(fd, 1 << 16):
            now, cpu = time.perf_counter() - start, proc_cpu_s(p.pid)
            text = data.decode("utf-8", "replace")
            chunks.append((now, text, cpu))
            tail = (tail + text)[-16384:]
            done = peer_rounds(tail) if mode == "peer" else diffalign_rounds(tail, updates)
            for r in done:
                seen.setdefault(r, (now, cpu))
            if mode == "peer" and len(seen) >= rounds and not stop_at:
                stop_at.append(now)
                os.killpg(p.pid, signal.SIGKILL)  # it trains forever: end it and its loader workers

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        _, status, usage = os.wait4(p.pid, 0)
    except BaseException:  # interrupted: leave no training process behind
        os.killpg(p.pid, signal.SIGKILL)
        raise
    wall = time.perf_counter() - start
    reader.join(timeout=10)
    p.stdout.close()
    text = "".join(c for _, c, _ in chunks)
    log.write_text(text)
    rc = os.waitstatus_to_exitcode(status)
    stamps = [(r, t, c) for r, (t, c) in sorted(seen.items())]
    if stop_at:  # stopped by the benchmark: a success, timed to the end of its last wanted round
        stamps = stamps[:rounds]
        rc, wall = 0, stamps[-1][1]
    return Run(mode, rc, wall, usage.ru_maxrss, stamps, text[-3000:])


# -- the table ----------------------------------------------------------------------------------------


def summarise(runs: list[Run], images: int) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        rs = [r for r in runs if r.mode == mode]
        if not rs:
            continue
        out[mode] = {
            "end_to_end_images_per_s": statistics.median(r.end_to_end_images_per_s(images) for r in rs),
            "to_last_round_images_per_s": statistics.median(r.to_last_round_images_per_s(images) for r in rs),
            "steady_images_per_s": statistics.median(r.steady_images_per_s(images) for r in rs),
            "cpu_s_per_image": statistics.median(r.cpu_s_per_image(images) for r in rs),
            "peak_rss_gib": statistics.median(r.peak_rss_kib for r in rs) / 2**20,
            "first_round_s": statistics.median(r.first_round_s() for r in rs),
            "wall_s": statistics.median(r.wall_s for r in rs),
            "exit_s": statistics.median(r.exit_s() for r in rs),
            "runs": len(rs),
            "all_end_to_end": [round(r.end_to_end_images_per_s(images), 3) for r in rs],
        }
    return out


TABLE_COLUMNS = [
    ("end-to-end img/s", "end_to_end_images_per_s", 3),
    ("to last round img/s", "to_last_round_images_per_s", 3),
    ("steady img/s", "steady_images_per_s", 3),
    ("CPU s/img", "cpu_s_per_image", 3),
    ("peak RSS GiB", "peak_rss_gib", 3),
]


def verdict(summary: dict[str, dict[str, Any]], speed_key: str) -> str:
    """The issue's target on one definition of end-to-end: >= 1.5x images/s at <= 1.0x peak RSS."""
    d, peer = summary["diffalign"], summary["peer"]
    speed, mem = d[speed_key] / peer[speed_key], d["peak_rss_gib"] / peer["peak_rss_gib"]
    met = "met" if speed >= 1.5 and mem <= 1.0 else "not met"
    return f"target on {speed_key} (>= 1.5x, peak RSS <= 1.0x): {speed:.2f}x, {mem:.2f}x -> {met}"


def table(size: str, s: Settings, summary: dict[str, dict[str, Any]]) -> str:
    lines = [
        f"{size}: {s.resolution} px, {s.prompts} prompts x {s.group} images per round in batches of "
        f"{s.chunk}, {s.updates} updates per round, {s.steps} steps (CFG {s.guidance}), "
        f"{s.epochs} rounds per run",
        "| mode | "
        + " | ".join(f"{c} | x peer" for c, _, _ in TABLE_COLUMNS)
        + " | to round 1 s | exit s | wall s |",
        "| --- " * (2 * len(TABLE_COLUMNS) + 4) + "|",
    ]
    peer = summary.get("peer")
    for mode, r in summary.items():
        cells = [
            f"{r[k]:.{d}f} | {r[k] / peer[k] if peer else float('nan'):.2f}x" for _, k, d in TABLE_COLUMNS
        ]
        tail = f" | {r['first_round_s']:.1f} | {r['exit_s']:.1f} | {r['wall_s']:.1f} |"
        lines.append(f"| {mode} | " + " | ".join(cells) + tail)
    if peer and "diffalign" in summary:
        lines += [verdict(summary, "end_to_end_images_per_s"), verdict(summary, "to_last_round_images_per_s")]
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------------


def reward_trace(run_dir: Path, mode: str, rnd: int) -> list[float]:
    """The mean training reward per round, as each side logged it (sanity: both train the same reward)."""
    if mode == "peer":
        f = run_dir / f"peer-{rnd}.wandb.jsonl"
        rows = [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []
        return [r["reward_avg"] for r in rows if "reward_avg" in r]
    f = run_dir / f"diffalign-{rnd}" / "metrics.jsonl"
    rows = [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []
    return [r["reward"] for r in rows if "reward" in r]


def run_line(size: str, rnd: int, r: Run, images: int, rewards: list[float]) -> str:
    first, last = (rewards[0], rewards[-1]) if rewards else (float("nan"), float("nan"))
    return (
        f"  {size} round {rnd} {r.mode:<9} end-to-end {r.end_to_end_images_per_s(images):.3f} img/s "
        f"({r.to_last_round_images_per_s(images):.3f} to the last round), "
        f"steady {r.steady_images_per_s(images):.3f} img/s, {r.cpu_s_per_image(images):.3f} CPU s/img, "
        f"peak RSS {r.peak_rss_kib / 2**20:.3f} GiB, wall {r.wall_s:.1f} s; reward {first:.5f} -> {last:.5f}"
    )


def bench_size(args: argparse.Namespace, size: str, root: Path, peer_repo: Path) -> dict:
    config = Path(__file__).resolve().parents[2] / "configs" / "sd3_flow_grpo_lora.yaml"
    if not config.exists():  # installed, not run from a checkout
        raise SystemExit(f"needs the repository's configs/sd3_flow_grpo_lora.yaml (looked at {config})")
    sz = SIZES[size]
    s = Settings(
        sz.resolution, args.prompts, args.group, args.chunk, args.updates, args.steps, beta=args.beta,
        epochs=args.epochs,
    )  # fmt: skip
    s.check()
    pipe = build_pipeline(root / size / "pipe", sz).resolve()
    dataset = write_prompts(root / "prompts").resolve()
    env = bench_env(args.threads)
    penv = peer_env(root / "peer-site", peer_repo, env)
    denv = {**env, "TQDM_MININTERVAL": "0", "TQDM_MINITERS": "1"}
    runs_dir = (root / size / "runs").resolve()
    shutil.rmtree(runs_dir, ignore_errors=True)  # diffalign refuses an output folder holding a run
    runs_dir.mkdir(parents=True)
    modes = [m for m in MODES if m in args.modes]
    runs: list[Run] = []
    for rnd in range(args.rounds):
        for mode in modes[rnd % len(modes) :] + modes[: rnd % len(modes)]:
            out = runs_dir / f"{mode}-{rnd}"
            if mode == "peer":
                pcfg = write_peer_config(
                    runs_dir / "peer_config.py", peer_repo, peer_overrides(s, pipe, dataset, out)
                )
                cmd, e = (
                    peer_command(peer_repo, pcfg),
                    {**penv, "PEER_GRPO_BENCH_WANDB_LOG": f"{out}.wandb.jsonl"},
                )
            else:
                cmd, e = diffalign_command(config, pipe, dataset / "train.txt", out, s), denv
            r = run_timed(cmd, e, runs_dir, mode, runs_dir / f"{mode}-{rnd}.log", s.epochs, s.updates)
            if r.returncode or len(r.stamps) < s.epochs:
                raise RuntimeError(f"{size} {mode} round {rnd} failed (rc {r.returncode}):\n{r.log_tail}")
            runs.append(r)
            print(run_line(size, rnd, r, s.images_per_round, reward_trace(runs_dir, mode, rnd)), flush=True)
    summary = summarise(runs, s.images_per_round)
    print(table(size, s, summary), flush=True)
    return {
        "size": size,
        "settings": asdict(s),
        "summary": summary,
        "runs": [{k: v for k, v in asdict(r).items() if k != "log_tail"} for r in runs],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer-repo", required=True, help="a checkout or extracted tree of yifan123/flow_grpo")
    ap.add_argument("--size", choices=[*SIZES, "both"], default="tiny")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repeats of each mode")
    ap.add_argument("--epochs", type=int, default=6, help="rollout rounds (the peer's epochs) per run")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per round")
    ap.add_argument("--group", type=int, default=4, help="images per prompt")
    ap.add_argument("--chunk", type=int, default=4, help="images per sampling / training batch")
    ap.add_argument("--updates", type=int, default=2, help="optimizer steps per round")
    ap.add_argument("--steps", type=int, default=10, help="sampling steps")
    ap.add_argument(
        "--beta", type=float, default=0.0, help="KL weight (> 0 fails the peer, see the docstring)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    ap.add_argument("--root", default="runs/peer-grpo")
    args = ap.parse_args(argv)
    peer_repo = Path(args.peer_repo)
    if not (peer_repo / PEER_SCRIPT).is_file() or not (peer_repo / "config" / "grpo.py").is_file():
        raise SystemExit(
            f"--peer-repo {peer_repo}: no {PEER_SCRIPT} and config/grpo.py there; get the tree with "
            "'git clone https://github.com/yifan123/flow_grpo' (see the module docstring)"
        )
    args.modes = args.modes.split(",")
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    results = []
    for size in [*SIZES] if args.size == "both" else [args.size]:
        results.append(bench_size(args, size, root, peer_repo))
        (root / f"results-{size}.json").write_text(json.dumps(results[-1], indent=2))
    return results


if __name__ == "__main__":
    main()
