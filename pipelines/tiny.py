"""Tiny random models of each family, built from configs with the real diffusers/transformers
classes and saved as ordinary diffusers folders, so tests load them through the real loaders.

Tokenizers are built locally (no hub): a character-level CLIP BPE vocabulary written as
vocab.json + merges.txt (transformers 5 ignores vocab_file/merges_file passed directly).
"""

from __future__ import annotations

import json
import string
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

TEXT_HIDDEN = 32
MAX_TOKENS = 32


def build_clip_tokenizer(
    folder: str | Path | None = None, max_length: int = MAX_TOKENS, words: Sequence[str] = ()
) -> Any:
    """A CLIPTokenizer built locally: every printable character is a token (plus its ``</w>``
    form), and each of ``words`` becomes one token through BPE merges learned on the words, so
    that a small world's vocabulary is tokenised word by word."""
    from transformers import CLIPTokenizer

    folder = Path(folder or tempfile.mkdtemp(prefix="genalign-tok-"))
    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    if words:
        # A BPE trained on the words themselves (tokenizers' trainer) gives merges whose greedy,
        # rank-ordered application rebuilds every word whole.
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
        bpe.pre_tokenizer = pre_tokenizers.Whitespace()
        unique = sorted({w.lower() for w in words})
        trainer = trainers.BpeTrainer(vocab_size=len(tokens) + 40 * len(unique), min_frequency=1,
                                      initial_alphabet=chars, end_of_word_suffix="</w>", show_progress=False)
        bpe.train_from_iterator(unique, trainer)
        model = json.loads(bpe.to_str())["model"]
        known = set(tokens)
        for token in sorted(model["vocab"], key=model["vocab"].get):
            if token not in known:
                tokens.append(token)
                known.add(token)
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)
    if len(tokenizer) != len(tokens):  # guards against the transformers 5 silent-vocab pitfall
        raise RuntimeError(f"tiny tokenizer has {len(tokenizer)} tokens, expected {len(tokens)}")
    return tokenizer


def _text_config(vocab_size: int, projection_dim: int = TEXT_HIDDEN) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=projection_dim,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def _vae(**overrides: Any) -> Any:
    """A two-block AutoencoderKL: VAE factor 2, latents 8x8x4 for 16x16 images (``overrides``
    give the flow models' variant: no quant convs, a shift factor)."""
    from diffusers import AutoencoderKL

    config: dict[str, Any] = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    return AutoencoderKL(**{**config, **overrides})


def _flow_vae(shift_factor: float) -> Any:
    """SD3 / FLUX VAEs: no quant convs, latents shifted then scaled."""
    return _vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=shift_factor, scaling_factor=1.5)


def _sd_scheduler(prediction_type: str, turbo: bool) -> Any:
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type)
    if turbo:  # SD-Turbo / SDXL-Turbo ship an Euler scheduler with trailing spacing
        return EulerDiscreteScheduler(**common, timestep_spacing="trailing", steps_offset=1)
    # The SD 1.5 scheduler config.
    return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def tiny_sd_pipeline(prediction_type: str = "epsilon", turbo: bool = False, seed: int = 0) -> Any:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(len(tokenizer))),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_sd_scheduler(prediction_type, turbo),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(prediction_type: str = "epsilon", turbo: bool = False, seed: int = 0) -> Any:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * TEXT_HIDDEN,  # the two encoders' hidden states, concatenated
        attention_head_dim=(4, 8),
        norm_num_groups=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + TEXT_HIDDEN,
        use_linear_projection=True,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(len(tokenizer))),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(len(tokenizer))),
        tokenizer=tokenizer,
        tokenizer_2=build_clip_tokenizer(),
        unet=unet,
        scheduler=_sd_scheduler(prediction_type, turbo),
    )


