"""`genalign shapes build`: train the world's tiny pretrained models from scratch, seeded.

What it writes (diffusers / transformers folders, safetensors, weights stored in fp16):

* ``sd/``   a latent SD-family model (StableDiffusionPipeline layout): AutoencoderKL with a VAE
  factor of 2 (32x32x3 images <-> 16x16x4 latents), UNet2DConditionModel (epsilon prediction),
  a CLIP text encoder trained jointly with the UNet, and a word-level CLIP tokenizer;
* ``sd3/``  a flow model (StableDiffusion3Pipeline layout): SD3Transformer2DModel on the same VAE
  latents, conditioned by the SD model's text encoder (frozen; both CLIP slots), no T5;
* ``clip/`` the proxy reward: a tiny transformers CLIPModel trained contrastively on the world;
* ``build.json``: the configuration, step counts, losses and timings.

Recipe (facts measured on 2 CPU cores, docs/contributing.md): epsilon prediction with min-SNR
weighting (gamma 5), 10% empty captions for classifier-free guidance, AdamW lr 2e-3 with cosine
decay, batch 64, bf16 autocast; a shallow VAE because deep latents learned about half as fast.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from genalign.shapes.world import IMAGE_SIZE, all_prompts, training_examples

TEXT_HIDDEN = 128
STAGES = ("sd", "flow", "clip", "edit", "text", "ocr", "video_vae", "video")
MAX_TOKENS = 16
T5_TOKENS = 1  # the SD3 model has no T5: one zero token instead of diffusers' 256 (recorded in genalign.json)


@dataclass
class BuildConfig:
    out: str = "models/shapes"
    seed: int = 0
    dataset_size: int = 24_000
    batch_size: int = 64
    vae_steps: int = 600
    sd_steps: int = 1500
    flow_steps: int = 4000
    clip_steps: int = 800
    flow_lr: float = 1e-3
    lr: float = 2e-3
    empty_caption_rate: float = 0.1
    min_snr_gamma: float = 5.0
    stages: tuple[str, ...] = ("sd", "flow", "clip")  # later stages alone reuse the saved sd/; edit, text, ocr on request
    edit_dataset_size: int = 16_000
    edit_steps: int = 2500
    edit_batch_size: int = 48
    edit_lr: float = 1e-3
    edit_sets: tuple[int, int] = (512, 256)  # train / held-out edits written beside the editing model
    text_dataset_size: int = 12_000
    text_steps: int = 1500
    text_batch_size: int = 48
    text_lr: float = 1e-3
    ocr_steps: int = 3000
    ocr_batch_size: int = 32
    ocr_lr: float = 1e-3
    video_dataset_size: int = 4000
    video_vae_steps: int = 1000
    video_vae_batch_size: int = 16
    video_steps: int = 3000
    video_batch_size: int = 48
    video_lr: float = 1e-3


def world_words() -> list[str]:
    return sorted({w for meta in all_prompts() for w in meta["prompt"].split()})


def make_dataset(size: int, seed: int, split: str = "train") -> tuple[torch.Tensor, list[str]]:
    """``size`` training images (N, 3, 32, 32) in [-1, 1] and their captions (of ``split``'s prompts)."""
    stream = training_examples(seed=seed, split=split)
    images, captions = [], []
    for _ in range(size):
        image, caption, _ = next(stream)
        images.append(torch.from_numpy(image).permute(2, 0, 1))
        captions.append(caption)
    return torch.stack(images) * 2 - 1, captions


def _cosine(step: int, total: int, warmup: int = 50) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _train(
    name: str,
    params: list[nn.Parameter],
    steps: int,
    lr: float,
    loss_fn: Callable[[int, torch.Generator], torch.Tensor],
    seed: int,
    log: dict[str, Any],
    autocast: bool = True,
) -> None:
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, steps))
    generator = torch.Generator().manual_seed(seed)
    start, losses = time.time(), []
    bar = tqdm(range(steps), desc=f"shapes build: {name}")
    for step in bar:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(step, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.float().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 25 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-25:]):.4f}")
    log[name] = {"steps": steps, "seconds": round(time.time() - start, 1),
                 "first_loss": float(np.mean(losses[:10])), "final_loss": float(np.mean(losses[-50:]))}


