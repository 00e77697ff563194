"""Peak memory of one training step per method: full fine-tuning, LoRA, and LoRA + gradient
checkpointing, on an SD1.5- or SDXL-sized UNet, or a Wan-2.1-1.3B-sized video transformer, with random
weights (activations dominate).

The model (``--model``): SD1.5's UNet config (860M parameters, cross-attention 768) behind a
one-layer 768-wide text encoder, or SDXL's (2.6B parameters, cross-attention 2048, the text-time
embedding) behind one-layer 768- and 1280-wide encoders, with random weights and a two-block VAE
(factor 2), so that the UNet is nearly all of it; or (``--model wan13b``, methods ``flow_grpo`` and
``diffusion_nft``) Wan 2.1 1.3B's transformer config (dim 1536, 30 blocks, ffn 8960, text width 4096)
behind a one-layer UMT5 of width 4096 and the tiny Wan VAE (factor 2 in space and time), on
``--latent`` x ``--latent`` latents of ``--latent-frames`` frames (Wan's real VAE: 480 px, 33 frames ->
60 x 60 x 9). Each (method, setting) runs in a fresh process:
build, collect one micro-batch, then measure the step (the trainer's loss + backward, gradient
clipping and one AdamW step, which allocates the optimizer state). Peak:
``torch.cuda.max_memory_allocated`` on a GPU; on the CPU, the resident
set sampled every 2 ms minus its value before the step (malloc may keep freed memory: each
setting has its own process). Prints a table of the increments in GiB and writes JSON.

    .venv/bin/python bench/peak_memory.py                          # CPU: 32x32 latents, 2 prompts
    .venv/bin/python bench/peak_memory.py --device cuda --latent 64 --prompts 4 --dtype bfloat16
    .venv/bin/python bench/peak_memory.py --device cuda --model sdxl --latent 128 --prompts 2 --dtype bfloat16
    .venv/bin/python bench/peak_memory.py --model wan13b --methods flow_grpo --settings lora+gc --latent 16 \
        --latent-frames 2 --prompts 1                                 # CPU: a few frames
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

SETTINGS = {"full": ("full", False), "lora": ("lora", False), "lora+gc": ("lora", True)}
METHODS = ("diffusion_dpo", "d3po", "ddpo", "flow_grpo", "diffusion_nft")
VIDEO_METHODS = ("flow_grpo", "diffusion_nft")
PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a yellow star"]


def _text_encoder(tokenizer: Any, hidden: int, projection: bool = False) -> Any:
    """A one-layer CLIP text encoder of the real model's width (with a projection: SDXL's second)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from genalign.pipelines.tiny import MAX_TOKENS

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=256, num_hidden_layers=1,
                            num_attention_heads=hidden // 64, max_position_embeddings=MAX_TOKENS,
                            projection_dim=hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def wan_backbone(args: argparse.Namespace, finetune: str, checkpointing: bool) -> Any:
    """Wan 2.1 1.3B's transformer (random weights) behind genalign's Wan backbone, with a one-layer
    UMT5 of the real width and the tiny Wan VAE (16 latent channels)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from genalign.core.experiment import BackboneConfig
    from genalign.pipelines.tiny import build_t5_tokenizer
    from genalign.pipelines.wan import WanBackbone

    torch.manual_seed(0)
    tokenizer = build_t5_tokenizer()
    with torch.device(args.device):
        transformer = WanTransformer3DModel(  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json
            patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=len(tokenizer), d_model=4096, d_kv=64, d_ff=256, num_layers=1, num_heads=64,
            relative_attention_num_buckets=32, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
        vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
                               scale_factor_temporal=2, scale_factor_spatial=2, latents_mean=[0.0] * 16,
                               latents_std=[1.0] * 16)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                         flow_shift=3.0))
    pipe.to(dtype=getattr(torch, args.dtype))
    config = BackboneConfig(family="wan", path="", finetune=finetune, lora_rank=8, lora_alpha=8, dtype=args.dtype,
                            gradient_checkpointing=checkpointing, resolution=2 * args.latent,
                            frames=2 * (args.latent_frames - 1) + 1, max_sequence_length=32)
    return WanBackbone(pipe, config, args.device)


def sd35m_backbone(args: argparse.Namespace, finetune: str, checkpointing: bool) -> Any:
    """SD3.5 Medium's transformer (random weights, 2.2B parameters) behind genalign's SD3 backbone,
    with one-layer CLIP-L / CLIP-G of the real widths (pooled 768 + 1280), no T5 (the pipeline
    fills its 4096-wide part with zeros) and the two-block flow VAE with 16 latent channels."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from genalign.core.experiment import BackboneConfig
    from genalign.pipelines.sd3 import StableDiffusion3Backbone
    from genalign.pipelines.tiny import _vae, build_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer()
    with torch.device(args.device):  # stabilityai/stable-diffusion-3.5-medium transformer/config.json
        transformer = SD3Transformer2DModel(
            sample_size=args.latent, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
            pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
    vae = _vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305,
               latent_channels=16, sample_size=2 * args.latent)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=_text_encoder(tokenizer, 768, projection=True), tokenizer=tokenizer,
        text_encoder_2=_text_encoder(tokenizer, 1280, projection=True), tokenizer_2=build_clip_tokenizer(),
        text_encoder_3=None, tokenizer_3=None)
    pipe.to(dtype=getattr(torch, args.dtype))
    config = BackboneConfig(family="sd3", path="", finetune=finetune, lora_rank=8, lora_alpha=8, dtype=args.dtype,
                            gradient_checkpointing=checkpointing, resolution=2 * args.latent, drop_t5=True)
    return StableDiffusion3Backbone(pipe, config, args.device)


