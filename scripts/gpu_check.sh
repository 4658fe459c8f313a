#!/usr/bin/env bash
# Run every GPU path of trl-sgpo (bf16, fp16, DeepSpeed ZeRO-3, FSDP2, vLLM colocate; SPPO on ZeRO-3 and vLLM) for a
# few steps on the embedded default model and print one table: path, ok/failed, seconds, peak GPU memory. Needs CUDA
# and `pip install -e '.[test,demo,vllm,deepspeed]'`; under 10 minutes on one H100. Options: see scripts/gpu_check.py --help
# (--paths NAME..., --timeout SECONDS, --dry-run). Exit status 1 when a path failed.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRL_EXPERIMENTAL_SILENCE=1 TOKENIZERS_PARALLELISM=false
exec python scripts/gpu_check.py "$@"