# --------------------------------------------------------------------------- the models


def make_vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16, sample_size=IMAGE_SIZE,
    )


def make_text_encoder(vocab_size: int, with_projection: bool = False) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=TEXT_HIDDEN,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def make_unet() -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4,
        block_out_channels=(64, 128, 128), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8, norm_num_groups=32,
    )


def make_transformer() -> Any:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
        attention_head_dim=32, num_attention_heads=4, joint_attention_dim=2 * TEXT_HIDDEN,
        caption_projection_dim=128, pooled_projection_dim=2 * TEXT_HIDDEN, pos_embed_max_size=16,
    )


def sd_scheduler() -> Any:
    from diffusers import DDIMScheduler

    # The SD 1.5 schedule.
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


# --------------------------------------------------------------------------- stages


def train_vae(images: torch.Tensor, config: BuildConfig, log: dict[str, Any]) -> Any:
    torch.manual_seed(config.seed)
    vae = make_vae()

    def loss_fn(step: int, g: torch.Generator) -> torch.Tensor:
        batch = images[torch.randint(len(images), (config.batch_size,), generator=g)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(g)).sample
        return (recon.float() - batch).abs().mean() + 1e-6 * posterior.kl().mean()

    _train("vae", list(vae.parameters()), config.vae_steps, 1e-3, loss_fn, config.seed, log)
    vae.eval()
    with torch.no_grad():
        sample = encode_latents(vae, images[:2048]) / vae.config.scaling_factor
    vae.register_to_config(scaling_factor=float(1 / sample.std()))
    with torch.no_grad():
        recon = vae.decode(vae.encode(images[:256]).latent_dist.mean).sample
    log["vae"]["reconstruction_l1"] = float((recon - images[:256]).abs().mean())
    return vae


@torch.no_grad()
def encode_latents(vae: Any, images: torch.Tensor) -> torch.Tensor:
    out = [vae.encode(images[i : i + 512]).latent_dist.mean for i in range(0, len(images), 512)]
    return torch.cat(out) * vae.config.scaling_factor


def train_sd(latents: torch.Tensor, captions: list[str], tokenizer: Any, config: BuildConfig,
             log: dict[str, Any], unet: Any = None, text_encoder: Any = None) -> tuple[Any, Any]:
    """Train the SD model's UNet and text encoder (new ones, or go on training the given ones)."""
    torch.manual_seed(config.seed + 1)
    unet = unet.train() if unet is not None else make_unet()
    text_encoder = text_encoder.train() if text_encoder is not None else make_text_encoder(len(tokenizer))
    scheduler = sd_scheduler()
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    token_ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                          return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids

    def loss_fn(step: int, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(latents), (config.batch_size,), generator=g)
        x0, ids = latents[idx], token_ids[idx].clone()
        drop = torch.rand(len(idx), generator=g) < config.empty_caption_rate
        ids[drop] = empty
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        hidden = text_encoder(ids).last_hidden_state
        pred = unet(x_t, t, encoder_hidden_states=hidden).sample
        weight = torch.clamp(snr[t], max=config.min_snr_gamma) / snr[t]  # min-SNR for epsilon targets
        return (weight * ((pred.float() - noise) ** 2).mean(dim=(1, 2, 3))).mean()

    params = list(unet.parameters()) + list(text_encoder.parameters())
    _train("sd", params, config.sd_steps, config.lr, loss_fn, config.seed + 1, log)
    return unet.eval(), text_encoder.eval()


