#!/usr/bin/env bash
# The GPU measurements on one CUDA device, in under 8 minutes on an H200: every section has its own
# time limit (`timeout`), in order of importance, and a section that runs out is reported and
# skipped, so the script ends in time whatever the card (not yet run: no GPU was lent so far).
#   1. Speed (issue #32, bench/speed.py images): images per GPU-second of whole training iterations
#      (rollouts with log-probs or DPO pairs, loss and backward, clipping, AdamW), eager and
#      `backbone.compile`, bf16: Flow-GRPO on an SD3.5-Medium-sized transformer (random weights,
#      64x64 latents = 512 px, 10 steps, one prompt's group of 24, CFG 4.5), then Diffusion-DPO on
#      an SDXL-sized UNet (128x128 latents = 1024 px, 4 prompts = 8 images, 10 steps). The numbers
#      to set beside flow_grpo's and verl-omni's published throughput. Then the other levers
#      (bench/speed.py levers): fused AdamW over torch's default (shapes SD UNet, LoRA and full),
#      channels-last in a Diffusion-DPO step, TF32 on a 4096 x 4096 fp32 matmul.
#   2. Memory (issue #14, bench/peak_memory.py): peak memory and step time of Diffusion-DPO, D3PO and
#      DDPO on an SD1.5-sized UNet (64x64 latents = 512 px, 4 prompts), full fine-tuning vs LoRA vs
#      LoRA + gradient checkpointing, bf16 autocast (trained weights fp32), SDPA; then LoRA with
#      xformers when it imports; the same three methods on an SDXL-sized UNet (2.6B parameters,
#      1024 px, 2 prompts), LoRA vs LoRA + checkpointing; Flow-GRPO and DiffusionNFT on a
#      Wan-2.1-1.3B-sized video transformer (60x60 latents x 9 latent frames = 480 px and 33 frames
#      through Wan's VAE, one prompt, 2 videos), LoRA vs LoRA + checkpointing. On the CPU
#      (2026-12-06, 2 cores, fp32, 16x16 x 2 latent frames, one prompt, 2 videos) one Wan step's
#      peak above the loaded model was: Flow-GRPO LoRA 2.17 GiB, LoRA + checkpointing 0.71 GiB;
#      DiffusionNFT 2.09 / 0.52 GiB (bench/README.md, "Video").
# Every configuration of peak_memory.py runs in its own process; the tables are printed and the
# JSON lands in bench/results/gpu/. Record the printed tables, with the date and the GPU, in
# bench/README.md.
#
#   bash bench/gpu.sh                 # from the repository root, with .venv installed
#   PY=python bash bench/gpu.sh       # another interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=bench/results/gpu
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'bench/gpu.sh needs a CUDA device'; print(torch.cuda.get_device_name(0), 'torch', torch.__version__)" || exit 1
date -u
START=$SECONDS

section() {  # section SECONDS NAME COMMAND...: run with a time limit, report and go on when it runs out
  local limit=$1 name=$2
  shift 2
  echo "== $name (at most ${limit}s; $((SECONDS - START))s so far)"
  timeout --signal=TERM --kill-after=10 "$limit" "$@"
  local rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then echo "!! $name ran out of its ${limit}s and was stopped"; fi
  if [ "$rc" != 0 ] && [ "$rc" != 124 ] && [ "$rc" != 137 ]; then echo "!! $name failed (exit $rc)"; fi
}

section 140 "Flow-GRPO, SD3.5-Medium-sized, images/s" "$PY" bench/speed.py images --device cuda --models sd35m \
  --latent 64 --group 24 --num-steps 10 --repeats 2 --out "$OUT/speed_images_sd35m.json"
section 110 "Diffusion-DPO, SDXL-sized, images/s" "$PY" bench/speed.py images --device cuda --models sdxl \
  --latent 128 --prompts 4 --num-steps 10 --repeats 2 --out "$OUT/speed_images_sdxl.json"
section 25 "levers: fused AdamW, channels-last, TF32" "$PY" bench/speed.py levers --device cuda --repeats 3 \
  --out "$OUT/speed_levers.json"
COMMON=(--device cuda --latent 64 --prompts 4 --num-steps 4)
section 60 "peak memory, SD1.5-sized, bf16" "$PY" bench/peak_memory.py "${COMMON[@]}" --dtype bfloat16 \
  --out "$OUT/peak_memory_bfloat16_sdpa.json"
if "$PY" -c "import xformers" 2>/dev/null; then
  section 30 "peak memory, SD1.5-sized, xformers" "$PY" bench/peak_memory.py "${COMMON[@]}" --dtype bfloat16 \
    --attention xformers --settings lora lora+gc --out "$OUT/peak_memory_bfloat16_xformers.json"
else
  echo "xformers does not import here: its rows are skipped (pip install genalign[xformers])"
fi
section 50 "peak memory, SDXL-sized" "$PY" bench/peak_memory.py --device cuda --model sdxl --latent 128 --prompts 2 \
  --num-steps 4 --dtype bfloat16 --settings lora lora+gc --out "$OUT/peak_memory_sdxl_bfloat16_sdpa.json"
section 50 "peak memory, Wan-2.1-1.3B-sized" "$PY" bench/peak_memory.py --device cuda --model wan13b \
  --methods flow_grpo diffusion_nft --latent 60 --latent-frames 9 --prompts 1 --num-steps 4 --dtype bfloat16 \
  --settings lora lora+gc --out "$OUT/peak_memory_wan13b_bfloat16_sdpa.json"
echo "done in $((SECONDS - START))s"
