#!/usr/bin/env bash
# DiffGuard protecting the quickstart classifiers on both offline Fashion-MNIST benchmarks (docs/results.md,
# "DiffGuard"). Step 1 trains the diffusion model unless DIFFUSION points at one; step 2 evaluates DiffGuard on
# each benchmark with a seeded subset of the test sets: TEST_LIMIT ID test images and OOD_LIMIT images per OOD
# set (data seed 0), the combined score standardised on VAL_IMAGES ID validation images; PRESET picks the setting
# (cfg_latent, or cg_pixel), STEPS / GUIDANCE / REFERENCE / T_STAR / GRAD_CAM override it when set, BENCHMARKS
# picks the benchmarks. The results page's DiffGuard section ran the old defaults, which are (but for the L1
# logits distance) STEPS=10 REFERENCE=unconditional T_STAR=1.0 GRAD_CAM=false.
# Resumable: a step whose result file exists is skipped (delete its folder to redo it).
#   CLASSIFIER_FMNIST=<ckpt> CLASSIFIER_OPENSET=<ckpt> bash benchmarks/run_diffguard.sh
# Writes $OUT/{diffusion,fashionmnist,fashionmnist_openset}/ and prints the Markdown tables.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-results/diffguard}
CLASSIFIER_FMNIST=${CLASSIFIER_FMNIST:-results/fashionmnist/seed0/checkpoints/best-epoch=001.ckpt}
CLASSIFIER_OPENSET=${CLASSIFIER_OPENSET:-results/fashionmnist_openset/seed0/checkpoints/best-epoch=001.ckpt}
PRESET=${PRESET:-cfg_latent}
STEPS=${STEPS:-}
REFERENCE=${REFERENCE:-}
T_STAR=${T_STAR:-}
GRAD_CAM=${GRAD_CAM:-}   # true / false: override the preset's Grad-CAM mask
TEST_LIMIT=${TEST_LIMIT:-300}
OOD_LIMIT=${OOD_LIMIT:-100}
VAL_IMAGES=${VAL_IMAGES:-200}
GUIDANCE=${GUIDANCE:-}   # classifier_free or classifier (the protected classifier guides; use another OUT)
BENCHMARKS=${BENCHMARKS:-fashionmnist fashionmnist_openset}
COMMON=(--trainer.logger=false --trainer.enable_progress_bar=false --ood_eval.print_table=false)
mkdir -p "$OUT"

# 1. The class-conditional diffusion model (configs/diffusion_fashionmnist.yaml), unless given.
DIFFUSION=${DIFFUSION:-}
if [ -z "$DIFFUSION" ]; then
  DIFFUSION=$(ls "$OUT"/diffusion/checkpoints/best-*.ckpt 2>/dev/null | head -1 || true)
  if [ -z "$DIFFUSION" ]; then
    start=$(date +%s)
    $PY train.py --config configs/diffusion_fashionmnist.yaml "${COMMON[@]}" --trainer.default_root_dir "$OUT/diffusion"
    echo $(( $(date +%s) - start )) > "$OUT/diffusion/wall_seconds.txt"
    DIFFUSION=$(ls "$OUT"/diffusion/checkpoints/best-*.ckpt | head -1)
  fi
fi
echo "diffusion model: $DIFFUSION"

# 2. DiffGuard on each benchmark, on seeded subsets of the test sets.
limited_data() {  # $1: shipped data config, $2: output path
  $PY - "$1" "$2" "$TEST_LIMIT" "$OOD_LIMIT" <<'PYEOF'
import sys, yaml
src, dst, test_limit, ood_limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
config = yaml.safe_load(open(src))
args = config["init_args"]
args["test_limit"] = test_limit
for spec in args["ood_sets"]:
    spec["limit"] = min(ood_limit, spec.get("limit") or ood_limit)
yaml.safe_dump(config, open(dst, "w"), sort_keys=False)
PYEOF
}
for bench in $BENCHMARKS; do
  dir="$OUT/$bench"
  [ -f "$dir/ood_results.json" ] && { echo "$bench: done"; continue; }
  mkdir -p "$dir"
  limited_data "configs/data/$bench.yaml" "$dir/data.yaml"
  classifier=$CLASSIFIER_FMNIST; [ "$bench" = fashionmnist_openset ] && classifier=$CLASSIFIER_OPENSET
  start=$(date +%s)
  $PY evaluate.py --config configs/diffguard_fashionmnist.yaml "${COMMON[@]}" --data "$dir/data.yaml" \
    --model.init_args.classifier "$classifier" --model.init_args.diffusion "$DIFFUSION" \
    --model.init_args.preset "$PRESET" --model.init_args.combine_val_images "$VAL_IMAGES" \
    ${STEPS:+--model.init_args.steps "$STEPS"} ${GUIDANCE:+--model.init_args.guidance "$GUIDANCE"} \
    ${REFERENCE:+--model.init_args.reference "$REFERENCE"} ${T_STAR:+--model.init_args.t_star "$T_STAR"} \
    ${GRAD_CAM:+--model.init_args.grad_cam "$GRAD_CAM"} \
    --trainer.default_root_dir "$dir" --ood_eval.output_dir "$dir" \
    --trainer.callbacks.init_args.output_dir "$dir"
  echo $(( $(date +%s) - start )) > "$dir/wall_seconds.txt"
done

for bench in $BENCHMARKS; do
  $PY benchmarks/diffguard_table.py "$OUT/$bench/ood_results.json" --title "\`$bench\`"
  $PY benchmarks/results_table.py "$OUT/$bench/ood_results.json" \
    --title "DiffGuard on \`$bench\` (preset $PRESET, ${STEPS:-preset} DDIM steps; $TEST_LIMIT ID / $OOD_LIMIT per OOD set; $(cat "$OUT/$bench/wall_seconds.txt") s)"
done
