#!/usr/bin/env bash
# Build the core Lambda layer zip for the Terraform path (SAM builds it itself from template.yaml):
#   infra/build-layer.sh [out.zip]      (default build/core-layer.zip; arm64, Python 3.11)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-build/core-layer.zip}
mkdir -p "$(dirname "$out")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip install --quiet --platform manylinux2014_aarch64 --only-binary=:all: \
  --implementation cp --python-version 3.11 --target "$tmp/python" -r layers/core/requirements.txt
cp -r layers/core/ringfence "$tmp/python/"
find "$tmp/python" -name __pycache__ -prune -exec rm -rf {} +
(cd "$tmp" && python3 -m zipfile -c layer.zip python >/dev/null)
mv "$tmp/layer.zip" "$out"
echo "wrote $out"
