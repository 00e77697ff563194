"""Images for a benchmark from any generator, written in the benchmark's official layout.

A generator is a function ``(prompts, seeds) -> images (B, 3, H, W) in [0, 1]`` (one image per
prompt, seeded by its seed); :func:`backbone_sampler` makes one from a Backbone (with a LoRA
loaded or not), the CLI wraps ReNO the same way. Generation resumes: a prompt whose images are
all on disk is skipped, and each image is written as soon as its batch is done, so an interrupted
run loses at most one batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from genalign.core.images import to_pil_images
from genalign.core.sampler import initial_noise, sample
from genalign.core.types import Backbone

Generator = Callable[[list[str], list[int]], Tensor]


def backbone_sampler(backbone: Backbone, num_steps: int, guidance_scale: float, eta: float = 0.0) -> Generator:
    """A generator that samples ``backbone`` (the repo's sampler, the same as training uses): image
    i starts from the noise of ``torch.Generator().manual_seed(seeds[i])``."""

    @torch.no_grad()
    def generate(prompts: list[str], seeds: list[int]) -> Tensor:
        noise = torch.cat([initial_noise(backbone, 1, torch.Generator().manual_seed(s)) for s in seeds])
        cond = backbone.encode_prompts(prompts, guidance=guidance_scale != 1.0)
        trajectory = sample(backbone, cond, num_steps, guidance_scale, eta, latents=noise,
                            generator=torch.Generator().manual_seed(seeds[0]))
        return backbone.decode(trajectory.final).float().cpu()

    return generate


def to_pil(image: Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> RGB PIL image (rounded to 8 bits)."""
    return to_pil_images(image[None])[0]


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The seed of image ``image_index`` of prompt ``prompt_index``: fixed per (prompt, image), so
    a resumed or re-batched run makes the same images."""
    return seed * 1_000_003 + prompt_index * 1_009 + image_index


def generate_jobs(
    generator: Generator,
    jobs: Sequence[tuple[str, int, Path]],
    batch_size: int = 8,
    progress: bool = True,
) -> int:
    """Write the image of each job (prompt, seed, path) whose path does not exist yet; returns the
    number written. Batches mix prompts freely."""
    todo = [job for job in jobs if not job[2].exists()]
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="generating", unit="img")
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        images = generator([p for p, _, _ in batch], [s for _, s, _ in batch])
        if images.shape[0] != len(batch):
            raise RuntimeError(f"generator returned {images.shape[0]} images for {len(batch)} prompts")
        for image, (_, _, path) in zip(images, batch):
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial.png")
            to_pil(image).save(partial)
            partial.replace(path)  # a killed run never leaves a truncated image under the real name
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return len(todo)
