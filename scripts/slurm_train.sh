#!/bin/bash
# Multi-node training on a SLURM cluster:
#   sbatch scripts/slurm_train.sh [overrides]                 e.g. trainer=fsdp model.n_layer=12
#   sbatch --nodes=4 scripts/slurm_train.sh [overrides]       (the #SBATCH lines are defaults)
# SLURM starts one task per GPU on every node (srun); Lightning reads the ranks from SLURM's
# environment. All tasks write to one run directory, logs/train/slurm/<job id>, which must be
# on a filesystem every node sees. 90 s before the time limit SLURM sends SIGUSR1: Lightning
# saves a checkpoint there and requeues the job, and the requeued job resumes from it.
#SBATCH --job-name=lmforge
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=SIGUSR1@90
#SBATCH --requeue
#SBATCH --output=%x-%j.out

set -euo pipefail

if [[ -f .venv/bin/activate ]]; then
    source .venv/bin/activate
fi
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"

# The run directory is named after the job, not the clock, so that a requeued job finds it.
srun lmforge train trainer=ddp \
    trainer.num_nodes="$SLURM_NNODES" \
    trainer.devices="$SLURM_NTASKS_PER_NODE" \
    'hydra.run.dir=${paths.log_dir}/${task_name}/slurm/'"$SLURM_JOB_ID" \
    "$@"
