#!/usr/bin/env bash
# Download -> convert -> calibrate TEAL thresholds for a Hub model, e.g.
#   scripts/prepare.sh meta-llama/Meta-Llama-3-8B-Instruct calibration.txt [--hf_token TOKEN]
set -euo pipefail
repo=$1; text=$2; shift 2
dir=checkpoints/$repo
python scripts/download.py --repo_id "$repo" --out "$dir" "$@"
python scripts/convert_hf_checkpoint.py --checkpoint_dir "$dir"
python calibrate.py --checkpoint_path "$dir" --text "$text"
