#!/usr/bin/env bash
# The heatmap decoder (Hornauer & Belagiannis, WACV 2023) on the quickstart classifiers of
# benchmarks/run_results.sh: one decoder per classifier checkpoint, on both offline Fashion-MNIST benchmarks with
# 3 seeds (the decoder's seed = the classifier's). The classifiers are read, never written (their detector fit is
# cached beside each decoder checkpoint). Resumable: a run whose ood_results.json exists is skipped, a run cut
# short starts again. Prints the Markdown for docs/results.md at the end (benchmarks/heatmap_table.py).
#   bash benchmarks/run_heatmap.sh          # 6 runs
#   bash benchmarks/run_heatmap.sh table    # only the tables, from what has finished
# Results: $OUT/<benchmark>/seed<k>/ (ood_results.{json,csv,md}, plots/heatmaps_<set>.png, train.log and
# log/version_0/{metrics.csv,checkpoints/}).
# Environment: PY (python), OUT (results/heatmap), CLASSIFIERS (results: <CLASSIFIERS>/<benchmark>/seed<k>/
# checkpoints/best-epoch=001.ckpt, as benchmarks/run_results.sh writes them), BENCHMARKS ("fashionmnist
# fashionmnist_openset"), SEEDS ("0 1 2"), and the CPU
# budget: EPOCHS (1), TRAIN_FRACTION (0.5: of the 422 training batches of an epoch), VAL_BATCHES (4: the first
# 4 x 512 ID validation images, and every held-out outlier); EXTRA (more train.py arguments).
# The paper trains 150 epochs: EPOCHS=150 TRAIN_FRACTION=1.0 VAL_BATCHES=1.0 for its budget.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-results/heatmap}
CLASSIFIERS=${CLASSIFIERS:-results}
BENCHMARKS=${BENCHMARKS:-"fashionmnist fashionmnist_openset"}
SEEDS=${SEEDS:-"0 1 2"}
EPOCHS=${EPOCHS:-1}
TRAIN_FRACTION=${TRAIN_FRACTION:-0.5}
VAL_BATCHES=${VAL_BATCHES:-4}
EXTRA=${EXTRA:-}
STAGE=${1:-all}
export WANDB_SILENT=true

run() {  # run <output dir> <train.py arguments...>
  local out=$1
  shift
  if [ -f "$out/ood_results.json" ]; then echo "skip $out (done)"; return; fi
  rm -rf "$out"
  mkdir -p "$out"
  echo "run  $out ($(date -u +%H:%M:%S))"
  # shellcheck disable=SC2086  # EXTRA may hold several arguments
  $PY train.py "$@" --trainer.max_epochs="$EPOCHS" --trainer.limit_train_batches="$TRAIN_FRACTION" \
    --trainer.limit_val_batches="$VAL_BATCHES" $EXTRA \
    --trainer.logger=lightning.pytorch.loggers.CSVLogger --trainer.logger.save_dir="$out" \
    --trainer.logger.name=log --trainer.logger.version=0 \
    --trainer.enable_progress_bar=false --ood_eval.output_dir="$out" --ood_eval.print_table=false \
    > "$out/train.log" 2>&1 || { echo "FAILED $out (see $out/train.log)"; return 1; }
}

if [ "$STAGE" = all ]; then
  for bench in $BENCHMARKS; do
    for seed in $SEEDS; do
      ckpt="$CLASSIFIERS/$bench/seed$seed/checkpoints/best-epoch=001.ckpt"
      [ -f "$ckpt" ] || { echo "missing classifier $ckpt: run benchmarks/run_results.sh first" >&2; exit 1; }
      run "$OUT/$bench/seed$seed" --config configs/heatmap_fashionmnist.yaml \
        --data "configs/data/${bench}_heatmap.yaml" --seed_everything "$seed" \
        --model.init_args.classifier_ckpt="$ckpt"
    done
  done
elif [ "$STAGE" != table ]; then
  echo "usage: $0 [all|table]" >&2
  exit 2
fi
$PY benchmarks/heatmap_table.py "$OUT"