def sized_backbone(args: argparse.Namespace, finetune: str, checkpointing: bool) -> Any:
    """The SD1.5- or SDXL-sized pipeline (random weights) behind genalign's backbone class (or
    Wan 2.1 1.3B's / SD3.5 Medium's transformer: :func:`wan_backbone`, :func:`sd35m_backbone`)."""
    if args.model == "wan13b":
        return wan_backbone(args, finetune, checkpointing)
    if args.model == "sd35m":
        return sd35m_backbone(args, finetune, checkpointing)
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    from genalign.core.experiment import BackboneConfig
    from genalign.pipelines.sd import StableDiffusionBackbone
    from genalign.pipelines.sdxl import StableDiffusionXLBackbone
    from genalign.pipelines.tiny import _sd_scheduler, _vae, build_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer()
    vae, scheduler = _vae(sample_size=2 * args.latent), _sd_scheduler("epsilon", False)
    with torch.device(args.device):  # random initialisation where the model will run (fast on a GPU)
        if args.model == "sd15":
            unet = UNet2DConditionModel(sample_size=args.latent, cross_attention_dim=768)  # SD1.5's config otherwise
        else:  # stable-diffusion-xl-base-1.0's UNet config
            unet = UNet2DConditionModel(
                sample_size=args.latent, block_out_channels=(320, 640, 1280), layers_per_block=2,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816, use_linear_projection=True)
    if args.model == "sd15":
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=_text_encoder(tokenizer, 768), tokenizer=tokenizer,
                                       unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        backbone_class = StableDiffusionBackbone
    else:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=_text_encoder(tokenizer, 768),
                                         text_encoder_2=_text_encoder(tokenizer, 1280, projection=True),
                                         tokenizer=tokenizer, tokenizer_2=build_clip_tokenizer(), unet=unet,
                                         scheduler=scheduler)
        backbone_class = StableDiffusionXLBackbone
    pipe.to(dtype=getattr(torch, args.dtype))
    config = BackboneConfig(family=args.model.replace("15", ""), path="", finetune=finetune, lora_rank=8, lora_alpha=8,
                            dtype=args.dtype, gradient_checkpointing=checkpointing, attention=args.attention)
    return backbone_class(pipe, config, args.device)


class _Brightness:
    differentiable = False

    def __call__(self, images: torch.Tensor, prompts: Any, metadata: Any = None) -> tuple[torch.Tensor, dict]:
        scores = images.float().flatten(1).mean(1)
        return scores, {}


def build_method(name: str, backbone: Any, args: argparse.Namespace) -> Any:
    from genalign.core.experiment import SampleConfig

    sample = SampleConfig(num_steps=args.num_steps, guidance_scale=2.0, eta=1.0)
    if (name in VIDEO_METHODS) != (args.model == "wan13b"):
        raise ValueError(f"--model {args.model} measures {'flow_grpo and diffusion_nft' if args.model == 'wan13b' else 'diffusion_dpo, d3po and ddpo'}")
    if name == "flow_grpo":
        from genalign.finetuners.flow_grpo import FlowGRPO, FlowGRPOConfig

        sample = SampleConfig(num_steps=args.num_steps, guidance_scale=1.0, eta=0.7)
        experiment = SimpleNamespace(method=FlowGRPOConfig(samples_per_prompt=2, minibatches=1, beta=0.0), sample=sample)
        return FlowGRPO.build(experiment, backbone, _Brightness())
    if name == "diffusion_nft":
        from genalign.finetuners.diffusion_nft import DiffusionNFT, DiffusionNFTConfig

        sample = SampleConfig(num_steps=args.num_steps, guidance_scale=1.0, eta=0.0)
        experiment = SimpleNamespace(method=DiffusionNFTConfig(samples_per_prompt=2, timesteps_per_sample=1),
                                     sample=sample)
        return DiffusionNFT.build(experiment, backbone, _Brightness())
    if name == "diffusion_dpo":
        from genalign.finetuners.diffusion_dpo import DiffusionDPO, DiffusionDPOConfig

        return DiffusionDPO(DiffusionDPOConfig(pairs_from="policy", samples_per_prompt=2), backbone, _Brightness(),
                            sample)
    if name == "d3po":
        from genalign.finetuners.d3po import D3PO, D3POConfig

        experiment = SimpleNamespace(method=D3POConfig(samples_per_prompt=2, timestep_fraction=1.0),
                                     method_name="d3po", sample=sample)
        return D3PO.build(experiment, backbone, _Brightness())
    from genalign.finetuners.ddpo import DDPO, DDPOConfig

    experiment = SimpleNamespace(method=DDPOConfig(samples_per_prompt=2, minibatches=1, min_count=2), sample=sample)
    return DDPO.build(experiment, backbone, _Brightness())


