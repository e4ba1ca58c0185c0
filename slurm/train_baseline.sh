#!/usr/bin/env bash
# GRPO baseline: the model's own vocabulary only (experiment=baseline, model.reasoning_vocab_size=0).
#   sbatch slurm/train_baseline.sh [hydra overrides...]
#   e.g. sbatch slurm/train_baseline.sh training.learning_rate=3e-6 seed=1
#SBATCH --job-name=rlvr-baseline
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
run_training "$here/$(basename "${BASH_SOURCE[0]}")" experiment=baseline "$@"