def build_t5_tokenizer(folder: str | Path | None = None, max_length: int = MAX_TOKENS) -> Any:
    """A character-level T5 tokenizer (Unigram over single characters, SentencePiece-style spaces)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -3.0) for c in chars]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tokenizer = T5TokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0,
        model_max_length=max_length,
    )
    if folder is not None:
        tokenizer.save_pretrained(str(folder))
    return tokenizer


def tiny_sd3_pipeline(prediction_type: str = "flow", seed: int = 0) -> Any:
    """SD3 with CLIP-L and CLIP-G stand-ins and no T5 (the pipeline fills T5's part with zeros)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=2 * TEXT_HIDDEN,  # CLIP-L + CLIP-G hidden states side by side
        caption_projection_dim=32,
        pooled_projection_dim=2 * TEXT_HIDDEN,
        pos_embed_max_size=16,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_flow_vae(0.0609),
        text_encoder=CLIPTextModelWithProjection(_text_config(len(tokenizer))),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_text_config(len(tokenizer))),
        tokenizer_2=build_clip_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )


def tiny_flux_pipeline(prediction_type: str = "flow", seed: int = 0, guidance_embeds: bool = True) -> Any:
    """FLUX with a CLIP text encoder (pooled) and a small T5 encoder (tokens); [dev]-style guidance
    embedding unless ``guidance_embeds`` is off ([schnell])."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    t5_tokenizer = build_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TEXT_HIDDEN,
        pooled_projection_dim=TEXT_HIDDEN,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )
    t5 = T5EncoderModel(
        T5Config(vocab_size=len(t5_tokenizer), d_model=TEXT_HIDDEN, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    )
    if guidance_embeds:  # FLUX.1 [dev]'s scheduler: resolution-dependent (mu) shifting
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096,
        )
    else:  # FLUX.1 [schnell]'s: no shift at all
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return FluxPipeline(
        scheduler=scheduler,
        vae=_flow_vae(0.1159),
        text_encoder=CLIPTextModel(_text_config(len(tokenizer))),
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def build_qwen_tokenizer() -> Any:
    """A byte-level Qwen2 tokenizer with no merges (every byte a token) and Qwen's chat tokens."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import Qwen2TokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = Qwen2TokenizerFast(tokenizer_object=backend, unk_token=None, bos_token=None, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def _tiny_qwen25vl(tokenizer: Any, vision: dict[str, Any], **tokens: int) -> Any:
    """Qwen-Image's text encoder at toy size: a one-layer Qwen2.5-VL of width TEXT_HIDDEN with a
    one-block vision tower (``vision``: more of its config); ``tokens``: its image token ids."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    special = {"bos_token_id": None, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, **special),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=TEXT_HIDDEN,
                           fullatt_block_indexes=[0], **vision),
        **tokens, **special,
    ))


def tiny_qwenimage_pipeline(prediction_type: str = "flow", seed: int = 0) -> Any:
    """Qwen-Image: a one-layer Qwen2.5-VL text model (its vision tower tiny and unused), a
    MMDiT of two blocks, a two-level Qwen-Image VAE (factor 2, 4 latent channels) and Qwen-Image's scheduler
    (dynamic exponential shift, terminal sigma 0.02); 16 px images (``genalign.json``)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    torch.manual_seed(seed)
    tokenizer = build_qwen_tokenizer()
    text_encoder = _tiny_qwen25vl(tokenizer, {})
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=TEXT_HIDDEN, axes_dims_rope=(2, 2, 4),
    )
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 2.0])
    # Qwen-Image's scheduler_config.json
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
        max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    )
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)
    pipe.genalign_defaults = {"resolution": 16}
    return pipe


