"""Diffusion-DPO with LoRA: ``diffalign train`` against the real diffusers script, side by side.

    python -m diffalign.benchmarks.perf.peer_dpo_bench --peer-script PATH [--size tiny|half|both]
        [--rounds 3] [--steps 40] [--batch 8] [--rank 8] [--threads 2] [--root runs/peer-dpo]

The peer is ``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py`` of huggingface/diffusers,
run unmodified with its own CLI flags. It is never committed here; obtain it with

    curl -LO https://raw.githubusercontent.com/huggingface/diffusers/main/examples/research_projects/diffusion_dpo/train_diffusion_dpo.py

or, from a local mirror of the diffusers repository,

    P=examples/research_projects/diffusion_dpo/train_diffusion_dpo.py
    git --git-dir=DIFFUSERS.git show HEAD:$P > peer.py

and pass its path as ``--peer-script``; it is copied into the (git-ignored) run folder and run from there.

Both sides get identical inputs: the same SD1.5-architecture pipeline folder (``tiny``: the test suite's
tiny ``sd`` pipeline at 64 px; ``half``: SD1.5's UNet/VAE/CLIP shapes at half width, 256 px, as in
``dpo_bench.py``), the same Pick-a-Pic style parquet (``caption, jpg_0, jpg_1, label_0``, one file that
``load_dataset(FOLDER)`` reads as split ``train`` and diffalign reads as ``data.path``), batch, LoRA rank
(alpha = rank, gaussian init, to_q/k/v/out.0 on both), lr, seed, resolution, centre crop and no flip,
fp32, no gradient checkpointing, no validation, no checkpoint before the end, the same tracking (TensorBoard
on both when it is installed, none on either when it is not) and the same thread count.
Modes, interleaved round by round (the order rotates each round):

- ``peer``: the diffusers script (VAE encode + text encoder every step, LoRA-off reference forward);
- ``default``: ``diffalign train configs/sd15_dpo_lora.yaml`` with the settings above and nothing else:
  diffalign's default path, ``data.cache_dir=auto``, with the auto cache already there (built once
  before the rounds, as any earlier run, epoch or sweep over the same data leaves it; its build time
  is reported) and the live LoRA-off reference;
- ``cold``: the same with an empty cache home for every run: the run builds the auto cache in its
  start-up (it reads every row once), so its end-to-end time carries the encoding the script does
  inside its steps;
- ``uncached``: ``data.cache_dir=null``: the same work per step as the script;
- ``fast``: ``default`` plus ``train.precompute_reference=true`` (its pre-pass runs inside each run's
  start-up).

How it measures, the same way for every mode: each run is one child process; its stderr is read as it
comes and every tqdm update of the training bar is time-stamped (``TQDM_MININTERVAL=0``,
``TQDM_MINITERS=1``: one update per optimisation step on both sides). Steady pairs/s is
``(steps - 1) * batch / (t[last step] - t[first step])``: start-up (imports, loading, dataset preparation,
the reference pre-pass) and the first step are excluded. On a shared machine two more columns resist
other load: pairs/s over the median step (``batch / median(step wall time)``) and CPU seconds per pair
(the child's utime + stime from ``/proc/PID/stat``, read when each step's update arrives, first to last
step). End-to-end pairs/s (``steps * batch`` over the whole process's wall time) is reported too.
Peak memory is the child's peak RSS (``ru_maxrss`` from ``os.wait4``; both sides run as one process,
``dataloader_num_workers=0`` / ``data.num_workers=0``).
Medians over rounds.

Environment for the peer only: the script imports ``wandb`` and ``torchvision`` at module level. When
``wandb`` is missing a module named ``wandb`` with no package metadata is put on the peer's
``PYTHONPATH`` (accelerate then does not consider it installed; the script only uses it for validation
images, which are off). When ``torchvision`` cannot be imported (PyPI's CPU-less torchvision wheel needs
CUDA torch for its compiled ops), the wheel matching torch is installed with ``pip install --no-deps
--target ROOT/peer-site/real`` and the peer imports its real ``torchvision.transforms`` through a package
stub that skips ``torchvision/__init__``'s compiled-op registration (the script uses only
``transforms``). Nothing is installed into the environment diffalign runs in.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

PEER_BAR = "Steps"
DIFFALIGN_BAR = "train diffusion_dpo"
SIZES = {"tiny": 64, "half": 256}
MODES = ("peer", "default", "cold", "uncached", "fast")


# -- inputs -------------------------------------------------------------------------------------------


def build_inputs(root: Path, size: str, n_pairs: int) -> tuple[Path, Path]:
    """The pipeline folder and the parquet (``ROOT/SIZE/pairs/train.parquet``) for one size."""
    from diffalign.benchmarks.perf.data import write_pairs

    res = SIZES[size]
    d = root / size
    data = d / "pairs" / "train.parquet"
    if size == "tiny":
        pipe = d / "pipe"
        if not (pipe / "model_index.json").exists():
            from diffalign.models.tiny import build_tiny_pipeline

            build_tiny_pipeline("sd", pipe, sample_size=res // 8)
    else:
        from diffalign.benchmarks.perf.dpo_bench import build

        pipe, _ = build(d, 0.5, 1, res)  # its own 1-pair parquet is unused
    if not data.exists() or pair_count(data) != n_pairs:
        write_pairs(data, n_pairs, res)
    return pipe, data


def pair_count(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


# -- the two command lines ----------------------------------------------------------------------------


@dataclass
class Settings:
    resolution: int
    batch: int = 8
    steps: int = 40
    rank: int = 8
    lr: float = 1e-5
    beta_dpo: int = 2500  # diffusers' beta; diffalign's objective.beta is twice it (config comment)
    seed: int = 0
    tensorboard: bool = False


def peer_command(script: Path, pipe: Path, data: Path, out: Path, s: Settings) -> list[str]:
    return [
        sys.executable,
        str(script),
        f"--pretrained_model_name_or_path={pipe}",
        f"--dataset_name={data.parent}",
        "--dataset_split_name=train",
        f"--cache_dir={out / 'hf-datasets'}",
        f"--output_dir={out}",
        f"--resolution={s.resolution}",
        f"--train_batch_size={s.batch}",
        f"--max_train_steps={s.steps}",
        f"--rank={s.rank}",
        f"--learning_rate={s.lr}",
        "--lr_scheduler=constant",
        f"--beta_dpo={s.beta_dpo}",
        f"--seed={s.seed}",
        "--no_hflip",
        "--checkpointing_steps=1000000",
        "--dataloader_num_workers=0",
        "--mixed_precision=no",
        f"--report_to={'tensorboard' if s.tensorboard else 'all'}",  # 'all' = none installed
    ]


def diffalign_command(config: Path, pipe: Path, data: Path, out: Path, s: Settings, mode: str) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "diffalign.cli",
        "train",
        str(config),
        f"model.path={pipe}",
        f"data.path={data}",
        "data.format=parquet",
        f"data.resolution={s.resolution}",
        "data.random_flip=false",
        "data.num_workers=0",
        f"lora.rank={s.rank}",
        f"objective.beta={2 * s.beta_dpo}",
        f"train.batch_size={s.batch}",
        "train.grad_accum=1",
        f"train.max_steps={s.steps}",
        f"train.lr={s.lr}",
        "train.lr_scheduler=constant",
        f"train.seed={s.seed}",
        'train.mixed_precision="no"',
        "train.gradient_checkpointing=false",
        "train.checkpoint_every=1000000",
        f"train.report_to={'tensorboard' if s.tensorboard else 'none'}",
        f"train.output_dir={out}",
    ]
    if mode == "uncached":
        cmd.append("data.cache_dir=null")
    if mode == "fast":
        cmd.append("train.precompute_reference=true")
    return cmd


def cache_command(config: Path, pipe: Path, data: Path, s: Settings) -> list[str]:
    """``diffalign cache`` into the auto folder (``DIFFALIGN_CACHE_HOME`` of its environment)."""
    return [
        sys.executable,
        "-m",
        "diffalign.cli",
        "cache",
        str(config),
        f"model.path={pipe}",
        f"data.path={data}",
        "data.format=parquet",
        f"data.resolution={s.resolution}",
        "data.random_flip=false",
        "data.cache_dir=auto",
    ]


# -- the peer's environment ---------------------------------------------------------------------------


def importable(module: str, env: dict | None = None) -> bool:
    """``import module`` works in a fresh interpreter (with ``env``): what a peer's child process sees."""
    p = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, env=env)
    return p.returncode == 0


