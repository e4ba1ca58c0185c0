#!/usr/bin/env bash
# GRPO with a reasoning vocabulary: new token rows the model may use while thinking (experiment=reasoning).
#   sbatch slurm/train_reasoning.sh [hydra overrides...]
#   e.g. sbatch slurm/train_reasoning.sh model.reasoning_vocab_size=75000
#SBATCH --job-name=rlvr-reasoning
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120

# Under sbatch this file runs from a copy in Slurm's spool dir: find the checkout from the job's record.
here=$(dirname "${BASH_SOURCE[0]}")
[ -f "$here/_common.sh" ] || here=$(dirname "$(scontrol show job -o "$SLURM_JOB_ID" | grep -oP 'Command=\K\S+')")
source "$here/_common.sh"
run_training "$here/$(basename "${BASH_SOURCE[0]}")" experiment=reasoning "$@"
