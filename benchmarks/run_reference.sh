#!/usr/bin/env bash
# The results page (docs/results.md): every method on the reference recipe, on both offline Fashion-MNIST
# benchmarks, 3 seeds, every detector, bootstrap intervals, wall times. Resumable: a run whose ood_results.json
# exists is skipped, a run cut short starts again.
#   bash benchmarks/run_reference.sh                 # train, derived, table (2 CPU cores: about 30 h; see below)
#   ACCEL=gpu PARALLEL=8 bash benchmarks/run_reference.sh    # one GPU, 8 runs at a time
#   bash benchmarks/run_reference.sh table           # only the tables, from what has finished
# Stage `train` (independent runs): the reference Classifier (configs/reference_<benchmark>.yaml), SSOD on the same
# network, optimiser and 20 epochs (configs/model/ssod_reference.yaml), OODformer (configs/oodformer_fashionmnist
# .yaml, its own tiny-ViT recipe) and, per benchmark, the class-conditional diffusion model
# (configs/diffusion_fashionmnist.yaml, trained on that benchmark's ID classes, seed 0).
# Stage `derived` (on each seed's reference Classifier checkpoint): the heatmap decoder (run_heatmap.sh's budget:
# half an epoch), the frozen encoder (the classifier as a frozen feature extractor: kNN, Mahalanobis, RMD, linear
# probe) and DiffGuard (preset DG_PRESET, DG_STEPS DDIM steps, full test sets unless DG_TEST_LIMIT / DG_OOD_LIMIT
# are set).
# Stage `table`: `python -m lightning_ood.compare` over every run (Markdown, CSV, plot in $OUT/compare/) and the
# per-run wall times.
# Results: $OUT/<benchmark>/<method>/seed<k>/ (ood_results.{json,csv,md}, train.log, wall_s, log/version_0/).
# Environment: PY, OUT (results/reference), BENCHMARKS, SEEDS ("0 1 2"), METHODS (the train-stage methods:
# "classifier ssod oodformer diffusion"), DERIVED ("heatmap frozen_encoder diffguard"), ACCEL (cpu), PARALLEL (1),
# BOOTSTRAP (1000 resamples for the intervals), DG_PRESET (cfg_latent), DG_STEPS (25; the results page's DiffGuard
# rows ran the old defaults with 10, docs/results.md), DG_TEST_LIMIT / DG_OOD_LIMIT (unset: whole sets).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-results/reference}
BENCHMARKS=${BENCHMARKS:-"fashionmnist fashionmnist_openset"}
SEEDS=${SEEDS:-"0 1 2"}
METHODS=${METHODS:-"classifier ssod oodformer diffusion"}
DERIVED=${DERIVED:-"heatmap frozen_encoder diffguard"}
ACCEL=${ACCEL:-cpu}
PARALLEL=${PARALLEL:-1}
BOOTSTRAP=${BOOTSTRAP:-1000}
DG_PRESET=${DG_PRESET:-cfg_latent}
DG_STEPS=${DG_STEPS:-25}
DG_TEST_LIMIT=${DG_TEST_LIMIT:-}
DG_OOD_LIMIT=${DG_OOD_LIMIT:-}
export PY OUT ACCEL BOOTSTRAP DG_PRESET DG_STEPS DG_TEST_LIMIT DG_OOD_LIMIT WANDB_SILENT=true
OODFORMER_OPENSET_AUG='[{class_path: torchvision.transforms.v2.RandomResizedCrop, init_args: {size: 28, scale: [0.2, 1.0]}}, {class_path: torchvision.transforms.v2.RandomHorizontalFlip}]'

best() { ls "$1"/log/version_0/checkpoints/best-*.ckpt 2>/dev/null | head -1 || true; }

run() {  # run <output dir> <train.py | evaluate.py> <arguments...>
  local out=$1 entry=$2
  shift 2
  if [ -f "$out/ood_results.json" ]; then echo "skip $out (done)"; return; fi
  rm -rf "$out"
  mkdir -p "$out"
  echo "run  $out ($(date -u +%H:%M:%S))"
  local start
  start=$(date +%s)
  $PY "$entry" "$@" --trainer.accelerator="$ACCEL" \
    --trainer.logger=lightning.pytorch.loggers.CSVLogger --trainer.logger.save_dir="$out" \
    --trainer.logger.name=log --trainer.logger.version=0 --trainer.enable_progress_bar=false \
    --ood_eval.output_dir="$out" --ood_eval.print_table=false --ood_eval.bootstrap="$BOOTSTRAP" \
    > "$out/train.log" 2>&1 || { echo "FAILED $out (see $out/train.log)"; return 1; }
  echo $(( $(date +%s) - start )) > "$out/wall_s"
}

limited_data() {  # limited_data <shipped data config> <output path>: seeded subsets of the test sets for DiffGuard
  $PY - "$1" "$2" "$DG_TEST_LIMIT" "$DG_OOD_LIMIT" <<'PYEOF'
import sys, yaml
src, dst, test_limit, ood_limit = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
config = yaml.safe_load(open(src))
if test_limit:
    config["init_args"]["test_limit"] = int(test_limit)
if ood_limit:
    for spec in config["init_args"]["ood_sets"]:
        spec["limit"] = min(int(ood_limit), spec.get("limit") or int(ood_limit))
yaml.safe_dump(config, open(dst, "w"), sort_keys=False)
PYEOF
}