def peer_env(site: Path, base: dict[str, str]) -> dict[str, str]:
    """``base`` plus what the unmodified script needs to import (see the module docstring)."""
    env = dict(base)
    paths = []
    if not importable("wandb"):
        (site / "stub" / "wandb").mkdir(parents=True, exist_ok=True)
        (site / "stub" / "wandb" / "__init__.py").write_text('"""Stand-in: the benchmark logs nowhere."""\n')
        paths.append(str(site / "stub"))
    if not importable("torchvision.transforms"):
        import torch

        real = site / "real"
        if not (real / "torchvision" / "version.py").exists():
            minor = int(torch.__version__.split(".")[1])
            want = f"torchvision==0.{minor + 15}.*"  # torch 2.x pairs with torchvision 0.(x+15)
            subprocess.run(
                [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(real), want],
                check=True,
                capture_output=True,
            )
        shim = site / "shim" / "torchvision"
        shim.mkdir(parents=True, exist_ok=True)
        (shim / "__init__.py").write_text(
            '"""The real torchvision package without its compiled-op registration (transforms only)."""\n'
            f"__path__ = [{str(real / 'torchvision')!r}]\n"
            "from .version import __version__  # noqa: E402,F401\n"
        )
        paths.append(str(site / "shim"))
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def bench_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TQDM_MININTERVAL="0",
        TQDM_MINITERS="1",
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


