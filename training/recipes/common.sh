# Sourced by every recipe: strict shell, the default teacher, and `launch`, the one-process CPU launch the shipped
# models were trained with (no mixed precision, no dynamo; OMP_NUM_THREADS=1 keeps two trainings on two cores from
# slowing each other down: OpenMP threads spin-wait for a busy core). On a GPU: see the README of this folder.
set -euo pipefail
TEACHER=${TEACHER:-fashion-mnist-edm}

launch() {
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no \
    --dynamo_backend no "$@"
}