def train_flow(latents: torch.Tensor, captions: list[str], pipe: Any, config: BuildConfig,
               log: dict[str, Any], transformer: Any = None) -> Any:
    """Train the flow transformer on frozen text embeddings (a new one, or go on training the given one)."""
    torch.manual_seed(config.seed + 2)
    transformer = transformer.train() if transformer is not None else make_transformer()
    unique = sorted(set(captions)) + [""]
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=unique, prompt_2=None, prompt_3=None, device="cpu",
                                                  num_images_per_prompt=1, do_classifier_free_guidance=False,
                                                  max_sequence_length=T5_TOKENS)
    row = {c: i for i, c in enumerate(unique)}
    caption_rows = torch.tensor([row[c] for c in captions])
    empty_row = row[""]

    def loss_fn(step: int, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(latents), (config.batch_size,), generator=g)
        rows = caption_rows[idx].clone()
        rows[torch.rand(len(idx), generator=g) < config.empty_caption_rate] = empty_row
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        sigma = torch.sigmoid(torch.randn(len(idx), generator=g))  # logit-normal (SD3 paper), shift 1
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        pred = transformer(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=embeds[rows],
                           pooled_projections=pooled[rows]).sample
        return ((pred.float() - (noise - x0)) ** 2).mean()

    _train("flow", list(transformer.parameters()), config.flow_steps, config.flow_lr, loss_fn, config.seed + 2, log)
    return transformer.eval()


def train_clip(images: torch.Tensor, captions: list[str], tokenizer: Any, config: BuildConfig,
               log: dict[str, Any]) -> Any:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(config.seed + 3)
    clip_config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN,
                         num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=4, hidden_size=TEXT_HIDDEN,
                           intermediate_size=4 * TEXT_HIDDEN, num_hidden_layers=4, num_attention_heads=4),
        projection_dim=TEXT_HIDDEN,
    )
    model = CLIPModel(clip_config)
    token_ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                          return_tensors="pt").input_ids
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    def loss_fn(step: int, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(images), (config.batch_size,), generator=g)
        pixels = ((images[idx] + 1) / 2 - mean) / std
        ids = token_ids[idx]
        out = model(input_ids=ids, pixel_values=pixels)
        # identical captions in a batch are positives of each other, not negatives
        same = (ids[:, None, :] == ids[None, :, :]).all(-1).float()
        targets = same / same.sum(dim=1, keepdim=True)
        logits = out.logits_per_image.float()
        return 0.5 * (torch.sum(-targets * logits.log_softmax(1), 1).mean()
                      + torch.sum(-targets * logits.t().log_softmax(1), 1).mean())

    _train("clip", list(model.parameters()), config.clip_steps, 1e-3, loss_fn, config.seed + 3, log)
    return model.eval()


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------- build


def build(config: BuildConfig) -> dict[str, Any]:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor

    from genalign.pipelines.tiny import build_clip_tokenizer

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    log: dict[str, Any] = {"config": asdict(config)}
    started = time.time()
    unknown = set(config.stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown shapes build stages {sorted(unknown)}; known: {', '.join(STAGES)}")
    own_models = {"edit": "kontext", "text": "text", "ocr": "text", "video_vae": "video", "video": "video"}  # stages with a folder (and log) of their own
    world = set(config.stages) - set(own_models)
    torch.manual_seed(config.seed)
    if world:
        images, captions = make_dataset(config.dataset_size, config.seed)

    if "sd" in config.stages:
        tokenizer = build_clip_tokenizer(words=world_words(), max_length=MAX_TOKENS)
        vae = train_vae(images, config, log)
        unet, text_encoder = train_sd(encode_latents(vae, images), captions, tokenizer, config, log)
        sd = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                     scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None,
                                     requires_safety_checker=False)
        sd.to(torch.float16).save_pretrained(out / "sd", safe_serialization=True)
    # Later stages use the SD model as saved (fp16 weights), so that rerunning them alone
    # (stages=flow,clip) gives exactly what a full build gives; the OCR reader and the video model
    # use none of it.
    if world or {"edit", "text"} & set(config.stages):
        sd = StableDiffusionPipeline.from_pretrained(out / "sd", dtype=torch.float32, safety_checker=None,
                                                     requires_safety_checker=False)
        vae, text_encoder, tokenizer = sd.vae.eval(), sd.text_encoder.eval(), sd.tokenizer
    if world:
        latents = encode_latents(vae, images)

    if "flow" in config.stages:
        _build_flow(config, out, vae, text_encoder, tokenizer, latents, captions, log)
    if "clip" in config.stages:
        clip = train_clip(images, captions, tokenizer, config, log)
        clip.to(torch.float16).save_pretrained(out / "clip", safe_serialization=True)
        tokenizer.save_pretrained(out / "clip")
        CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                           image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)).save_pretrained(out / "clip")

    if "edit" in config.stages:
        _build_edit(config, out, vae, log)
    if "text" in config.stages:
        _build_text(config, out, vae, log)
    if "text" in config.stages or "ocr" in config.stages:
        make_text_ocr(out / "text" / "ocr", config.seed + 7)
        train_text_ocr(out / "text" / "ocr", config, log)
    if "video" in config.stages or "video_vae" in config.stages:
        from genalign.shapes.video_model import build_video

        build_video(config, out, log)
    log["seconds"] = round(time.time() - started, 1)
    # each model folder's own log (the world's models share out/build.json), merged with what was there
    folders = {own_models[stage] for stage in config.stages if stage in own_models} | ({""} if world else set())
    for folder in folders:
        target = out / folder / "build.json"
        previous = json.loads(target.read_text()) if target.is_file() else {}
        target.write_text(json.dumps({**previous, **log}, indent=2))
    return log