one() {  # one <method> <benchmark> <seed>: a single run
  local method=$1 bench=$2 seed=$3
  local dir="$OUT/$bench/$method/seed$seed" clf
  clf=$(best "$OUT/$bench/classifier/seed$seed")
  case "$method" in
    classifier)
      run "$dir" train.py --config "configs/reference_$bench.yaml" --seed_everything "$seed" ;;
    ssod)
      run "$dir" train.py --config "configs/reference_$bench.yaml" --model configs/model/ssod_reference.yaml \
        --seed_everything "$seed" ;;
    oodformer)
      if [ "$bench" = fashionmnist ]; then
        run "$dir" train.py --config configs/oodformer_fashionmnist.yaml --seed_everything "$seed"
      else  # --data replaces the whole data section: the paper's augmentation again
        run "$dir" train.py --config configs/oodformer_fashionmnist.yaml --seed_everything "$seed" \
          --data "configs/data/$bench.yaml" --data.train_transforms="$OODFORMER_OPENSET_AUG"
      fi ;;
    diffusion)  # no OOD evaluation: done when its best checkpoint exists
      dir="$OUT/$bench/diffusion"
      if [ -n "$(best "$dir")" ]; then echo "skip $dir (done)"; return; fi
      rm -rf "$dir" && mkdir -p "$dir"
      echo "run  $dir ($(date -u +%H:%M:%S))"
      local start
      start=$(date +%s)
      $PY train.py --config configs/diffusion_fashionmnist.yaml --data "configs/data/$bench.yaml" \
        --data.init_args.train_transforms=[] --data.init_args.batch_size=64 --trainer.accelerator="$ACCEL" \
        --trainer.logger=lightning.pytorch.loggers.CSVLogger --trainer.logger.save_dir="$dir" \
        --trainer.logger.name=log --trainer.logger.version=0 --trainer.enable_progress_bar=false \
        --trainer.callbacks.init_args.output_dir="$dir/samples" \
        > "$dir/train.log" 2>&1 || { echo "FAILED $dir (see $dir/train.log)"; return 1; }
      echo $(( $(date +%s) - start )) > "$dir/wall_s" ;;
    heatmap)
      run "$dir" train.py --config configs/heatmap_fashionmnist.yaml --data "configs/data/${bench}_heatmap.yaml" \
        --seed_everything "$seed" --model.init_args.classifier_ckpt="$clf" --trainer.max_epochs=1 \
        --trainer.limit_train_batches=0.5 --trainer.limit_val_batches=4 ;;
    frozen_encoder)
      run "$dir" evaluate.py --config configs/frozen_encoder_fashionmnist.yaml --data "configs/data/$bench.yaml" \
        --seed_everything "$seed" --model.init_args.encoder.init_args.checkpoint="$clf" ;;
    diffguard)
      mkdir -p "$OUT/$bench/diffguard"
      limited_data "configs/data/$bench.yaml" "$OUT/$bench/diffguard/data.yaml"
      run "$dir" evaluate.py --config configs/diffguard_fashionmnist.yaml --data "$OUT/$bench/diffguard/data.yaml" \
        --seed_everything "$seed" --model.init_args.classifier="$clf" \
        --model.init_args.diffusion="$(best "$OUT/$bench/diffusion")" --model.init_args.steps="$DG_STEPS" \
        --model.init_args.preset="$DG_PRESET" \
        --trainer.callbacks.init_args.output_dir="$dir/regenerations" ;;
    *) echo "unknown method $method" >&2; return 2 ;;
  esac
}

stage() {  # stage <methods...>: every (method, benchmark, seed) run, PARALLEL at a time
  local jobs=()
  for method in "$@"; do
    for bench in $BENCHMARKS; do
      if [ "$method" = diffusion ]; then jobs+=("$method $bench 0"); continue; fi
      for seed in $SEEDS; do jobs+=("$method $bench $seed"); done
    done
  done
  [ ${#jobs[@]} -eq 0 ] && return
  printf '%s\n' "${jobs[@]}" | xargs -P "$PARALLEL" -L 1 bash "$0" _one || echo "some runs FAILED (see above)"
}

table() {
  mkdir -p "$OUT/compare"
  for bench in $BENCHMARKS; do
    # shellcheck disable=SC2046  # one argument per finished run
    $PY -m lightning_ood.compare $(ls -d "$OUT/$bench"/*/seed* 2>/dev/null) --out "$OUT/compare/$bench" || true
  done
  $PY benchmarks/reference_walltimes.py "$OUT"
}

case "${1:-all}" in
  _one) shift; one "$@" ;;
  train) stage $METHODS ;;
  derived) stage $DERIVED ;;
  table) table ;;
  all) stage $METHODS; stage $DERIVED; table ;;
  *) echo "usage: $0 [all|train|derived|table]" >&2; exit 2 ;;
esac
