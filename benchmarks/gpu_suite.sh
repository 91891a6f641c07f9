#!/usr/bin/env bash
# GPU suite (issue 9): one command on a lent H100/H200 that prints a markdown block for RESULTS.md.
#
# WRITTEN ON A MACHINE WITHOUT A GPU AND NEVER RUN ON ONE: the first session with a GPU should expect to fix things.
#
#   bash benchmarks/gpu_suite.sh --fetch-wheels    # HERE (internet: PyPI): download the wheels the GPU machine lacks into .whl/
#   bash benchmarks/gpu_suite.sh [SECTION ...]     # THERE: tests sft1b sft8b memory generation checkpoint weight_sync (default: all)
#   bash benchmarks/gpu_suite.sh quick             # THERE: tests sft1b generation weight_sync memory, short, <= 8 min in all
#
# Device tool (one command is capped at 10 minutes, so run the sections in two or three calls):
#   echo /.whl/ >> .git/info/exclude; bash benchmarks/gpu_suite.sh --fetch-wheels      # once, here
#   run(command="bash benchmarks/gpu_suite.sh tests sft1b memory generation weight_sync", carry=[".whl"], timeout_s=600)
#   run(command="bash benchmarks/gpu_suite.sh checkpoint", carry=[".whl"], timeout_s=600)
#   run(command="bash benchmarks/gpu_suite.sh sft8b", carry=[".whl"], timeout_s=600)   # 8B: writes ~16 GB of weights
#
# The machine has torch and transformers (KINDS.md: torch 2.11, transformers 5.17) but not tyro or datasets,
# which train/sft.py imports: they travel as wheels in .whl (tyro, docstring-parser, typeguard, datasets, dill,
# multiprocess; pyarrow, pandas, fsspec, xxhash are already there). No flash-attn: attention is sdpa.
#
# Sections:
#   tests        tests/test_gpu.py: host tensors in collectives under nccl (--cpu_offload, DPO reference cache)
#   sft1b        train/sft.py, Llama-3.2-1B-shaped random weights, seq 4096, packing, bf16: tokens/s/GPU and MFU
#   sft8b        the same, Llama-3.1-8B-shaped: CPU offload when the host RAM holds fp32 params+grads+AdamW
#                (~120 GiB), else on the GPU (H200), else offload with as many layers as fit (the row says)
#   memory       benchmarks/memory.py --skip_measure: simulated tables + torch.cuda.max_memory_allocated rows
#   generation   benchmarks/gpu_generation.py: TorchEngine bf16 sampling throughput, 1B-shaped
#   checkpoint   benchmarks/checkpoint.py on one GPU: save/load/export time, rank-0 host and GPU peak memory
#   weight_sync  benchmarks/weight_sync.py over NCCL (trainer and one engine process; with one GPU both share
#                it, which NCCL may refuse: then the row says failed)
# Anchor: torchtitan Llama-3.1-8B, FSDP + compile, seq 8192, 8x H100: ~6.7k tokens/s/GPU, 33-39% MFU.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS="tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19"
if [[ "${1:-}" == "--fetch-wheels" ]]; then
  mkdir -p "${WHEEL_DIR:-.whl}"
  for w in $WHEELS; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d "${WHEEL_DIR:-.whl}" "$w" || echo "could not download $w"
  done
  ls -la "${WHEEL_DIR:-.whl}"
  exit 0
fi

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TULU_CACHE=${TULU_CACHE:-/tmp/tulu-cache}
OUTFILE=${OUT:-/tmp}/gpu_results.md
SECTIONS=("$@"); [[ ${#SECTIONS[@]} -eq 0 ]] && SECTIONS=(tests sft1b sft8b memory generation checkpoint weight_sync)
QUICK=0
if [[ "${SECTIONS[0]}" == "quick" ]]; then  # per-section limits sum to 470 s: one 10-minute device command
  QUICK=1; SECTIONS=(tests sft1b generation weight_sync memory)
fi
echo "wheels this machine needs beyond torch + transformers: $WHEELS"
if ls .whl/*.whl >/dev/null 2>&1; then echo "carried in .whl: $(ls .whl/*.whl | wc -l) files, $(du -ch .whl/*.whl | tail -1 | cut -f1)"; fi

section() {  # name, timeout, command...
  local name=$1 limit=$2; shift 2
  echo; echo "<!-- section $name: $* -->"
  timeout "$limit" "$@" 2>"/tmp/suite_$name.err" || { echo "**$name failed or timed out (exit $?)**"; echo '```'; tail -n 15 "/tmp/suite_$name.err"; echo '```'; }
}

{
  echo "## GPU suite, $(date -u +%Y-%m-%d)"
  echo
  echo "device: $(python3 -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")')," \
       "$(nproc) CPU cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM;" \
       "torch $(python3 -c 'import torch; print(torch.__version__)'), transformers $(python3 -c 'import transformers; print(transformers.__version__)');" \
       "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo
  echo "command: \`bash benchmarks/gpu_suite.sh ${SECTIONS[*]}\`"
  echo
  echo "Anchor (torchtitan, Llama-3.1-8B, FSDP + torch.compile, seq 8192, 8x H100): ~6.7k tokens/s/GPU, 33-39% MFU."
  for s in "${SECTIONS[@]}"; do
    case $s in
      sft1b) if ((QUICK)); then section sft1b 200 python3 benchmarks/sft_throughput.py --no-tiny --gpu --gpu_shapes llama-1b --gpu_steps 4
             else section sft1b 580 python3 benchmarks/sft_throughput.py --no-tiny --gpu --gpu_shapes llama-1b --gpu_steps 10; fi ;;
      sft8b) section sft8b 590 python3 benchmarks/sft_throughput.py --no-tiny --gpu --gpu_shapes llama-3.1-8b --gpu_steps 5 ;;
      memory) section memory $((QUICK ? 60 : 400)) python3 benchmarks/memory.py --skip_measure ;;
      generation) section generation $((QUICK ? 90 : 400)) python3 benchmarks/gpu_generation.py --shape llama-1b ;;
      checkpoint) section checkpoint 400 python3 benchmarks/checkpoint.py --sizes 100m 1b --reps 2 ;;
      weight_sync) if ((QUICK)); then section weight_sync 60 python3 benchmarks/weight_sync.py --sizes 200m --buckets 256 --reps 1
                   else section weight_sync 400 python3 benchmarks/weight_sync.py --sizes 200m --buckets 64 256 --reps 3; fi ;;
      tests) section tests $((QUICK ? 60 : 400)) python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py ;;
      *) echo "unknown section $s (sft1b sft8b memory generation checkpoint weight_sync tests)" ;;
    esac
  done
} | tee "$OUTFILE"
echo "(markdown block also written to $OUTFILE)"
