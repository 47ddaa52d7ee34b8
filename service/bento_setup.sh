#!/usr/bin/env bash
# Run by `bentoml containerize` while it builds the image (bentofile.yaml, docker.setup_script): installs this
# project from the sources the Bento carries, with the service and demo extras, against the tested pins.
set -euxo pipefail
src="${BENTO_PATH:-/home/bentoml/bento}/src"
python -m pip install --no-cache-dir -c "$src/constraints.txt" "$src/sdk" "$src[serve,demo]"
