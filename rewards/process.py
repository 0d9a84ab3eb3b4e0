"""Rewards in a separate process (``train.reward_process``): the models load once in a child, the
caller sends it decoded images and prompts and gets ``{name: scores [N]}`` back.

``RewardProcess(specs, device)`` starts the child with ``torch.multiprocessing``'s spawn context; the
child loads ``specs`` (``name=path``, as ``load_rewards``) on ``device`` and answers one request per
call, each reward scoring the whole request batched (its own ``batch_size``). ``.rewards`` holds one
``RemoteReward`` per reward, called like the reward itself; ``score_rewards`` scores a dict of local
and remote rewards with one request per reward process, so a round's images cross the pipe once.

- Same scores, bit for bit: the child runs the same reward code on the same tensors (pickled by
  value through the pipe, not shared memory: nothing depends on the size of ``/dev/shm``), with the
  caller's torch thread count, float32 matmul precision, TF32 / reduced-precision and determinism
  flags, and autocast state of the moment of the call. Rewards must be deterministic functions of
  (images, prompts); sub-scores (``RewardOutput.sub``) are not sent back.
- Errors: a reward that raises in the child is re-raised in the caller as one line naming the reward
  and the cause (a ``ConfigError`` stays a ``ConfigError``, anything else is a ``RuntimeError``); a
  child that dies is reported at once, with its exit code, and one that does not answer within
  ``timeout`` seconds is stopped and reported. Never a hang. After an error the child is stopped.
- Lifecycle: the child is a daemon that ignores SIGINT (Ctrl-C reaches the training process, which
  stops it). ``close()``, garbage collection of the ``RewardProcess`` and interpreter exit
  (``weakref.finalize``) stop it: a close request, then terminate, then kill. The child also exits
  by itself when the caller's end of the pipe closes (a killed training process).
- Spawn re-imports the caller's ``__main__``: a script that starts training must guard it with
  ``if __name__ == "__main__":``. The module of every reward named in ``specs`` is imported in the
  child, so rewards registered outside ``diffalign.rewards`` (the toy judges) load there too.
- Under DDP each process starts its own reward process, on its own device.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import signal
import time
import weakref
from typing import Any

import torch
from torch import Tensor

from diffalign.errors import ConfigError

from .base import REWARDS, RewardOutput

POLL_S = 1.0
"""How often a waiting caller checks that the child is alive (a dead child's closed pipe ends the
wait at once anyway)."""
STOP_GRACE_S = 5.0
"""How long ``close`` waits for the child after a close request, and again after terminate."""


def _send(conn: Any, msg: Any) -> None:
    conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _settings() -> dict[str, Any]:
    """The caller's numerics settings that can change a reward's floats."""
    out: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "cudnn": (
            torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark,
        ),
    }
    m = torch.backends.cuda.matmul
    out["cuda_matmul"] = (
        m.allow_tf32,
        m.allow_fp16_reduced_precision_reduction,
        m.allow_bf16_reduced_precision_reduction,
    )
    return out


def _apply_settings(s: dict[str, Any]) -> None:
    torch.set_num_threads(s["threads"])
    torch.set_float32_matmul_precision(s["matmul_precision"])
    torch.use_deterministic_algorithms(s["deterministic"])
    cd = torch.backends.cudnn
    cd.allow_tf32, cd.deterministic, cd.benchmark = s["cudnn"]
    m = torch.backends.cuda.matmul
    (m.allow_tf32, m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction) = s[
        "cuda_matmul"
    ]


def _quiet() -> None:
    """Model loading stays as quiet as in the training process (``diffalign._quiet``), without
    importing diffusers, which the rewards do not need."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    with contextlib.suppress(Exception):
        import transformers.utils.logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()


def _autocast_state() -> list[tuple[str, torch.dtype]]:
    """The autocast contexts active in the caller (rewards called inside a training autocast)."""
    return [(d, torch.get_autocast_dtype(d)) for d in ("cuda", "cpu") if torch.is_autocast_enabled(d)]


