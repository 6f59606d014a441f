#!/usr/bin/env bash
# Figures of the dense embedded model: perplexity (WikiText-2, PTB; seq 128, first 32,768 tokens),
# zero-shot accuracy (7 tasks, first 200 documents each) and speed, into bench/results/dense_smollm2.json.
# About 9 minutes on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m evaluation --model smollm2-135m --ppl wikitext2,ptb --seq_len 128 --max_tokens 32768 \
    --zeroshot all --limit 200 --stats --threads 2 --output bench/results/dense_smollm2.json "$@"