# -- one timed run ------------------------------------------------------------------------------------


@dataclass
class Run:
    mode: str
    returncode: int
    wall_s: float
    peak_rss_kib: int
    stamps: list[tuple[int, float, float]] = field(default_factory=list)  # (steps done, wall s, CPU s)
    log_tail: str = ""

    def steady_pairs_per_s(self, batch: int) -> float:
        return steady_rate(self.stamps, batch)

    def median_step_pairs_per_s(self, batch: int) -> float:
        return median_step_rate(self.stamps, batch)

    def cpu_s_per_pair(self, batch: int) -> float:
        return cpu_per_pair(self.stamps, batch)

    def startup_s(self) -> float:
        return self.stamps[0][1] if self.stamps else float("nan")


def bar_pattern(desc: str) -> re.Pattern[str]:
    return re.compile(re.escape(desc) + r":\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)\s*\[")


def parse_bar(chunks: list[tuple], desc: str) -> list[tuple[int, float, float]]:
    """First time each step count of the ``desc`` tqdm bar was printed: ``[(n, t, cpu), ...]`` for
    n >= 1, ``cpu`` being the process's CPU seconds then (NaN when the chunk has none).

    ``chunks`` are ``(time, text)`` as read from the stream; updates are split on carriage returns and
    newlines (a chunk may hold several, an update may straddle chunks: it is stamped with the chunk
    that completed its ``n/N [``)."""
    pat = bar_pattern(desc)
    seen: dict[int, float] = {}
    buf = ""
    for t, text, *rest in chunks:
        cpu = rest[0] if rest else float("nan")
        parts = re.split(r"[\r\n]", buf + text)
        for part in parts:  # the last part may be unfinished; a count counts once its "n/N [" arrived
            m = pat.search(part)
            if m and int(m.group(1)) >= 1:
                seen.setdefault(int(m.group(1)), (t, cpu))
        buf = parts[-1]
    return [(n, t, c) for n, (t, c) in sorted(seen.items())]


def steady_rate(stamps: list[tuple], batch: int) -> float:
    """Pairs/s from the first to the last timed step (start-up and the first step excluded)."""
    if len(stamps) < 2:
        return float("nan")
    (n0, t0, *_), (n1, t1, *_) = stamps[0], stamps[-1]
    return (n1 - n0) * batch / (t1 - t0) if t1 > t0 else float("nan")


