#!/usr/bin/env bash
# The GPU check in one prepared run: launch/bench.py gpu with every section, on a GPU machine
# that reaches no package index (docs/benchmarks.md: The GPU check).
#
#   bash launch/gpu_check.sh prepare RAW   # here: wheels, raw data and the compared commit -> .gpu/
#   bash launch/gpu_check.sh smoke OUT     # here, on the CPU: the same run, every section tiny
#   bash launch/gpu_check.sh run OUT       # on the GPU machine (carry .gpu): the check -> OUT
#
# RAW holds omniglot/images_{background,evaluation}.zip and emnist/emnist.zip (what
# `hmaml pack download` fetches). Both codes pack their own packs from it there (each reads its
# own pack format). OUT receives gpu.json (rewritten after every section), the sweeps'
# summaries (.md, .png) and, on the GPU machine, nvidia-smi.txt and stderr.log: 7 files.
set -euo pipefail
cd "$(dirname "$0")/.."

# The code before the speed rewrite: 69.13 % on an H200 in train_run, where the rewrite gave
# 53.82 (bf16) / 57.11 % (fp32) on an H100 (docs/benchmarks.md: The GPU check).
COMPARE=3903106
WHEELS=(omegaconf==2.4.0 webdataset==1.0.2 braceexpand==0.1.7 submitit==1.5.4)

check() {
    local out=$1
    shift
    mkdir -p "$out"
    python3 launch/bench.py gpu --raw .gpu/raw --packs .gpu/shards \
        --compare-commit "$COMPARE" --compare-src ".gpu/code-$COMPARE" \
        --compare-packs ".gpu/shards-$COMPARE" --out "$out" "$@"
}

case "${1:-}" in
    prepare)
        raw=${2:?usage: gpu_check.sh prepare RAW}
        mkdir -p .gpu/wheels .gpu/raw/omniglot .gpu/raw/emnist
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform any -d .gpu/wheels "${WHEELS[@]}"
        cp "$raw"/omniglot/images_background.zip "$raw"/omniglot/images_evaluation.zip \
            .gpu/raw/omniglot/
        cp "$raw"/emnist/emnist.zip .gpu/raw/emnist/
        if [ ! -f ".gpu/code-$COMPARE/launch/train.py" ]; then
            mkdir -p ".gpu/code-$COMPARE"
            git archive "$COMPARE" | tar -x -C ".gpu/code-$COMPARE"
        fi
        du -sh .gpu
        ;;
    smoke)
        check "${2:?usage: gpu_check.sh smoke OUT}" --device cpu --smoke
        ;;
    run)
        out=${2:?usage: gpu_check.sh run OUT}
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .gpu/wheels/*.whl
        export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
        mkdir -p "$out"
        nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
        check "$out" --workdir /tmp/hmaml-gpu 2> >(tee "$out/stderr.log" >&2)
        ;;
    *)
        sed -n 2,11p "$0"
        exit 2
        ;;
esac
