#!/usr/bin/env bash
# Fetch the pipeline's three sources into DIR once, for CI runs that test offline
# from them (the stages still check each file's sha256 against params.yaml).
set -euo pipefail
dir="${1:?usage: mirror.sh DIR}"
mkdir -p "$dir"
curl -fsSL -o "$dir/input.txt" https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
curl -fsSL -o "$dir/vocab.bpe" https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe
curl -fsSL -o "$dir/encoder.json" https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json
(cd "$dir" && sha256sum input.txt vocab.bpe encoder.json > SHA256SUMS)
