#!/usr/bin/env bash
# Make what bench/gpu_session.sh needs to carry to the GPU machine, which reaches no package index:
#   .whl/        the peers' and our missing dependencies as CPython 3.12 wheels (about 12 MB)
#   .gpu/cifar/  10 CIFAR-10 JPEG shards of 1,000 images (about 25 MB), from ../shared/datasets
# Both folders are git-ignored; name them in the device call's carry: [".whl", ".gpu"].
#
#   bash bench/gpu_prepare.sh          (from a checkout with the package installed; needs PyPI)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
whl=${WHL_DIR:-.whl}
mkdir -p "$whl"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$whl" diffusers==0.42.1 ema-pytorch==0.8.3 denoising-diffusion-pytorch==2.3.4 pytorch-fid==0.3.0 \
    importlib-metadata==8.7.1 webdataset==1.0.2 braceexpand==0.1.7 simplejpeg==1.9.0 torchdata==0.11.0 \
    hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
# DeepSpeed is published as source only; its build imports torch (hence no build isolation) and
# compiles no ops (they are built just in time where needed).
ls "$whl"/deepspeed-0.19.8-*.whl >/dev/null 2>&1 ||
    DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$whl" deepspeed==0.19.8
cifar=../shared/datasets/cifar10-jpg/train.tar
if [ ! -d .gpu/cifar ]; then
    [ -f "$cifar" ] || { echo "$cifar not found: the shards are made from the shared CIFAR-10 JPEGs" >&2; exit 2; }
    "$py" -m pipeline.cli.shards "$cifar" .gpu/cifar --per-class 1000 --shard-size 1000 --no-json --seed 0
fi
du -sh "$whl" .gpu
