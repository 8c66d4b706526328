#!/usr/bin/env bash
# The mavl chain, stage by stage, as a shell script.
#
#   examples/pipeline.sh DATA_DIR [WORK_DIR]
#
# DATA_DIR holds images/ plus train.csv, val.csv, test.csv (CheXpert-style: a Path column and one
# column per label with 1 / 0 / -1 / blank). `mavl phantoms DATA_DIR` makes such a folder.
# Set BACKBONE/WEIGHTS/TEXT_MODEL to use local models (defaults: the hub ids).
set -euo pipefail
DATA=${1:?usage: pipeline.sh DATA_DIR [WORK_DIR]}
WORK=${2:-mavl-work}
BACKBONE=${BACKBONE:-vit_base_patch16_224}
TEXT_MODEL=${TEXT_MODEL:-emilyalsentzer/Bio_ClinicalBERT}
DESCRIPTIONS=${DESCRIPTIONS:-$(dirname "$0")/descriptions/phantoms6.json}
W=()
if [[ -n "${WEIGHTS:-}" ]]; then W=(--weights "$WEIGHTS"); fi
mkdir -p "$WORK"

# 1. backbone features, one file per split
for split in train val test; do
  mavl embed-images "$DATA" --labels "$DATA/$split.csv" --backbone "$BACKBONE" "${W[@]}" -o "$WORK/${split}_img.safetensors"
done

# 2. low-rank feature learning (rank 64, truncated nuclear norm beyond the top 16 singular values)
mavl train-lrf "$WORK/train_img.safetensors" --labels "$DATA/train.csv" \
  --val "$WORK/val_img.safetensors" --val-labels "$DATA/val.csv" --rank 64 --keep 16 --eta 1e-3 -o "$WORK/lrf.safetensors"

# 3. label descriptions -> text embeddings
mavl embed-text "$DESCRIPTIONS" --text-model "$TEXT_MODEL" -o "$WORK/text.safetensors"

# 4. vision-language fusion (Adam, lr 1e-3, batch 64, 100 epochs; best epoch on validation)
mavl fuse "$WORK/train_img.safetensors" "$WORK/text.safetensors" --lrf "$WORK/lrf.safetensors" \
  --labels "$DATA/train.csv" --val "$WORK/val_img.safetensors" --val-labels "$DATA/val.csv" -o "$WORK/model.safetensors"

# 5. thresholds on VALIDATION data only
mavl tune-threshold "$WORK/model.safetensors" "$WORK/val_img.safetensors" --labels "$DATA/val.csv" \
  --per-label -o "$WORK/model_tuned.safetensors"

# 6. report on the held-out TEST split, with bootstrap confidence intervals
mavl evaluate "$WORK/model_tuned.safetensors" "$WORK/test_img.safetensors" --labels "$DATA/test.csv" \
  --bootstrap 1000 --json > "$WORK/report.json"
mavl evaluate "$WORK/model_tuned.safetensors" "$WORK/test_img.safetensors" --labels "$DATA/test.csv" --plot "$WORK/report.png"

# 7. one image
first=$(sed -n 2p "$DATA/test.csv" | cut -d, -f1)
mavl predict "$DATA/$first" --model "$WORK/model_tuned.safetensors"
