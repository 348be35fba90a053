#!/usr/bin/env bash
# Everything the GPU checks of issue 7 need, in one device call; results land in $OUT.
#
#   bash bench/gpu_session.sh SHARDS_DIR [DEADLINE_S]
#
# Run from the repository root on the GPU machine, which has torch, accelerate and tensorboard but
# reaches no package index. `bash bench/gpu_prepare.sh` (here, with PyPI and ../shared) makes the two
# git-ignored folders to carry: .whl/ (the peers' and our missing dependencies as wheels) and
# .gpu/cifar/ (CIFAR-10 JPEG shards for the loop); then SHARDS_DIR is .gpu/cifar.
# DEADLINE_S (default 450) bounds bench/train_speed.py: it skips sections that would not finish.
# SECTIONS=table,profile runs only those groups of train_speed.py (see its --only), e.g. to split
# the run over two device calls. ZERO2=1 adds the one-GPU bf16 DeepSpeed ZeRO-2 train, resume and
# export check (about 2 min more).
set -u
shards=${1:?usage: bash bench/gpu_session.sh SHARDS_DIR [DEADLINE_S]}
deadline=${2:-450}
out=${OUT:-/tmp/gpu-session}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed: is .whl/ carried?" >&2; exit 2; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
git log -1 --format='%H %s' > "$out/commit.txt" 2>/dev/null || true
python3 bench/train_speed.py --out "$out/train_speed.jsonl" --shards "$shards" --deadline "$deadline" \
    ${SECTIONS:+--only "$SECTIONS"}

# Optional, ZERO2=1: the one-GPU bf16 DeepSpeed ZeRO-2 check (train 200 steps, resume to 300, export).
if [ "${ZERO2:-0}" = 1 ]; then
    z2=/tmp/z2gpu; rm -rf "$z2" "$z2-export"
    args=(configs/demo.yaml "run_dir=$z2" train.deepspeed=configs/deepspeed/zero2.json train.mixed_precision=bf16
          ckpt.every_steps=100 log.every_steps=20)
    { timeout 240 python3 -m pipeline.train "${args[@]}" train.max_steps=200 &&
      timeout 180 python3 -m pipeline.train "${args[@]}" train.max_steps=300 &&
      timeout 60 python3 -m pipeline.cli.export "$z2" "$z2-export"; } 2>&1 | tee "$out/zero2.log"
    grep -q "resumed from .*step-00000200" "$out/zero2.log" && echo "ZERO2 resume: ok" | tee -a "$out/zero2.log"
fi
