#!/usr/bin/env bash
# The whole mavl chain on real radiographs: the 749-image, 64 px NIH ChestX-ray14 set,
# split by patient (60/20/20, seed 0), with the offline models (ImageNet EfficientNet-Lite0,
# MiniLM-L6). Images are read in place; nothing is copied.
#
#   examples/nih_pipeline.sh [DATA] [WORK]
#
# DATA: the nih-cxr14-64px folder (default $MAVL_SHARED_DATA/nih-cxr14-64px, else
# /work/shared/data/nih-cxr14-64px). WORK: output folder (default ./nih-work).
# 64 px is far below the 224 px the backbone expects and test positives are few:
# read the figures as a real-data pipeline check with wide confidence intervals.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATA="${1:-${MAVL_SHARED_DATA:-/work/shared/data}/nih-cxr14-64px}"
WORK="${2:-nih-work}"
WEIGHTS="${MAVL_HOME:-$HOME/.mavl}/weights/tf_efficientnet_lite0"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$WORK"

run() { echo "+ $*" >&2; "$@"; }

# 1. Patient-grouped split into CSVs whose paths are relative to $DATA/images.
run python "$HERE/../benchmarks/nih_split.py" "$DATA" -o "$WORK/split" --seed 0

# 2. Offline models: the ImageNet EfficientNet-Lite0 weights (converted once) and MiniLM.
[ -f "$WEIGHTS/model.safetensors" ] || run mavl import-weights efficientnet-lite0 -o "$WEIGHTS"
MINILM="$(python -c 'from mavl_cli.encoders.weights import minilm_folder; print(minilm_folder())')"
DESC="$(python -c 'from mavl_cli.stages.demo import descriptions_path; print(descriptions_path("nih14.json"))')"

# 3. Image features for each split.
for s in train val test; do
  run mavl embed-images "$DATA/images" --labels "$WORK/split/$s.csv" \
    --backbone tf_efficientnet_lite0 --weights "$WEIGHTS" -o "$WORK/${s}_img.safetensors"
done

# 4. LRF head on the 14 findings (early stopping on the validation split).
LABELS="$(python -c 'import json,sys; print(",".join(json.load(open(sys.argv[1]))))' "$DESC")"
run mavl train-lrf "$WORK/train_img.safetensors" --labels "$WORK/split/train.csv" --only "$LABELS" \
  --val "$WORK/val_img.safetensors" --val-labels "$WORK/split/val.csv" --seed 0 -o "$WORK/lrf.safetensors"

# 5. Label text: the 14 NIH findings described by visual aspects, encoded with MiniLM.
run mavl embed-text "$DESC" --text-model "$MINILM" -o "$WORK/text.safetensors"

# 6. Fusion, 7. thresholds on validation, 8. test report with patient-bootstrap CIs.
run mavl fuse "$WORK/train_img.safetensors" "$WORK/text.safetensors" --lrf "$WORK/lrf.safetensors" \
  --labels "$WORK/split/train.csv" --val "$WORK/val_img.safetensors" --val-labels "$WORK/split/val.csv" \
  --seed 0 -o "$WORK/model.safetensors"
run mavl tune-threshold "$WORK/model.safetensors" "$WORK/val_img.safetensors" --labels "$WORK/split/val.csv" \
  -o "$WORK/model_tuned.safetensors"
run mavl evaluate "$WORK/model_tuned.safetensors" "$WORK/test_img.safetensors" --labels "$WORK/split/test.csv" \
  --bootstrap 1000 --csv "$WORK/report.csv"