def _build_flow(config: BuildConfig, out: Path, vae: Any, text_encoder: Any, tokenizer: Any, latents: torch.Tensor,
                captions: list[str], log: dict[str, Any]) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    # The flow model reuses the trained text encoder in both CLIP slots (frozen), with a seeded
    # random projection for the pooled vector.
    torch.manual_seed(config.seed + 4)
    encoders = []
    for _ in range(2):
        encoder = make_text_encoder(len(tokenizer), with_projection=True)
        encoder.text_model.load_state_dict(text_encoder.state_dict())
        encoders.append(encoder.eval())
    sd3 = StableDiffusion3Pipeline(transformer=make_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                                   vae=vae, text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1],
                                   tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
    sd3.transformer = train_flow(latents, captions, sd3, config, log)
    sd3.register_modules(transformer=sd3.transformer)
    sd3.to(torch.float16).save_pretrained(out / "sd3", safe_serialization=True)
    (out / "sd3" / "genalign.json").write_text(json.dumps({"max_sequence_length": T5_TOKENS}) + "\n")


# --------------------------------------------------------------------------- the editing model

EDIT_TOKENS = 24  # "a red circle and a blue square then move the circle left of the square" + BOS/EOS fits


def make_edit_transformer() -> Any:
    """FLUX.1's transformer at toy size (2 double-stream, 4 single-stream blocks, width 128), no
    guidance embedding: the Kontext layout reads the source latents' tokens after the noisy ones."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=4,
        joint_attention_dim=TEXT_HIDDEN, pooled_projection_dim=TEXT_HIDDEN, guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    )


def make_flux_pipeline(vae: Any, seed: int, words: list[str], max_tokens: int, pipeline_class: type) -> Any:
    """A FLUX-layout pipeline (``pipeline_class``: FluxPipeline or FluxKontextPipeline) of new text
    encoders (a CLIP text model for the pooled vector, a T5 encoder for the tokens, one word-level
    tokenizer of ``words`` for both) and transformer, on the SD model's VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from genalign.pipelines.tiny import build_clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(words=words, max_length=max_tokens)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=max_tokens, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=TEXT_HIDDEN, d_kv=32, d_ff=4 * TEXT_HIDDEN,
                                 num_layers=2, num_heads=4, relative_attention_num_buckets=16, pad_token_id=1,
                                 eos_token_id=1, decoder_start_token_id=0))
    vae = copy.deepcopy(vae)
    vae.register_to_config(shift_factor=0.0)  # FLUX's pipelines shift the latents: none here
    return pipeline_class(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae, text_encoder=clip,
                          tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer,
                          transformer=make_edit_transformer())


def make_edit_pipeline(vae: Any, seed: int) -> Any:
    """The editing model's FluxKontextPipeline (see :func:`make_flux_pipeline`)."""
    from diffusers import FluxKontextPipeline

    from genalign.shapes.editing import edit_words

    return make_flux_pipeline(vae, seed, sorted(set(world_words()) | set(edit_words())), EDIT_TOKENS,
                              FluxKontextPipeline)