def median_step_rate(stamps: list[tuple], batch: int) -> float:
    """``batch`` over the median wall time of one step (steps 2..N): robust to bursts of contention."""
    dts = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(stamps, stamps[1:])]
    return batch / statistics.median(dts) if dts and statistics.median(dts) > 0 else float("nan")


def cpu_per_pair(stamps: list[tuple], batch: int) -> float:
    """CPU seconds (user + system, all threads) per pair from the first to the last timed step."""
    if len(stamps) < 2 or len(stamps[0]) < 3:
        return float("nan")
    (n0, _, c0), (n1, _, c1) = stamps[0][:3], stamps[-1][:3]
    return (c1 - c0) / ((n1 - n0) * batch)


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a live process from /proc (NaN where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def run_timed(cmd: list[str], env: dict[str, str], cwd: Path, desc: str, mode: str, log: Path) -> Run:
    """Run ``cmd``, time-stamping its stderr as it arrives; peak RSS of the child from ``wait4``."""
    chunks: list[tuple[float, str, float]] = []
    start = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    fd = p.stderr.fileno()

    def read() -> None:
        while data := os.read(fd, 1 << 16):
            now = time.perf_counter() - start
            chunks.append((now, data.decode("utf-8", "replace"), proc_cpu_s(p.pid)))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        _, status, usage = os.wait4(p.pid, 0)
    except BaseException:  # interrupted: leave no training process behind
        p.kill()
        raise
    wall = time.perf_counter() - start
    p.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=10)
    p.stderr.close()
    text = "".join(c for _, c, _ in chunks)
    log.write_text(text)
    return Run(mode, p.returncode, wall, usage.ru_maxrss, parse_bar(chunks, desc), text[-3000:])


# -- the table ----------------------------------------------------------------------------------------


