#!/usr/bin/env bash
# Download -> convert -> calibrate TEAL thresholds for a Hub model:
#   scripts/prepare.sh REPO_ID TEXT [download.py options, e.g. --hf_token TOKEN]
# e.g. scripts/prepare.sh meta-llama/Meta-Llama-3-8B-Instruct calibration.txt
# In the checkout, the download stays in checkpoints/hf/REPO_ID; the converted checkpoint and its
# thresholds go to checkpoints/<model name>. Python: $PYTHON, else the checkout's .venv, else python3.
set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,6s/^# \{0,1\}//p' "$0"
    exit 0
fi
if [[ $# -lt 2 ]]; then
    echo "prepare.sh: error: expected REPO_ID TEXT (see --help)" >&2
    exit 2
fi
if [[ ! -f $2 ]]; then
    echo "error: text file not found: $2" >&2
    exit 1
fi
repo=$1; text=$(realpath -- "$2"); shift 2
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
[[ -x $py ]] || py=python3
hf=checkpoints/hf/$repo
out=checkpoints/${repo##*/}
"$py" scripts/download.py --repo_id "$repo" --out "$hf" "$@"
"$py" scripts/convert_hf_checkpoint.py --checkpoint_dir "$hf" --out "$out"
"$py" calibrate.py --checkpoint_path "$out" --text "$text"