def make_edit_dataset(size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``size`` train-split edits: source and target images (N, 3, 32, 32) in [-1, 1], prompts."""
    from genalign.shapes.editing import edit_examples, render_pair

    stream = edit_examples("train", seed)
    sources, targets, prompts = [], [], []
    for _ in range(size):
        example = next(stream)
        source, target = render_pair(example)
        sources.append(torch.from_numpy(source).permute(2, 0, 1))
        targets.append(torch.from_numpy(target).permute(2, 0, 1))
        prompts.append(example.prompt)
    return torch.stack(sources) * 2 - 1, torch.stack(targets) * 2 - 1, prompts


def train_flux(name: str, backbone: Any, targets: torch.Tensor, prompts: list[str], max_tokens: int, steps: int,
               batch_size: int, lr: float, seed: int, log: dict[str, Any], sources: torch.Tensor | None = None) -> None:
    """Flow matching of the target images' latents given the prompt (and the source image's latents,
    for editing models), through genalign's FLUX backbone (its packing and position ids); the
    transformer and both text encoders are trained together."""
    from genalign.core.types import Conditioning

    pipe = backbone.pipe
    pipe.text_encoder.requires_grad_(True).train()
    pipe.text_encoder_2.requires_grad_(True).train()
    pipe.transformer.train()
    source_latents = encode_latents(pipe.vae, sources) if sources is not None else None
    target_latents = encode_latents(pipe.vae, targets)
    unique = sorted(set(prompts))
    row = {p: i for i, p in enumerate(unique)}
    token_ids = pipe.tokenizer(unique, padding="max_length", max_length=max_tokens, truncation=True,
                               return_tensors="pt").input_ids
    prompt_rows = torch.tensor([row[p] for p in prompts])

    def loss_fn(step: int, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(prompts), (batch_size,), generator=g)
        ids = token_ids[prompt_rows[idx]]
        pooled = pipe.text_encoder(ids).pooler_output
        embeds = pipe.text_encoder_2(ids)[0]
        text_ids = torch.zeros(len(idx), embeds.shape[1], 3)
        context = {"image_latents": source_latents[idx]} if source_latents is not None else {}
        cond = Conditioning({"prompt_embeds": embeds, "pooled": pooled, "text_ids": text_ids, **context})
        x0 = target_latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        sigma = torch.sigmoid(torch.randn(len(idx), generator=g))  # logit-normal, shift 1
        s = sigma.view(-1, 1, 1, 1)
        pred = backbone.predict((1 - s) * x0 + s * noise, sigma * 1000, cond)
        return ((pred.float() - (noise - x0)) ** 2).mean()

    params = [*pipe.transformer.parameters(), *pipe.text_encoder.parameters(), *pipe.text_encoder_2.parameters()]
    _train(name, params, steps, lr, loss_fn, seed, log)
    for module in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):
        module.eval().requires_grad_(False)


def train_edit(pipe: Any, sources: torch.Tensor, targets: torch.Tensor, prompts: list[str], config: BuildConfig,
               log: dict[str, Any]) -> None:
    """The editing model: target latents given the source latents and the prompt (FLUX.1 Kontext)."""
    from genalign.core.experiment import BackboneConfig
    from genalign.pipelines.flux_kontext import FluxKontextBackbone

    backbone = FluxKontextBackbone(pipe, BackboneConfig(family="flux-kontext", finetune="full"))
    train_flux("edit", backbone, targets, prompts, EDIT_TOKENS, config.edit_steps, config.edit_batch_size,
               config.edit_lr, config.seed + 5, log, sources=sources)


def write_edit_sets(folder: Path, per_split: dict[str, int], seed: int = 0) -> None:
    """``{split}.jsonl`` of prompt / source_image rows and the source PNGs (backbone.source_images'
    format), with each edit's target image for reference."""
    from PIL import Image

    from genalign.shapes.editing import edit_set, render_pair

    for split, count in per_split.items():
        images = folder / split
        images.mkdir(parents=True, exist_ok=True)
        rows = []
        for index, example in enumerate(edit_set(split, count, seed)):
            source, target = render_pair(example)
            for name, image in (("source", source), ("target", target)):
                Image.fromarray((image * 255).round().astype(np.uint8)).save(images / f"{index:04d}-{name}.png")
            rows.append(json.dumps({"prompt": example.prompt, "source_image": f"{split}/{index:04d}-source.png",
                                    "target_image": f"{split}/{index:04d}-target.png", "kind": example.kind}))
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n")