def tiny_qwenimage_edit_pipeline(prediction_type: str = "flow", seed: int = 0) -> Any:
    """Qwen-Image-Edit: tiny Qwen-Image with a Qwen2.5-VL text encoder that sees the source image
    (vision tower of one block, patch 14, and its processor: at most 56 x 56 pixels); the source is
    resized to 32 x 32 (``genalign.json``'s ``source_area``; the pipeline's is 1024 x 1024)."""
    from diffusers import QwenImageEditPipeline
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    base = tiny_qwenimage_pipeline(prediction_type, seed)
    torch.manual_seed(seed)
    tokenizer = build_qwen_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]})
    ids = tokenizer.convert_tokens_to_ids
    text_encoder = _tiny_qwen25vl(tokenizer, {"initializer_range": 0.2}, image_token_id=ids("<|image_pad|>"),
                                  video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                                  vision_end_token_id=ids("<|vision_end|>"))
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56),
                                 tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
                                 chat_template=QWEN_CHAT_TEMPLATE)
    pipe = QwenImageEditPipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=text_encoder,
                                 tokenizer=tokenizer, processor=processor, transformer=base.transformer)
    pipe.genalign_defaults = {"resolution": 16, "source_area": 32 * 32}
    return pipe


def tiny_qwenimage_edit_plus_pipeline(prediction_type: str = "flow", seed: int = 0) -> Any:
    """Qwen-Image-Edit-2509 / 2511: the tiny Qwen-Image-Edit's components in a
    QwenImageEditPlusPipeline; its VLM sees the source at 64 x 64 (``condition_area``; the
    pipeline's 384 x 384), its VAE at 32 x 32 (``source_area``)."""
    from diffusers import QwenImageEditPlusPipeline

    edit = tiny_qwenimage_edit_pipeline(prediction_type, seed)
    pipe = QwenImageEditPlusPipeline(scheduler=edit.scheduler, vae=edit.vae, text_encoder=edit.text_encoder,
                                     tokenizer=edit.tokenizer, processor=edit.processor, transformer=edit.transformer)
    pipe.genalign_defaults = {"resolution": 16, "source_area": 32 * 32, "condition_area": 64 * 64}
    return pipe


QWEN_CHAT_TEMPLATE = (  # Qwen's chat format, enough for a user turn and the generation prompt
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiny_qwen3(model_class: Any, tokenizer: Any, layers: int) -> Any:
    """A Qwen3 text model (``Qwen3Model`` or ``Qwen3ForCausalLM``) of ``layers`` tiny layers."""
    from transformers import Qwen3Config

    return model_class(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def tiny_zimage_pipeline(prediction_type: str = "flow", seed: int = 0) -> Any:
    """Z-Image: a two-layer Qwen3 text model with Qwen's chat template, a one-layer single-stream
    DiT (one refiner layer each side), the FLUX-style VAE (factor 2, 4 channels) and Z-Image's
    scheduler (static shift 3); 16 px images (``genalign.json``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Model

    torch.manual_seed(seed)
    tokenizer = build_qwen_tokenizer()
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    text_encoder = _tiny_qwen3(Qwen3Model, tokenizer, layers=2)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=TEXT_HIDDEN, axes_dims=[4, 6, 6], axes_lens=[1024, 64, 64],
    )
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_flow_vae(0.1159),
                          text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    pipe.genalign_defaults = {"resolution": 16}
    return pipe


def tiny_flux2_klein_pipeline(prediction_type: str = "flow", seed: int = 0) -> Any:
    """FLUX.2 [klein]: a three-layer Qwen3 causal LM with Qwen's chat template (its three layers'
    states side by side are the prompt, as [klein] stacks layers 9, 18 and 27), one double- and one
    single-stream block, a two-level FLUX.2 VAE (factor 2, 4 channels, 2x2 patches normalised by its
    batch-norm statistics) and a dynamically shifted scheduler; 16 px images (``genalign.json``)."""
    from diffusers import (
        Flux2KleinPipeline,
    )
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    tokenizer = build_qwen_tokenizer()
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    text_encoder = _tiny_qwen3(Qwen3ForCausalLM, tokenizer, layers=3)
    transformer, vae, scheduler = _tiny_flux2_parts(guidance_embeds=False)
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=False)
    pipe.genalign_defaults = {"resolution": 16, "text_encoder_out_layers": [1, 2, 3]}
    return pipe


def _tiny_flux2_parts(guidance_embeds: bool) -> tuple[Any, Any, Any]:
    """FLUX.2's transformer (one or two double- and single-stream blocks over 3 stacked 32-wide text
    layers), its VAE (factor 2, 4 channels, non-trivial batch-norm statistics) and scheduler."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=3 * TEXT_HIDDEN, timestep_guidance_channels=32, axes_dims_rope=(2, 2, 2, 2),
        guidance_embeds=guidance_embeds,
    )
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16,
    )
    with torch.no_grad():  # statistics that are not the identity, so that the normalisation is exercised
        vae.bn.running_mean.copy_(0.2 * torch.randn(16))
        vae.bn.running_var.copy_(0.5 + torch.rand(16))
    return transformer, vae, FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)


