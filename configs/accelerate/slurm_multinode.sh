#!/usr/bin/env bash
# SLURM: 2 nodes x 8 GPUs, one launcher task per node (accelerate starts the 8 processes).
#   sbatch configs/accelerate/slurm_multinode.sh configs/sd3_adjoint_matching.yaml run.output_dir=/shared/runs/am
#SBATCH --job-name=genalign
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --signal=B:TERM@300   # SIGTERM 5 min before the time limit: genalign checkpoints and stops
#SBATCH --requeue             # a pre-empted or timed-out job restarts and resumes (--resume below)
set -euo pipefail
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
GPUS_PER_NODE=8
srun --kill-on-bad-exit=1 bash -c "accelerate launch --config_file configs/accelerate/ddp_multinode.yaml \
    --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
    --machine_rank \$SLURM_NODEID --main_process_ip $MAIN_IP --main_process_port 29500 \
    -m genalign train $* --resume" &
wait   # the shell waits so that SLURM's SIGTERM reaches srun and the training processes