def summarise(runs: list[Run], batch: int, steps: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for mode in MODES:
        rs = [r for r in runs if r.mode == mode]
        if not rs:
            continue
        out[mode] = {
            "pairs_per_s": statistics.median(r.steady_pairs_per_s(batch) for r in rs),
            "median_step_pairs_per_s": statistics.median(r.median_step_pairs_per_s(batch) for r in rs),
            "cpu_s_per_pair": statistics.median(r.cpu_s_per_pair(batch) for r in rs),
            "end_to_end_pairs_per_s": statistics.median(steps * batch / r.wall_s for r in rs),
            "peak_rss_gib": statistics.median(r.peak_rss_kib for r in rs) / 2**20,
            "startup_s": statistics.median(r.startup_s() for r in rs),
            "rounds": len(rs),
            "all_pairs_per_s": [round(r.steady_pairs_per_s(batch), 3) for r in rs],
        }
    return out


def table(size: str, s: Settings, summary: dict, cache_s: float | None) -> str:
    peer = summary.get("peer")
    lines = [
        f"{size}: {s.resolution} px, batch {s.batch} pairs, LoRA rank {s.rank}, {s.steps} steps"
        + (f"; cache build {cache_s:.1f} s (once, reused)" if cache_s is not None else ""),
        "| mode | pairs/s (steady) | x script | pairs/s (median step) | x script | CPU s/pair | x script "
        "| end-to-end pairs/s | peak RSS GiB | x script | start-up s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode, r in summary.items():
        x = {k: r[k] / peer[k] if peer else float("nan") for k in r if isinstance(r[k], float)}
        lines.append(
            f"| {mode} | {r['pairs_per_s']:.3f} | {x['pairs_per_s']:.2f}x | "
            f"{r['median_step_pairs_per_s']:.3f} | {x['median_step_pairs_per_s']:.2f}x | "
            f"{r['cpu_s_per_pair']:.3f} | {x['cpu_s_per_pair']:.2f}x | {r['end_to_end_pairs_per_s']:.3f} | "
            f"{r['peak_rss_gib']:.3f} | {x['peak_rss_gib']:.2f}x | {r['startup_s']:.1f} |"
        )
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------------


def bench_size(args: argparse.Namespace, size: str, root: Path, peer_script: Path) -> dict:
    config = Path(__file__).resolve().parents[2] / "configs" / "sd15_dpo_lora.yaml"
    if not config.exists():  # installed, not run from a checkout
        raise SystemExit(f"needs the repository's configs/sd15_dpo_lora.yaml (looked at {config})")
    steps = args.steps if size == "tiny" or args.half_steps is None else args.half_steps
    pipe, data = build_inputs(root, size, args.batch * steps)
    pipe, data = pipe.resolve(), data.resolve()
    s = Settings(SIZES[size], args.batch, steps, args.rank, tensorboard=importable("tensorboard"))
    env = bench_env(args.threads)
    penv = peer_env(root / "peer-site", env)
    runs_dir = (root / size / "runs").resolve()
    shutil.rmtree(runs_dir, ignore_errors=True)
    runs_dir.mkdir(parents=True)
    script = runs_dir / "train_diffusion_dpo.py"
    shutil.copyfile(peer_script, script)
    warm, cache_s = (root / size / "cache-home").resolve(), None
    modes = [m for m in MODES if m in args.modes]
    if {"default", "fast"} & set(modes):  # the warm auto cache, built once (as an earlier run leaves it)
        t0 = time.perf_counter()
        subprocess.run(
            cache_command(config, pipe, data, s),
            env={**env, "DIFFALIGN_CACHE_HOME": str(warm)},
            check=True,
            capture_output=True,
        )
        cache_s = time.perf_counter() - t0
    runs: list[Run] = []
    for rnd in range(args.rounds):
        order = modes[rnd % len(modes) :] + modes[: rnd % len(modes)]
        for mode in order:
            out = runs_dir / f"{mode}-{rnd}"
            if mode == "peer":
                cmd, e, desc = peer_command(script, pipe, data, out, s), penv, PEER_BAR
            else:
                home = runs_dir / f"cache-home-{rnd}" if mode == "cold" else warm  # cold: empty every run
                cmd = diffalign_command(config, pipe, data, out, s, mode)
                e, desc = {**env, "DIFFALIGN_CACHE_HOME": str(home)}, DIFFALIGN_BAR
            r = run_timed(cmd, e, runs_dir, desc, mode, runs_dir / f"{mode}-{rnd}.log")
            if r.returncode or len(r.stamps) < steps:
                raise RuntimeError(f"{size} {mode} round {rnd} failed (rc {r.returncode}):\n{r.log_tail}")
            runs.append(r)
            print(
                f"  {size} round {rnd} {mode:<8} {r.steady_pairs_per_s(s.batch):.3f} pairs/s  "
                f"(median step {r.median_step_pairs_per_s(s.batch):.3f}, "
                f"{r.cpu_s_per_pair(s.batch):.3f} CPU s/pair)  "
                f"peak RSS {r.peak_rss_kib / 2**20:.3f} GiB  start-up {r.startup_s():.1f} s",
                flush=True,
            )
    summary = summarise(runs, s.batch, s.steps)
    print(table(size, s, summary, cache_s), flush=True)
    return {
        "size": size,
        "settings": s.__dict__,
        "cache_build_s": cache_s,
        "summary": summary,
        "runs": [{k: v for k, v in r.__dict__.items() if k != "log_tail"} for r in runs],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer-script", required=True, help="path to diffusers' train_diffusion_dpo.py")
    ap.add_argument("--size", choices=["tiny", "half", "both"], default="tiny")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--half-steps", type=int, help="steps at the half size (default: --steps)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    ap.add_argument("--root", default="runs/peer-dpo")
    args = ap.parse_args(argv)
    peer_script = Path(args.peer_script)
    if not peer_script.is_file():
        raise SystemExit(f"--peer-script {peer_script}: no such file (see the module docstring)")
    args.modes = args.modes.split(",")
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    results = []
    for size in ["tiny", "half"] if args.size == "both" else [args.size]:
        results.append(bench_size(args, size, root, peer_script))
        (root / f"results-{size}.json").write_text(json.dumps(results[-1], indent=2))
    return results


if __name__ == "__main__":
    main()