def _build_edit(config: BuildConfig, out: Path, vae: Any, log: dict[str, Any]) -> None:
    pipe = make_edit_pipeline(vae, config.seed + 5)
    sources, targets, prompts = make_edit_dataset(config.edit_dataset_size, config.seed + 5)
    train_edit(pipe, sources, targets, prompts, config, log)
    folder = out / "kontext"
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    write_edit_sets(folder / "edits", dict(zip(("train", "heldout"), config.edit_sets)))


# --------------------------------------------------------------------------- the text task's models

TEXT_TOKENS = 12  # 'a sign that reads "123"': a, sign, that, reads, ", 1, 2, 3, " and BOS / EOS
OCR_SIZE = 64  # the tiny GOT-OCR reads 64 px (its processor upsamples the 32 px images): 16 image tokens
GOT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<imgpad>"]


def make_text_pipeline(vae: Any, seed: int) -> Any:
    """The text task's FluxPipeline (see :func:`make_flux_pipeline`); digits and quotes are the
    tokenizer's single characters."""
    from diffusers import FluxPipeline

    from genalign.shapes.text import text_words

    return make_flux_pipeline(vae, seed, text_words(), TEXT_TOKENS, FluxPipeline)


def make_text_dataset(size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """``size`` train-split renders (N, 3, 32, 32) in [-1, 1] and their prompts."""
    from genalign.shapes.text import text_examples

    stream = text_examples("train", seed)
    images, prompts = [], []
    for _ in range(size):
        image, prompt = next(stream)
        images.append(torch.from_numpy(image).permute(2, 0, 1))
        prompts.append(prompt)
    return torch.stack(images) * 2 - 1, prompts


def make_got_tokenizer() -> Any:
    """A byte-level BPE (GOT-OCR's Qwen tokenizer in small): trained on GOT's query text, every
    digit a token of its own, GOT's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["system You should follow the instructions carefully and explain your answers in detail. user OCR: "
              "assistant"] * 20
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=GOT_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def make_text_ocr(folder: Path, seed: int) -> None:
    """A tiny GOT-OCR 2.0 (GotOcr2ForConditionalGeneration: SAM-style vision tower, two stride-2
    convolutions, a Qwen2 decoder) with its processor, saved untrained in ``folder``."""
    from transformers import GotOcr2Config, GotOcr2ForConditionalGeneration, GotOcr2ImageProcessor, GotOcr2Processor

    tokenizer = make_got_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    patch = 4
    config = GotOcr2Config(
        vision_config=dict(hidden_size=64, output_channels=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=OCR_SIZE, patch_size=patch, window_size=4, global_attn_indexes=[1], mlp_dim=128),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, eos_token_id=ids("<|im_end|>"),
                         pad_token_id=ids("<|endoftext|>"), tie_word_embeddings=True),
        image_token_index=ids("<imgpad>"), image_seq_length=(OCR_SIZE // patch // 4) ** 2)
    torch.manual_seed(seed)
    GotOcr2ForConditionalGeneration(config).save_pretrained(folder, safe_serialization=True)
    GotOcr2Processor(image_processor=GotOcr2ImageProcessor(size={"height": OCR_SIZE, "width": OCR_SIZE}),
                     tokenizer=tokenizer).save_pretrained(folder)


def degrade(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """What generated text looks like beside its render (for training the OCR): a blur of random
    width (sigma up to 1.2 px), a shift of up to a pixel, per-channel gains 0.5-1 (hue drift),
    a dark offset and Gaussian noise; images (B, 3, H, W) in [0, 1]."""
    batch = len(images)
    sigma = torch.rand(batch, generator=g) * 1.2 + 1e-3
    taps = torch.arange(-2, 3, dtype=torch.float32)
    kernels = torch.exp(-taps[None] ** 2 / (2 * sigma[:, None] ** 2))
    kernels = kernels / kernels.sum(1, keepdim=True)  # (B, 5)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="replicate")
    rows = (padded.unfold(-1, 5, 1) * kernels[:, None, None, None]).sum(-1)  # (B, 3, H + 4, W)
    blurred = (rows.unfold(-2, 5, 1) * kernels[:, None, None, None]).sum(-1)  # (B, 3, H, W)
    shifts = torch.randint(-1, 2, (batch, 2), generator=g).tolist()
    shifted = torch.stack([torch.roll(b, (dy, dx), dims=(1, 2)) for b, (dy, dx) in zip(blurred, shifts)])
    gains = 0.5 + 0.5 * torch.rand(batch, 3, 1, 1, generator=g)
    offset = 0.1 * torch.rand(batch, 1, 1, 1, generator=g)
    noise = torch.randn(images.shape, generator=g) * 0.08 * torch.rand(batch, 1, 1, 1, generator=g)
    return (shifted * gains + offset + noise).clamp(0, 1)


def train_text_ocr(folder: Path, config: BuildConfig, log: dict[str, Any]) -> None:
    """Teacher-forced reading of renders of 1-3 digit strings (every string of both splits: the OCR is
    the reward's pretrained reader; the length uniform, as the generator's prompts), a quarter of them
    with one glyph that is no digit, read ``?`` (a reader that names a digit for any glyph is a reward
    the generator games: docs/shapes.md), degraded as generated images are (:func:`degrade`), through
    the ocr reward's own path (GOT's query, the tensor preprocessing); saved over the untrained
    weights. In fp32, lr 1e-3, 3,000 steps: measurements in docs/shapes.md ("Text rendering")."""
    from genalign.rewards.ocr import GotOCR
    from genalign.shapes.text import MAX_DIGITS, all_texts, malformed, render_segments, render_text

    def tensor(image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(image).permute(2, 0, 1)

    by_length = [[t for t in all_texts() if len(t) == k] for k in range(1, MAX_DIGITS + 1)]
    renders = [torch.stack([tensor(render_text(t)) for t in texts]) for texts in by_length]
    rng = np.random.default_rng(config.seed + 7)
    odd = [malformed(rng) for _ in range(4000)]
    odd_renders = torch.stack([tensor(render_segments(slots)) for slots, _ in odd])
    ocr = GotOCR(str(folder), torch.device("cpu"), torch.float32)
    ocr.model.requires_grad_(True).train()
    params = [p for p in ocr.model.parameters() if p.requires_grad]

    def loss_fn(step: int, g: torch.Generator) -> torch.Tensor:
        images, labels = [], []
        for _ in range(config.ocr_batch_size):
            if torch.rand((), generator=g) < 0.25:
                pick = int(torch.randint(len(odd), (), generator=g))
                images.append(odd_renders[pick])
                labels.append(odd[pick][1])
            else:
                length = int(torch.randint(MAX_DIGITS, (), generator=g))
                pick = int(torch.randint(len(by_length[length]), (), generator=g))
                images.append(renders[length][pick])
                labels.append(by_length[length][pick])
        return -ocr.text_logprobs(degrade(torch.stack(images), g), labels).mean()

    _train("ocr", params, config.ocr_steps, config.ocr_lr, loss_fn, config.seed + 7, log, autocast=False)
    ocr.model.eval().requires_grad_(False)
    ocr.model.save_pretrained(folder, safe_serialization=True)


def write_text_prompts(folder: Path) -> None:
    """``prompts_train.txt`` / ``prompts_heldout.txt``: every string of each split, one prompt a line."""
    from genalign.shapes.text import prompt_for, split_texts

    for split in ("train", "heldout"):
        (folder / f"prompts_{split}.txt").write_text("".join(prompt_for(t) + "\n" for t in split_texts(split)))


def _build_text(config: BuildConfig, out: Path, vae: Any, log: dict[str, Any]) -> None:
    from genalign.core.experiment import BackboneConfig
    from genalign.pipelines.flux import FluxBackbone

    folder = out / "text"
    pipe = make_text_pipeline(vae, config.seed + 6)
    images, prompts = make_text_dataset(config.text_dataset_size, config.seed + 6)
    backbone = FluxBackbone(pipe, BackboneConfig(family="flux", finetune="full"))
    train_flux("text", backbone, images, prompts, TEXT_TOKENS, config.text_steps, config.text_batch_size,
               config.text_lr, config.seed + 6, log)
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    write_text_prompts(folder)
