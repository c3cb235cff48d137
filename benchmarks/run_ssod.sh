#!/usr/bin/env bash
# SSOD against the baseline Classifier with the same network (resnet10t_os4, a 7x7 map), data, augmentation,
# optimiser, schedule and 5 epochs, on both offline Fashion-MNIST benchmarks with 3 seeds; then SSOD's
# gamma x alpha sweep on the open-set benchmark (seed 0), chosen on ID validation accuracy only. Resumable: a
# run whose ood_results.json exists is skipped, a run cut short starts again. Prints the Markdown for
# docs/ssod.md at the end (benchmarks/ssod_table.py).
#   bash benchmarks/run_ssod.sh            # compare, sweep, table (about 6-7 h on 2 idle CPU cores)
#   bash benchmarks/run_ssod.sh compare    # 12 runs: {ssod, baseline} x {fashionmnist, openset} x 3 seeds
#   bash benchmarks/run_ssod.sh sweep      # 6 settings (one is the comparison's open-set seed-0 SSOD run)
#   bash benchmarks/run_ssod.sh table      # only the tables, from what has finished
# Results: $OUT/compare/<benchmark>/<ssod|baseline>/seed<k>/, $OUT/sweep/gamma<g>_alpha<a>/ (each with
# ood_results.{json,csv,md}, plots/ and log/version_0/{metrics.csv,checkpoints/}).
# Environment: PY (python), OUT (results/ssod), SEEDS ("0 1 2"), GAMMAS ("0.9 0.95 0.99"), ALPHAS ("0.1 1"),
# EXTRA (more train.py arguments for every run, e.g. EXTRA=--trainer.accelerator=gpu).
# To compare the sweep's chosen setting too: SSOD_ARGS="--model.init_args.gamma=G --model.init_args.alpha=A"
# SSOD_NAME=ssod_gG_aA bash benchmarks/run_ssod.sh compare (the baseline runs are reused, they are done).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-results/ssod}
SEEDS=${SEEDS:-"0 1 2"}
GAMMAS=${GAMMAS:-"0.9 0.95 0.99"}
ALPHAS=${ALPHAS:-"0.1 1"}
SSOD_ARGS=${SSOD_ARGS:-}
SSOD_NAME=${SSOD_NAME:-ssod}
EXTRA=${EXTRA:-}
STAGE=${1:-all}
# The configs' own gamma / alpha: the sweep reuses the comparison's seed-0 open-set run for this setting.
DEFAULT_GAMMA=0.95
DEFAULT_ALPHA=1
export WANDB_SILENT=true

run() {  # run <output dir> <train.py arguments...>
  local out=$1
  shift
  if [ -f "$out/ood_results.json" ]; then echo "skip $out (done)"; return; fi
  rm -rf "$out"
  mkdir -p "$out"
  echo "run  $out"
  # shellcheck disable=SC2086  # EXTRA may hold several arguments
  $PY train.py "$@" $EXTRA \
    --trainer.logger=lightning.pytorch.loggers.CSVLogger --trainer.logger.save_dir="$out" \
    --trainer.logger.name=log --trainer.logger.version=0 \
    --trainer.enable_progress_bar=false --ood_eval.output_dir="$out" --ood_eval.print_table=false \
    > "$out/train.log" 2>&1 || { echo "FAILED $out (see $out/train.log)"; return 1; }
}

compare() {
  for bench in fashionmnist fashionmnist_openset; do
    for seed in $SEEDS; do
      # shellcheck disable=SC2086
      run "$OUT/compare/$bench/$SSOD_NAME/seed$seed" --config configs/ssod_fashionmnist.yaml \
        --data configs/data/$bench.yaml --seed_everything "$seed" $SSOD_ARGS
      run "$OUT/compare/$bench/baseline/seed$seed" --config configs/ssod_baseline_fashionmnist.yaml \
        --data configs/data/$bench.yaml --seed_everything "$seed"
    done
  done
}

sweep() {
  mkdir -p "$OUT/sweep"
  for gamma in $GAMMAS; do
    for alpha in $ALPHAS; do
      out="$OUT/sweep/gamma${gamma}_alpha${alpha}"
      same="$OUT/compare/fashionmnist_openset/ssod/seed0"
      if [ "$gamma" = "$DEFAULT_GAMMA" ] && [ "$alpha" = "$DEFAULT_ALPHA" ] && [ -f "$same/ood_results.json" ]; then
        [ -e "$out" ] || ln -s "$(cd "$same" && pwd)" "$out"  # the same config and seed: bit-identical on CPU
        echo "skip $out (= $same)"
        continue
      fi
      run "$out" --config configs/ssod_fashionmnist.yaml --data configs/data/fashionmnist_openset.yaml \
        --seed_everything 0 --model.init_args.gamma="$gamma" --model.init_args.alpha="$alpha"
    done
  done
}

case "$STAGE" in
  compare) compare ;;
  sweep) sweep ;;
  table) ;;
  all) compare; sweep ;;
  *) echo "usage: $0 [compare|sweep|table|all]" >&2; exit 2 ;;
esac
$PY benchmarks/ssod_table.py "$OUT" --ssod-name "$SSOD_NAME"
