#!/usr/bin/env bash
# N nodes x M GPUs under SLURM: one accelerate launcher per node (it starts the node's M processes).
#   sbatch --nodes=2 --gpus-per-node=8 configs/accelerate/slurm_multinode.sh CONFIG [key=value ...]
#   ACCEL_CONFIG=configs/accelerate/multinode_ddp.yaml sbatch ... (default: multinode_fsdp2.yaml)
# What differs per node is derived here: --machine_rank from SLURM_NODEID (0 on the first node of
# the allocation, whose address becomes --main_process_ip); num_machines and num_processes come from
# the allocation, so the yaml's values for them are overridden. Set train.output_dir to a folder on
# a filesystem every node mounts at the same path (README, "Scaling: multi-node"), and
# NCCL_SOCKET_IFNAME when the nodes have more than one network interface. Not run in CI
# (tests/test_launch_configs.py runs it with stand-ins for srun, scontrol and accelerate).
#SBATCH --job-name=diffalign
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}" # sbatch runs a copy of this script elsewhere; relative paths start here
ACCEL_CONFIG=${ACCEL_CONFIG:-configs/accelerate/multinode_fsdp2.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p) # sed reads all: no SIGPIPE
MAIN_PORT=${MAIN_PORT:-29500}
export ACCEL_CONFIG GPUS_PER_NODE MAIN_IP MAIN_PORT
# single quotes: SLURM_NODEID is each task's own, expanded on its node
srun --kill-on-bad-exit=1 bash -c 'exec accelerate launch --config_file "$ACCEL_CONFIG" \
    --num_machines "$SLURM_NNODES" --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
    --machine_rank "$SLURM_NODEID" --main_process_ip "$MAIN_IP" --main_process_port "$MAIN_PORT" \
    -m diffalign.cli train "$@"' launch "$@"
