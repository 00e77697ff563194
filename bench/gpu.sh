#!/usr/bin/env bash
# The GPU measurements of issue #14 on one CUDA device, about 6-9 minutes on an H200 (not yet run):
#   peak memory and step time of Diffusion-DPO, D3PO and DDPO on an SD1.5-sized UNet with random
#   weights (64x64 latents = 512 px through the UNet, 4 prompts), full fine-tuning vs LoRA vs
#   LoRA + gradient checkpointing, in bf16 and fp16 (autocast; trained weights fp32), SDPA, then
#   LoRA and LoRA + checkpointing with xformers in bf16 when xformers imports; then the same three
#   methods on an SDXL-sized UNet (2.6B parameters, 128x128 latents = 1024 px, 2 prompts, bf16,
#   SDPA), LoRA vs LoRA + checkpointing (full fine-tuning of SDXL is not a single-GPU recipe); then
#   Flow-GRPO and DiffusionNFT on a Wan-2.1-1.3B-sized video transformer (60x60 latents x 9 latent
#   frames = 480 px and 33 frames through Wan's VAE, one prompt, 2 videos, bf16), LoRA vs LoRA +
#   checkpointing. On the CPU (2026-12-06, 2 cores, fp32, 16x16 x 2 latent frames, one prompt, 2
#   videos) one step's peak above the loaded model was: Flow-GRPO LoRA 2.17 GiB, LoRA + checkpointing
#   0.71 GiB; DiffusionNFT 2.09 / 0.52 GiB (bench/README.md, "Video").
# Every configuration runs in its own process (bench/peak_memory.py); the tables are printed and
# the JSON lands in bench/results/gpu/. Record the printed tables, with the date and the GPU, in
# bench/README.md.
#
#   bash bench/gpu.sh                 # from the repository root, with .venv installed
#   PY=python bash bench/gpu.sh       # another interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=bench/results/gpu
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'bench/gpu.sh needs a CUDA device'; print(torch.cuda.get_device_name(0), 'torch', torch.__version__)"
date -u
COMMON=(--device cuda --latent 64 --prompts 4 --num-steps 4)
for dtype in bfloat16 float16; do
  "$PY" bench/peak_memory.py "${COMMON[@]}" --dtype "$dtype" --out "$OUT/peak_memory_${dtype}_sdpa.json"
done
if "$PY" -c "import xformers" 2>/dev/null; then
  "$PY" bench/peak_memory.py "${COMMON[@]}" --dtype bfloat16 --attention xformers --settings lora lora+gc \
    --out "$OUT/peak_memory_bfloat16_xformers.json"
else
  echo "xformers does not import here: its rows are skipped (pip install genalign[xformers])"
fi
"$PY" bench/peak_memory.py --device cuda --model sdxl --latent 128 --prompts 2 --num-steps 4 --dtype bfloat16 \
  --settings lora lora+gc --out "$OUT/peak_memory_sdxl_bfloat16_sdpa.json"
"$PY" bench/peak_memory.py --device cuda --model wan13b --methods flow_grpo diffusion_nft --latent 60 \
  --latent-frames 9 --prompts 1 --num-steps 4 --dtype bfloat16 --settings lora lora+gc \
  --out "$OUT/peak_memory_wan13b_bfloat16_sdpa.json"
