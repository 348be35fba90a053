#!/usr/bin/env bash
# Everything the GPU checks of issue 7 need, in one device call; results land in $OUT.
#
#   bash bench/gpu_session.sh SHARDS_DIR [DEADLINE_S]
#
# Run from the repository root on the GPU machine. That machine has torch, accelerate and
# tensorboard but reaches no package index, so the peers and our other dependencies come as wheels
# in .whl/ (ignored; carried with the working tree): diffusers, ema-pytorch, denoising-diffusion-
# pytorch, webdataset, braceexpand, simplejpeg, importlib-metadata, pytorch-fid, torchdata.
# SHARDS_DIR holds CIFAR-10 JPEG shards made by
#   ddpm-shards ../shared/datasets/cifar10-jpg/train.tar SHARDS_DIR --per-class 1000 --shard-size 1000 --no-json
# DEADLINE_S (default 450) bounds bench/train_speed.py: it skips sections that would not finish.
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
python3 bench/train_speed.py --out "$out/train_speed.jsonl" --shards "$shards" --deadline "$deadline"
