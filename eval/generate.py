"""Images for a benchmark from any generator, written in the benchmark's official layout.

A generator is a function ``(prompts, seeds) -> images (B, 3, H, W) in [0, 1]`` (one image per
prompt, seeded by its seed); :func:`backbone_sampler` makes one from a Backbone (with a LoRA
loaded or not), ``genalign.finetuners.reno.reno_sampler`` runs ReNO on one. Generation resumes: a prompt whose images are
all on disk is skipped, and each image is written as soon as its batch is done, so an interrupted
run loses at most one batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from genalign.core.images import save_grid, to_pil_images
from genalign.core.rollout import rollout
from genalign.core.types import Backbone

Generator = Callable[[list[str], list[int]], Tensor]


def backbone_sampler(backbone: Backbone, num_steps: int, guidance_scale: float, eta: float = 0.0) -> Generator:
    """A generator that samples ``backbone`` (the repo's sampler, the same as training uses): image
    i starts from the noise of ``torch.Generator().manual_seed(seeds[i])``."""

    @torch.no_grad()
    def generate(prompts: list[str], seeds: list[int]) -> Tensor:
        return rollout(backbone, prompts, num_steps, guidance_scale, eta, seeds=seeds,
                       generator=torch.Generator().manual_seed(seeds[0])).images.cpu()

    return generate


@torch.no_grad()
def sample_prompts(backbone: Backbone, prompts: list[str], num_steps: int, guidance_scale: float, eta: float = 0.0,
                   images_per_prompt: int = 1, batch_size: int = 8, seed: int = 0,
                   negative_prompt: str | None = None, progress: bool = False) -> tuple[Tensor, list[str]]:
    """``genalign sample``'s images (N, 3, H, W) on the CPU and the prompt of each: ``batch_size``
    prompts at a time, each batch repeated ``images_per_prompt`` times (batch order), the noise of
    every batch drawn in turn from one generator seeded by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    images, image_prompts = [], []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size] * images_per_prompt
        image_prompts += batch
        negative = [negative_prompt] * len(batch) if negative_prompt else None
        images.append(rollout(backbone, batch, num_steps, guidance_scale, eta, generator=generator,
                              negative_prompts=negative, progress=progress).images.cpu())
    return torch.cat(images), image_prompts


def write_samples(out: Path, images: Tensor, prompts: list[str], fps: int = 8) -> None:
    """``NNNN.png`` per image (videos (B, F, 3, H, W): ``NNNN.gif``, looping at ``fps``), ``grid.png``
    (videos: a row of frames each) and ``prompts.tsv`` (file, prompt) in ``out``."""
    from torchvision.utils import save_image

    out.mkdir(parents=True, exist_ok=True)
    names = []
    for i, image in enumerate(images):
        if images.ndim == 5:
            names.append(f"{i:04d}.gif")
            first, *rest = to_pil_images(image)
            first.save(out / names[-1], save_all=True, append_images=rest, duration=round(1000 / fps), loop=0)
        else:
            names.append(f"{i:04d}.png")
            save_image(image, out / names[-1])
    save_grid(images, out / "grid.png")
    (out / "prompts.tsv").write_text("".join(f"{n}\t{p}\n" for n, p in zip(names, prompts)))


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