def _serve(conn: Any, specs: list[str], device: str, modules: list[str], settings: dict[str, Any]) -> None:
    """The child: load the rewards, then answer requests until a close request or a closed pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _quiet()
        _apply_settings(settings)
        for m in modules:  # registers rewards defined outside diffalign.rewards
            importlib.import_module(m)
        from .loading import load_rewards

        rewards = load_rewards(specs, device)
    except BaseException as e:  # noqa: BLE001  (reported to the caller as one line)
        with contextlib.suppress(OSError):
            _send(conn, ("error", "loading", isinstance(e, ConfigError), _one_line(e)))
        return
    _send(conn, ("ready", list(rewards)))
    while True:
        try:
            msg = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the caller is gone
        if msg[0] == "close":
            return
        _, names, images, prompts, casts = msg
        reply: tuple = ("ok", {})
        for n in names:
            try:
                with contextlib.ExitStack() as stack:
                    for d, dtype in casts:
                        stack.enter_context(torch.autocast(d, dtype=dtype))
                    reply[1][n] = rewards[n](images, prompts).scores.detach().cpu()
            except Exception as e:  # noqa: BLE001  (re-raised by the caller)
                reply = ("error", n, isinstance(e, ConfigError), _one_line(e))
                break
        try:
            _send(conn, reply)
        except OSError:
            return


def _stop(pid: int, proc: Any, conn: Any) -> None:
    """Stop the child: a close request, then terminate, then kill (the creating process only)."""
    if os.getpid() != pid:  # a forked copy of the caller does not own the child
        return
    with contextlib.suppress(OSError, ValueError):
        if proc.is_alive():
            _send(conn, ("close",))
    proc.join(STOP_GRACE_S)
    if proc.is_alive():
        proc.terminate()
        proc.join(STOP_GRACE_S)
    if proc.is_alive():
        proc.kill()
        proc.join()
    conn.close()


class RewardProcess:
    """Reward models loaded once in a child process (spawn); see the module docstring."""

    def __init__(self, specs: list[str], device: str | torch.device = "cpu", timeout: float = 600.0) -> None:
        names = [s.partition("=")[0] for s in specs]
        classes = [REWARDS.get(n) for n in names]  # an unknown name fails here, before any process starts
        modules = sorted({c.__module__ for c in classes} - {"__main__", "__mp_main__"})
        self.timeout = float(timeout)
        ctx = torch.multiprocessing.get_context("spawn")
        self.conn, there = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=_serve,
            args=(there, list(specs), str(device), modules, _settings()),
            daemon=True,
            name="diffalign-rewards",
        )
        self.proc.start()
        there.close()  # the child holds the only other end: its exit closes the pipe
        self._finalizer = weakref.finalize(self, _stop, os.getpid(), self.proc, self.conn)
        msg = self._wait(f"loading {', '.join(specs)}")
        if msg[0] == "error":
            self.close()
            err = f"reward process: could not load {', '.join(names)}: {msg[3]}"
            raise ConfigError(err) if msg[2] else RuntimeError(err)
        self.names: list[str] = msg[1]
        modality = {n: getattr(c, "modality", "image") for n, c in zip(names, classes, strict=True)}
        self.rewards: dict[str, RemoteReward] = {
            n: RemoteReward(self, n, modality.get(n.split(":")[0], "image")) for n in self.names
        }

    def close(self) -> None:
        """Stop the child (idempotent)."""
        self._finalizer()

    def _wait(self, what: str) -> Any:
        """The child's next message; a dead or silent child is an error (and is stopped)."""
        deadline = time.monotonic() + self.timeout
        while not self.conn.poll(max(0.0, min(POLL_S, deadline - time.monotonic()))):
            if not self.proc.is_alive():
                break
            if time.monotonic() >= deadline:
                self.close()
                raise RuntimeError(
                    f"reward process: no answer after {self.timeout:g} s while {what}; stopped it "
                    "(raise train.reward_timeout if the rewards are just slow)"
                )
        try:
            return pickle.loads(self.conn.recv_bytes())
        except (EOFError, OSError):
            pass
        self.proc.join(STOP_GRACE_S)
        code = self.proc.exitcode
        self.close()
        raise RuntimeError(
            f"reward process: exited (code {code}) while {what}; if it died at start-up, a script that "
            "starts training must guard it with `if __name__ == '__main__':` (the process is spawned)"
        )

    def score(self, images: Tensor, prompts: list[str], names: list[str] | None = None) -> dict[str, Tensor]:
        """``{name: scores [N]}`` (CPU, as each reward returns them) of ``images`` ``[N,3,H,W]`` for
        ``prompts``, by the rewards ``names`` (default: all), in one request."""
        names = list(self.names) if names is None else list(names)
        if not self._finalizer.alive:
            raise RuntimeError("reward process: already stopped (an earlier error, or close())")
        what = f"scoring {len(prompts)} images with {', '.join(names)}"
        try:
            _send(self.conn, ("score", names, images, list(prompts), _autocast_state()))
        except OSError:
            pass  # the child is gone: _wait says so
        msg = self._wait(what)
        if msg[0] == "error":
            self.close()
            err = f"reward {msg[1]!r} (in the reward process): {msg[3]}"
            raise ConfigError(err) if msg[2] else RuntimeError(err)
        return msg[1]


class RemoteReward:
    """One reward of a ``RewardProcess``, called like the reward: ``(images, prompts) -> RewardOutput``
    (scores only)."""

    def __init__(self, process: RewardProcess, name: str, modality: str = "image") -> None:
        self.process, self.name, self.modality = process, name, modality

    def __call__(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        return RewardOutput(self.process.score(images, prompts, [self.name])[self.name])

    def __repr__(self) -> str:
        return f"RemoteReward({self.name!r})"


def score_rewards(rewards: dict[str, Any], images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
    """``{name: scores [N] float32}`` of every reward in ``rewards`` (local ones, as ``load_rewards``
    gives them, and ``RemoteReward``s), in ``rewards``' order; one request per reward process."""
    wanted: dict[int, tuple[RewardProcess, list[str]]] = {}
    for r in rewards.values():
        if isinstance(r, RemoteReward):
            wanted.setdefault(id(r.process), (r.process, []))[1].append(r.name)
    got = {
        (pid, n): v for pid, (p, names) in wanted.items() for n, v in p.score(images, prompts, names).items()
    }
    return {
        n: (
            got[(id(r.process), r.name)] if isinstance(r, RemoteReward) else r(images, prompts).scores
        ).float()
        for n, r in rewards.items()
    }
