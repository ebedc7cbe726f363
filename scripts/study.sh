#!/usr/bin/env bash
# The README's quality study: mixtures against tuned, matched LoRA on CommonsenseQA and OpenBookQA with SmolLM2-135M.
#
#   bash scripts/study.sh [WORKERS_PER_TASK]      # default 1 (CPU); on one GPU, 4-8 per task share it
#
# For each task: carve the validation (and, for OBQA, test) slices with `molora split`, run the search phase of
# `molora sweep` (every arm x every learning rate on seed 0, scored on validation), then the final phase (each arm's
# selected setting on seeds 0-2, scored on the held-out split), then the merged tables in
# runs/study/<task>/sweep/summary.{md,json,png}. WORKERS_PER_TASK processes split each phase (--cells i/N); the two
# tasks run side by side. Resumable: run it again to finish what a killed run left.
#
# Environment: DATA (the MoLA task files, default ../shared/data), ARMS, SEARCH, SEEDS, MOLORA (the command,
# default `molora`), EXTRA (more --section.key value overrides for every cell, e.g. "--train.max_steps 200").
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-1}
DATA=${DATA:-../shared/data}
MOLORA=${MOLORA:-molora}
LEV="@train.router_lr_multiplier=10@allocation.expert_init=orthogonal"   # the two router levers of the README
ARMS=${ARMS:-"▽$LEV,lora,lora-active,▽,□$LEV,auto:block-influence@allocation.auto_max=16$LEV,base"}
SEARCH=${SEARCH:-"train.learning_rate=2e-4,5e-4,1e-3"}
SEEDS=${SEEDS:-0,1,2}
EXTRA=${EXTRA:-}
for f in "$DATA/csqa/train.jsonl" "$DATA/csqa/validation.jsonl" "$DATA/obqa/train.jsonl"; do
  [ -f "$f" ] || { echo "study: $f not found (set DATA to the folder of the MoLA task files)" >&2; exit 2; }
done
$MOLORA split "$DATA/csqa/train.jsonl" --out runs/data/csqa --sizes dev=500 --seed 0
$MOLORA split "$DATA/obqa/train.jsonl" --out runs/data/obqa --sizes dev=500,test=500 --seed 0

run_task() {  # recipe, held-out file, log name
  local recipe=$1 heldout=$2 name=$3 phase i
  mkdir -p runs/study/logs
  for phase in search final; do
    for i in $(seq 1 "$W"); do
      # shellcheck disable=SC2086
      $MOLORA sweep "$recipe" --allocations "$ARMS" --seeds "$SEEDS" --search "$SEARCH" --phase $phase \
        --cells "$i/$W" --eval-file "$heldout" $EXTRA > "runs/study/logs/$name-$phase-$i.log" 2>&1 &
    done
    wait
  done
  # shellcheck disable=SC2086
  $MOLORA sweep "$recipe" --allocations "$ARMS" --seeds "$SEEDS" --search "$SEARCH" --eval-file "$heldout" $EXTRA \
    --report > "runs/study/logs/$name-report.log" 2>&1
}
run_task recipes/study/csqa_smollm2.yaml "$DATA/csqa/validation.jsonl" csqa &
run_task recipes/study/obqa_smollm2.yaml runs/data/obqa/test.jsonl obqa &
wait
echo "study: tables in runs/study/csqa/sweep/summary.md and runs/study/obqa/sweep/summary.md"
