#!/usr/bin/env bash
# Prompts from a JSONL file through `llmkit generate --json` into jq: the model loads once,
# each prompt becomes one JSON line on stdout, and timings stay on stderr.
#
#   bash examples/pipeline.sh [prompts.jsonl]
set -euo pipefail
prompts="${1:-$(dirname "$0")/prompts.jsonl}"

llmkit generate --input-file "$prompts" --max-new-tokens 24 --seed 1 --json --quiet \
  | jq -r '"\(.id)\t\(.usage.completion_tokens) tok\t\(.completions[0].text | gsub("\n"; " "))"'
