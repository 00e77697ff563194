"""Tiny, randomly initialised reward backbones saved the way the real ones are published, so the
adapters are tested through their real loading code without any download."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

DATA = Path(__file__).parent / "data"
AESTHETIC_MLP = Path(__file__).resolve().parents[1] / "genalign" / "data" / "aesthetic" / "sac+logos+ava1-l14-linearMSE.safetensors"


def board_photo() -> Image.Image:
    """A real photo (360x238), see tests/data/README.md."""
    return Image.open(DATA / "board.jpg").convert("RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) float in [0, 1] from a PIL image, no resampling."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255


def save_tiny_transformers_clip(folder: Path, projection_dim: int = 32, image_size: int = 32, seed: int = 0) -> Path:
    """A tiny CLIPModel + tokenizer + CLIPImageProcessor folder, laid out like a hub CLIP repo."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from genalign.pipelines.tiny import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(folder, max_length=16, words=["red", "blue", "circle", "square", "photo"])
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": image_size, "patch_size": 8},
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
                       ).save_pretrained(folder)
    return folder


def register_tiny_open_clip(folder: Path, name: str = "genalign-tiny-ViT") -> str:
    """An open_clip architecture config (the default BPE tokenizer's 49408 tokens) registered by name."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{name}.json")
    return name


def save_tiny_open_clip_checkpoint(file: Path, model_name: str, seed: int = 0, wrap: bool = True) -> torch.nn.Module:
    """Random weights for ``model_name`` saved as HPS / open_clip checkpoints are ({"state_dict": ...})."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.create_model(model_name, pretrained=None)
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    state = model.state_dict()
    torch.save({"state_dict": state} if wrap else state, file)
    return model.eval()