class PeakResident:
    """The resident set's peak above its starting value, sampled in a thread."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.process, self.interval = psutil.Process(), interval
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakResident:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def increment(self) -> int:
        return self.peak - self.start


def measure(args: argparse.Namespace) -> dict[str, float]:
    from genalign.core.trainer import loss_and_backward

    finetune, checkpointing = SETTINGS[args.setting]
    backbone = sized_backbone(args, finetune, checkpointing)
    method = build_method(args.method, backbone, args)
    params = list(method.named_trainable_parameters().values())
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    with torch.no_grad():
        batch = method.collect(PROMPTS[: args.prompts], torch.Generator().manual_seed(0))
    cuda = args.device.startswith("cuda")

    def step() -> None:
        with torch.autocast(torch.device(args.device).type, dtype=getattr(torch, args.dtype),
                            enabled=args.dtype != "float32"):
            loss_and_backward(method, batch, torch.Tensor.backward)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        increment = torch.cuda.max_memory_allocated() - before
    else:
        with PeakResident() as peak:
            step()
        increment = peak.increment
    return {"peak_increment_gib": increment / 2**30, "seconds": time.perf_counter() - start,
            "trainable_parameters": sum(p.numel() for p in params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--model", default="sd15", choices=["sd15", "sdxl", "wan13b"],
                        help="the denoiser's size (random weights): SD1.5's or SDXL's UNet, Wan 2.1 1.3B's transformer")
    parser.add_argument("--latent", type=int, default=32, help="latent side (images are twice as wide)")
    parser.add_argument("--latent-frames", type=int, default=2, help="wan13b: latent frames of a video")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--num-steps", type=int, default=2, help="sampling steps of the collected rollouts")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers"], help="xformers: CUDA only")
    parser.add_argument("--out", default="bench/results/peak_memory.json")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # the child process: one measurement, JSON on the last line
        args.method, args.setting = args.one
        print(json.dumps(measure(args)))
        return
    results: dict[str, dict[str, Any]] = {}
    if args.model == "wan13b" and args.methods == list(METHODS):
        args.methods = list(VIDEO_METHODS)
    if args.model != "wan13b" and args.methods == list(METHODS):
        args.methods = [m for m in METHODS if m not in VIDEO_METHODS]
    common = ["--model", args.model, "--latent", str(args.latent), "--latent-frames", str(args.latent_frames),
              "--prompts", str(args.prompts),
              "--num-steps", str(args.num_steps), "--dtype", args.dtype, "--device", args.device,
              "--attention", args.attention]
    for method in args.methods:
        results[method] = {}
        for setting in args.settings:
            run = subprocess.run([sys.executable, __file__, "--one", method, setting, *common], capture_output=True,
                                 text=True)
            if run.returncode != 0:
                raise RuntimeError(f"{method} / {setting} failed:\n{run.stderr[-3000:]}")
            results[method][setting] = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"{method:14s} {setting:8s} peak +{results[method][setting]['peak_increment_gib']:.2f} GiB "
                  f"({results[method][setting]['seconds']:.0f} s)", flush=True)
    size = {"sd15": "SD1.5-sized UNet", "sdxl": "SDXL-sized UNet", "wan13b": "Wan-2.1-1.3B-sized transformer"}[args.model]
    frames = f" x {args.latent_frames} frames" if args.model == "wan13b" else ""
    print(f"\n{size}, {args.latent}x{args.latent}{frames} latents, {args.prompts} prompts, {args.dtype}, "
          f"{args.attention}, {args.device}: step peak above the loaded model, GiB (step seconds)")
    print("| method | " + " | ".join(args.settings) + " |")
    print("|---" * (len(args.settings) + 1) + "|")
    for method, row in results.items():
        print(f"| {method} | " + " | ".join(f"{row[s]['peak_increment_gib']:.2f} ({row[s]['seconds']:.1f} s)"
                                           for s in args.settings) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "latent": args.latent, "latent_frames": args.latent_frames,
                               "prompts": args.prompts,
                               "dtype": args.dtype, "attention": args.attention, "device": args.device,
                               "results": results},
                              indent=1) + "\n")


if __name__ == "__main__":
    main()
