"""The accelerate launch configs in configs/accelerate/ are what accelerate 1.16 reads: every key is
one its config loader or its launch command knows (a misspelt key fails here, where accelerate would
refuse it at launch or, inside fsdp_config / deepspeed_config, silently ignore it), and the
multi-node files resolve, per node, to the torchrun arguments and the engine the README documents.
Multi-node itself is not run here (one machine): this checks everything up to torchrun."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from diffalign.train import engines

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs/accelerate").glob("*.yaml"))
MULTINODE = {"multinode_ddp.yaml": "ddp", "multinode_fsdp2.yaml": "fsdp2"}


def launch_options() -> set[str]:
    """Every option ``accelerate launch`` accepts (the names nested config keys are copied to)."""
    from accelerate.commands.launch import launch_command_parser

    return set(vars(launch_command_parser().parse_args(["x.py"])))


def test_the_multinode_configs_exist():
    assert set(MULTINODE) <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_key_is_one_accelerate_reads(path):
    """accelerate's own loader (``accelerate launch --config_file`` calls it) refuses unknown
    top-level keys and distributed types; the keys inside ``fsdp_config`` / ``deepspeed_config`` are
    copied onto launch options (fsdp ones with an ``fsdp_`` prefix), so each must name one."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    cfg = load_config_from_file(str(path))  # ValueError on an unknown key or distributed_type
    assert isinstance(cfg, ClusterConfig)
    raw = yaml.safe_load(path.read_text())
    options = launch_options()
    for key in raw.get("fsdp_config") or {}:
        assert (key if key.startswith("fsdp") else "fsdp_" + key) in options, f"fsdp_config.{key}"
    for key in raw.get("deepspeed_config") or {}:
        assert key in options, f"deepspeed_config.{key}"
    assert raw["mixed_precision"] == "no"  # diffalign sets precision from train.mixed_precision
    assert cfg.num_processes % cfg.num_machines == 0  # M processes on each of N machines


def resolve(path: Path, *flags: str) -> tuple[dict[str, str], object]:
    """What ``accelerate launch --config_file path *flags -m diffalign.cli train c.yaml`` hands to
    torchrun on this node (its environment and arguments), through accelerate's own code."""
    import torch.distributed.run as distrib_run
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import _filter_args, prepare_multi_gpu_env

    argv = ["--config_file", str(path), *flags, "-m", "diffalign.cli", "train", "c.yaml"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    env = prepare_multi_gpu_env(args)
    script = ["--training_script", args.training_script, "--training_script_args", args.training_script_args]
    return env, _filter_args(args, distrib_run.get_args_parser(), script)


@pytest.mark.parametrize("name", list(MULTINODE))
@pytest.mark.parametrize("rank", [0, 1])
def test_multinode_config_resolves_per_node(name, rank, monkeypatch):
    """One file for every node, --machine_rank on each node's command line: torchrun gets N nodes of
    M processes, this node's rank, the main node's address, and the static rendezvous the file
    states (so global rank 0, the writer, is on machine_rank 0); the processes then pick the engine
    (diffalign reads the environment accelerate sets)."""
    import accelerate.utils.launch

    # the main node checks its port is free; other tests on this machine may hold the default one
    monkeypatch.setattr(accelerate.utils.launch, "is_port_in_use", lambda port: False)
    path = REPO / "configs/accelerate" / name
    raw = yaml.safe_load(path.read_text())
    n, world = raw["num_machines"], raw["num_processes"]
    env, run = resolve(path, "--machine_rank", str(rank))
    assert run.nnodes == str(n) and run.nproc_per_node == str(world // n)
    assert run.node_rank == rank
    assert run.rdzv_backend == raw["rdzv_backend"] == "static"
    assert raw["same_network"] is False  # what accelerate 1.16 uses unless --same_network is passed
    assert run.rdzv_endpoint == f"{raw['main_process_ip']}:{raw['main_process_port']}"
    assert run.module and run.training_script == "diffalign.cli"
    engine = engines.engine_from_launch({**env, "WORLD_SIZE": str(world)})
    assert engine == engines.Engine(MULTINODE[name], world)
    # the command line wins over the file (how SLURM passes the allocation)
    _, other = resolve(
        path,
        *("--machine_rank", "3", "--num_machines", "4", "--num_processes", "32"),
        *("--main_process_ip", "node-a", "--main_process_port", "29600"),
    )
    assert (other.nnodes, other.nproc_per_node, other.node_rank) == ("4", "8", 3)
    assert other.rdzv_endpoint == "node-a:29600"


def test_slurm_script_gives_each_node_its_rank(tmp_path):
    """configs/accelerate/slurm_multinode.sh under stand-ins for scontrol, srun (two tasks, one per
    node) and accelerate (prints its arguments): node i launches with --machine_rank i, all with the
    first node as main process and N x M processes."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    stubs = {
        "scontrol": 'printf "gpu-node-07\\ngpu-node-08\\n"',
        # srun: run the command once per node, as SLURM would, with that task's variables
        "srun": 'shift; for i in 0 1; do SLURM_NODEID=$i SLURM_PROCID=$i "$@"; done',
        "accelerate": 'echo "$@"',
    }
    for name, body in stubs.items():
        (bin_ / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_ / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
        "SLURM_NNODES": "2",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_SUBMIT_DIR": str(REPO),
    }
    script = REPO / "configs/accelerate/slurm_multinode.sh"
    out = subprocess.run(
        ["bash", str(script), "my.yaml", "train.output_dir=/shared/run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    assert len(out) == 2
    for i, line in enumerate(out):
        assert line == (
            "launch --config_file configs/accelerate/multinode_fsdp2.yaml --num_machines 2 "
            f"--num_processes 16 --machine_rank {i} --main_process_ip gpu-node-07 "
            "--main_process_port 29500 -m diffalign.cli train my.yaml train.output_dir=/shared/run"
        )


def test_deepspeed_setup_fills_what_accelerate_leaves_to_the_caller():
    """Under DeepSpeed, accelerate fills ``train_micro_batch_size_per_gpu: auto`` only from a
    DataLoader given to ``prepare`` (diffalign gives none) and keeps ``autocast()`` a no-op: the
    loop's ``deepspeed_setup`` sets the micro-batch and autocasts the inputs to the run's dtype."""
    from types import SimpleNamespace

    import torch

    from diffalign.train.engines import deepspeed_setup

    def fake():
        plugin = SimpleNamespace(deepspeed_config={"train_micro_batch_size_per_gpu": "auto"})
        return SimpleNamespace(
            state=SimpleNamespace(deepspeed_plugin=plugin),
            device=torch.device("cpu"),
            autocast=lambda autocast_handler=None: None,
        )

    acc = fake()
    deepspeed_setup(acc, 4, torch.bfloat16)
    assert acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 4
    with acc.autocast():
        y = torch.nn.functional.linear(torch.randn(2, 3), torch.randn(5, 3))
    assert y.dtype == torch.bfloat16
    fp32 = fake()
    before = fp32.autocast
    deepspeed_setup(fp32, 2, torch.float32)
    assert fp32.autocast is before  # fp32: nothing to autocast