MISTRAL_CHAT_TEMPLATE = (  # Mistral Small 3's [SYSTEM_PROMPT] / [INST] format for text-only turns
    "{% for message in messages %}{% if message['role'] == 'system' %}[SYSTEM_PROMPT]"
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}[/SYSTEM_PROMPT]{% else %}[INST]"
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}[/INST]{% endif %}{% endfor %}"
)


def tiny_flux2_pipeline(prediction_type: str = "flow", seed: int = 0) -> Any:
    """FLUX.2 [dev]: a three-layer Mistral3 (its Pixtral vision tower tiny and unused) behind a
    PixtralProcessor with Mistral's chat format, and the [klein] layout's guidance-embedding transformer,
    VAE and scheduler; 16 px images (``genalign.json``)."""
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralImageProcessor, PixtralProcessor

    torch.manual_seed(seed)
    tokenizer = build_qwen_tokenizer()  # any byte-level tokenizer: the processor adds Mistral's tokens
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]})
    processor = PixtralProcessor(image_processor=PixtralImageProcessor(), tokenizer=tokenizer, patch_size=16,
                                 spatial_merge_size=1, chat_template=MISTRAL_CHAT_TEMPLATE, image_token="[IMG]",
                                 image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]")
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=64,
                         num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         max_position_embeddings=1024),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=8, patch_size=16, image_size=64),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=1,
    ))
    transformer, vae, scheduler = _tiny_flux2_parts(guidance_embeds=True)
    pipe = Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=processor,
                         transformer=transformer)
    pipe.genalign_defaults = {"resolution": 16, "text_encoder_out_layers": [1, 2, 3]}
    return pipe


def tiny_layouts() -> dict[str, Any]:
    """Every backbone family's ``genalign tiny`` layouts (``DiffusersBackbone.tiny_layouts``);
    imports every backbone module."""
    from genalign.pipelines import BACKBONES

    return {name: build for cls in BACKBONES.all().values() for name, build in cls.tiny_layouts().items()}


def tiny_flux_kontext_pipeline(prediction_type: str = "flow", seed: int = 0) -> Any:
    """FLUX.1 Kontext: the tiny FLUX [dev] components in a FluxKontextPipeline."""
    from diffusers import FluxKontextPipeline

    pipe = tiny_flux_pipeline(prediction_type, seed, guidance_embeds=True)
    return FluxKontextPipeline(**{k: v for k, v in pipe.components.items() if v is not None})


def save_tiny(family: str, folder: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Build the tiny random model of ``family`` and save it as a diffusers folder (safetensors)."""
    layouts = tiny_layouts()
    if family not in layouts:
        raise ValueError(f"no tiny layout {family!r}; available: {', '.join(sorted(layouts))}")
    pipe = layouts[family](prediction_type, seed)
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    defaults = getattr(pipe, "genalign_defaults", None)
    if defaults:  # what the model's own config cannot say (backbone.checkpoint_defaults reads it)
        (folder / "genalign.json").write_text(json.dumps(defaults) + "\n")
    return folder
