"""The Gradio demo: path checks, the labels file, grids; the served app through gradio_client; and
the page in a real headless Chromium (Debian's /usr/bin/chromium driven by playwright).

The app tests skip without gradio, the browser test without chromium or playwright, unless
GENALIGN_REQUIRE_BROWSER=1 (CI), where a missing piece fails instead.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genalign.core.config import ConfigError
from genalign.demo import AllowedRoots, DemoConfig, PathNotAllowed, add_arguments, config_from_args
from genalign.demo.config import parse_backbones, parse_rewards, parse_seeds, parse_variants, variant_default_name
from genalign.demo.grid import assemble_grid
from genalign.demo.labels import LabelStore, read_label_lines, read_pairs

REPO = Path(__file__).resolve().parent.parent
SHAPES = REPO / "models" / "shapes"
CHROMIUM = Path(os.environ.get("GENALIGN_CHROMIUM", "/usr/bin/chromium"))  # Debian's chromium
REQUIRE_BROWSER = os.environ.get("GENALIGN_REQUIRE_BROWSER") == "1"
SHAPES_PROMPT = "a photo of two circles"
STEPS = 4  # enough to tell variants apart; keeps the file fast
# several LoRAs on one model is the point (one backbone, adapters switched by name)
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")


def _missing(what: str) -> None:
    if REQUIRE_BROWSER:
        pytest.fail(f"GENALIGN_REQUIRE_BROWSER=1 but {what}")
    pytest.skip(what)


# --------------------------------------------------------------------------- pure functions


def test_paths_typed_in_the_page_must_stay_inside_the_configured_folders(tmp_path):
    inside, outside = tmp_path / "runs", tmp_path / "secret"
    (inside / "dpo").mkdir(parents=True)
    outside.mkdir()
    (inside / "escape").symlink_to(outside)
    roots = AllowedRoots([inside])
    assert roots.check(str(inside / "dpo")) == (inside / "dpo").resolve()
    for bad in (str(inside / ".." / "secret"), str(outside), str(inside / "escape"), str(inside / "escape" / "x"),
                "/etc/passwd", "https://example.com/lora.safetensors", "", "runs/\x00"):
        with pytest.raises(PathNotAllowed):
            roots.check(bad, "variant path")
    with pytest.raises(PathNotAllowed, match="outside the folders"):
        roots.check(str(inside / ".." / "secret"))


def test_configured_paths_become_the_allowed_folders(tmp_path):
    lora = tmp_path / "runs" / "dpo" / "final" / "pytorch_lora_weights.safetensors"
    lora.parent.mkdir(parents=True)
    lora.write_bytes(b"")
    config = DemoConfig(backbones=parse_backbones([str(SHAPES / "sd")], []),
                        variants=parse_variants([str(lora)]), pairs_dir=str(tmp_path / "pairs"),
                        out_dir=str(tmp_path / "out"))
    assert config.variants[0].name == "dpo" and config.backbones[0].family == "sd"
    roots = config.roots()
    roots.check(str(lora))
    roots.check(str(tmp_path / "pairs" / "labels.jsonl"))
    roots.check(str(SHAPES / "sd" / "unet"))
    with pytest.raises(PathNotAllowed):
        roots.check(str(tmp_path / "runs" / "other"))
    assert config.host == "127.0.0.1" and config.share is False


def test_specs_seeds_and_names_are_checked():
    assert parse_seeds("0, 2-4 2") == [0, 2, 3, 4]
    for bad in ("", "a", "5-1", "0-1000"):
        with pytest.raises(ValueError):
            parse_seeds(bad)
    assert variant_default_name("runs/x/checkpoints/step-000100") == "x@000100"
    assert parse_rewards(["clip=models/shapes/clip", "aesthetic"])[1].path is None
    with pytest.raises(ConfigError, match="unique"):
        DemoConfig(backbones=parse_backbones(["a"], ["sd"]), rewards=parse_rewards(["clip", "clip"]))
    with pytest.raises(ConfigError, match="does not exist"):
        parse_variants(["x=/no/such/lora"])
    with pytest.raises(ConfigError):
        parse_variants(["bad name=/tmp"])


def test_cli_arguments_default_to_localhost_without_share(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--backbone", f"shapes={SHAPES / 'sd'}", "--reward", f"clip={SHAPES / 'clip'}",
                              "--out", str(tmp_path)])
    config = config_from_args(args)
    assert (config.host, config.port, config.share) == ("127.0.0.1", 7860, False)
    assert config.backbones[0].name == "shapes" and config.rewards[0].name == "clip"
    with pytest.raises(ConfigError, match="pairs.jsonl"):
        config_from_args(parser.parse_args(["--backbone", "x", "--pairs", str(tmp_path)]))


def test_importing_the_demo_loads_neither_gradio_nor_torch():
    code = "import sys, genalign.demo; print(sorted(m for m in ('gradio', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_missing_gradio_is_a_clear_message(monkeypatch):
    from genalign.demo.app import DemoUnavailable, import_gradio

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    with pytest.raises(DemoUnavailable, match=r"genalign\[demo\]"):
        import_gradio()


def _write_pairs(folder: Path, count: int) -> Path:
    """A pairs folder in `genalign d3po sample`'s format (pairs.jsonl + images/), flat-colour images."""
    (folder / "images").mkdir(parents=True)
    colours = [(230, 40, 40), (50, 80, 235), (40, 190, 60), (235, 225, 40)]
    with open(folder / "pairs.jsonl", "w") as index:
        for n in range(count):
            files = []
            for side in (0, 1):
                name = f"images/{n:06d}-{side}.png"
                Image.new("RGB", (32, 32), colours[(n + side) % len(colours)]).save(folder / name)
                files.append(name)
            index.write(json.dumps({"id": f"{n:06d}", "prompt": f"a photo of {n + 1} circles", "images": files,
                                    "eta": 1.0, "guidance_scale": 2.0}) + "\n")
    return folder


def test_labels_are_appended_with_fsync_resume_and_latest_wins(tmp_path, monkeypatch):
    from genalign.finetuners.d3po import read_labels

    pairs = read_pairs(_write_pairs(tmp_path / "pairs", 4))
    labels = tmp_path / "pairs" / "labels.jsonl"
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    store = LabelStore(labels)
    assert store.first_unlabelled(pairs) == 0
    store.record(pairs[0], "left")
    store.record(pairs[1], "tie")
    assert len(synced) >= 2  # every decision is on disk before record() returns
    resumed = LabelStore(labels)  # a restarted server
    assert resumed.first_unlabelled(pairs) == 2 and resumed.choice("000000") == "left"
    resumed.record(pairs[0], "right")  # relabelling appends; nothing is overwritten
    lines = [json.loads(line) for line in labels.read_text().splitlines()]
    assert [(r["id"], r["preferred"]) for r in lines] == [("000000", 0), ("000001", "tie"), ("000000", 1)]
    exported = json.loads(resumed.export_json(tmp_path / "labels.json").read_text())
    assert exported == {"000000": 1, "000001": "tie"}
    # D3PO trains on either file and reads the same preferences (+1: first image better, -1: second)
    assert read_labels(labels) == read_labels(tmp_path / "labels.json") == {"000000": -1.0, "000001": 0.0}


def test_a_torn_last_line_is_skipped_and_never_swallows_the_next_label(tmp_path):
    pairs = read_pairs(_write_pairs(tmp_path / "pairs", 3))
    labels = tmp_path / "labels.jsonl"
    LabelStore(labels).record(pairs[0], "left")
    with open(labels, "ab") as file:
        file.write(b'{"id": "000001", "prefer')  # the server died mid-write
    store = LabelStore(labels)
    assert store.unreadable_lines == 1 and store.first_unlabelled(pairs) == 1
    store.record(pairs[1], "right")
    records, bad = read_label_lines(labels)
    assert [(r["id"], r["preferred"]) for r in records] == [("000000", 0), ("000001", 1)] and bad == 1


def test_pairs_pointing_outside_their_folder_are_refused(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    (folder / "pairs.jsonl").write_text(json.dumps({"id": "0", "prompt": "p", "images": ["../x.png", "y.png"]}) + "\n")
    with pytest.raises(ValueError, match="outside the pairs folder"):
        read_pairs(folder)


def test_grid_puts_each_image_in_its_row_and_column():
    colours = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(255, 255, 0), (0, 255, 255), (255, 0, 255)]]
    rows = [[np.full((32, 32, 3), c, np.uint8) for c in row] for row in colours]
    grid = assemble_grid(rows, ["base", "dpo"], ["seed 0", "seed 1", "seed 2"], [["a", "b", "c"], ["d", "e", "f"]])
    pixels = np.asarray(grid)
    # find each colour's pixels: 32 px images enlarged 4x to 128 px cells, in reading order
    centres = {}
    for r, row in enumerate(colours):
        for c, colour in enumerate(row):
            ys, xs = np.nonzero((pixels == colour).all(-1))
            assert len(ys) == 128 * 128, (r, c)
            centres[r, c] = (ys.mean(), xs.mean())
    assert centres[0, 0][1] < centres[0, 1][1] < centres[0, 2][1]
    assert centres[0, 0][0] < centres[1, 0][0] and abs(centres[0, 2][1] - centres[1, 2][1]) < 1
    with pytest.raises(ValueError):
        assemble_grid(rows, ["one label"], ["a", "b", "c"])


def test_checkpoint_lora_weights_keep_their_scale():
    import torch

    from genalign.demo.models import locate_variant, lora_from_checkpoint

    weights = {"up.to_q.lora_A.default.weight": torch.ones(2, 3), "up.to_q.lora_B.default.weight": torch.ones(3, 2),
               "critic.weight": torch.ones(1)}
    state = lora_from_checkpoint(weights, rank=2, alpha=4.0)
    # the file format has no alpha (diffusers loads it as alpha = rank): B carries alpha / rank = 2
    assert set(state) == {"up.to_q.lora_A.weight", "up.to_q.lora_B.weight"}
    assert float(state["up.to_q.lora_B.weight"][0, 0]) == 2.0 and float(state["up.to_q.lora_A.weight"][0, 0]) == 1.0
    with pytest.raises(ConfigError):
        locate_variant(REPO / "tests")


# --------------------------------------------------------------------------- the served app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The demo on the shipped shapes SD model with four variants: a zero LoRA and a copy of the
    full denoiser (both the base model exactly), a perturbed LoRA and the same weights as a trainer
    checkpoint; the CLIP proxy reward; three pairs to label. Outbound connections are recorded."""
    try:
        import gradio  # noqa: F401
        import gradio_client  # noqa: F401
    except ImportError:
        _missing("gradio is not installed (pip install -e '.[demo]')")
    import torch
    from safetensors.torch import save_file

    from genalign.core.experiment import BackboneConfig
    from genalign.demo import build_app, launch
    from genalign.pipelines import load_backbone

    root = tmp_path_factory.mktemp("demo")
    runs = root / "runs"
    trained = load_backbone(BackboneConfig(family="sd", path=str(SHAPES / "sd"), finetune="none"))
    trained.unwrapped_denoiser.save_pretrained(runs / "full" / "final" / "denoiser")  # full fine-tuning's export
    trained.config.finetune = "lora"  # one load: the plain denoiser above, then LoRA on the same model
    trained.add_lora(rank=4, alpha=4.0)
    zero = trained.save_lora(runs / "zero")  # a fresh LoRA: B = 0, the base model exactly
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in trained.named_trainable_parameters().items():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    bumped = trained.save_lora(runs / "bumped")
    checkpoint = runs / "bumped-run" / "checkpoints" / "step-000001"  # the trainer's layout
    checkpoint.mkdir(parents=True)
    (runs / "bumped-run" / "config.yaml").write_text("backbone: {lora_rank: 4, lora_alpha: 4.0}\n")
    save_file({n: p.detach().float().contiguous() for n, p in trained.named_trainable_parameters().items()},
              str(checkpoint / "trainable.safetensors"))
    del trained
    pairs = _write_pairs(root / "pairs", 3)
    config = DemoConfig(
        backbones=parse_backbones([f"shapes-sd={SHAPES / 'sd'}"], []),
        variants=parse_variants([f"zero={zero.parent}", f"bumped={bumped}", f"bumped-ckpt={checkpoint}",
                                 f"full={runs / 'full'}"]),
        rewards=parse_rewards([f"clip={SHAPES / 'clip'}"]),
        pairs_dir=str(pairs), out_dir=str(root / "out"), steps=STEPS, guidance_scale=2.0, device="cpu",
        port=_free_port(),
    )
    outbound: list[str] = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo
    local = ("127.0.0.1", "localhost", "::1", "0.0.0.0")

    def connect(self, address):  # type: ignore[no-untyped-def]
        if isinstance(address, tuple) and address[0] not in local:
            outbound.append(str(address))
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host not in local and host is not None:
            outbound.append(str(host))
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo
    old_temp = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(root / "gradio-cache")
    app = build_app(config)
    try:
        launch(app, config, block=False)
        yield {"url": f"http://127.0.0.1:{config.port}/", "config": config, "root": root, "outbound": outbound,
               "labels": pairs / "labels.jsonl"}
    finally:
        app.close()
        socket.socket.connect, socket.getaddrinfo = real_connect, real_getaddrinfo
        if old_temp is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = old_temp


def _compare(client, prompts: str, seeds: str, variants: list[str], reno: list[str] | None = None):  # noqa: ANN202
    # inputs in the page's order: backbone, prompts, seeds, variants, ReNO rows, rewards, steps, guidance,
    # ReNO reward, ReNO steps, ReNO iterations, ReNO lr
    return client.predict("shapes-sd", prompts, seeds, variants, reno or [], ["clip"], STEPS, 2.0, "clip", 1, 2,
                          5.0, api_name="/compare")


def _image(item) -> np.ndarray:  # noqa: ANN001
    image = item["image"]
    path = image["path"] if isinstance(image, dict) else image
    return np.asarray(Image.open(path).convert("RGB"))


def test_api_compares_variants_on_the_same_seeds(served):
    from gradio_client import Client

    client = Client(served["url"], verbose=False)
    rows = ["base", "zero", "full", "bumped", "bumped-ckpt"]
    error, grid, gallery, summary, files, scores = _compare(client, SHAPES_PROMPT, "0, 1", rows)
    assert not error.get("visible")
    items = gallery["value"]
    assert len(items) == 10 and [c["row"] for c in scores["cells"]] == [r for r in rows for _ in (0, 1)]
    images = {(c["row"], c["seed"]): _image(item) for c, item in zip(scores["cells"], items)}
    for seed in (0, 1):  # a column shares its noise: a zero LoRA and the same denoiser give the base image
        assert np.array_equal(images["base", seed], images["zero", seed])
        assert np.array_equal(images["base", seed], images["full", seed])
        assert np.array_equal(images["bumped", seed], images["bumped-ckpt", seed])  # checkpoint = its LoRA file
    assert not np.array_equal(images["base", 0], images["bumped", 0])
    assert not np.array_equal(images["base", 0], images["base", 1])  # a column is its own seed
    assert all(isinstance(c["scores"]["clip"], float) for c in scores["cells"])
    assert all(c["gold"] is not None and isinstance(c["gold"]["correct"], bool) for c in scores["cells"])
    assert "mean clip" in summary and "gold accuracy" in summary
    assert sorted(Path(f).name for f in files) == ["grid.png", "scores.json"]
    shown = Image.open(grid)
    downloaded = Image.open(next(f for f in files if f.endswith("grid.png")))
    assert shown.size == downloaded.size and np.array_equal(np.asarray(shown), np.asarray(downloaded))
    assert shown.width > 2 * 128 and shown.height > 5 * 128  # 2 columns, 5 rows of enlarged 32 px cells


def test_api_shows_errors_in_the_page_and_keeps_serving(served):
    from gradio_client import Client

    client = Client(served["url"], verbose=False)
    error, *_ = _compare(client, SHAPES_PROMPT, "zero", ["base"])
    assert error["visible"] and "seeds" in error["value"]
    status, *_ = client.predict("evil", "/etc", ["base"], ["base"], api_name="/add_variant")
    assert status["visible"] and "outside the folders" in status["value"]
    status, *_ = client.predict("sneaky", str(served["root"] / "runs" / "zero" / ".." / ".." / ".."), ["base"],
                                ["base"], api_name="/add_variant")
    assert "outside the folders" in status["value"]
    # a non-shapes prompt has no gold verdict; ReNO on top runs from the same seed
    error, _, gallery, _, _, scores = _compare(client, "a lighthouse at dusk", "3", ["base"], reno=["base"])
    assert not error.get("visible") and [c["row"] for c in scores["cells"]] == ["base", "base + ReNO"]
    assert all(c["gold"] is None for c in scores["cells"]) and len(gallery["value"]) == 2
    assert served["outbound"] == []  # no analytics, no version check, nothing but localhost


# --------------------------------------------------------------------------- the page in a real browser


def test_browser_compares_and_labels(request):
    if not CHROMIUM.exists():
        _missing(f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install playwright)")
    served = request.getfixturevalue("served")  # only once the browser is known to be there
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run"]
    shots = Path(os.environ.get("GENALIGN_SCREENSHOTS", served["root"]))
    external: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=args, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.on("request", lambda request: external.append(request.url)
                    if not request.url.startswith((served["url"], "data:", "blob:")) else None)
            page.goto(served["url"])
            prompt = page.locator("#compare-prompts textarea")
            prompt.fill("a photo of a red circle")
            page.locator("#compare-seeds textarea").fill("0, 1")
            page.locator("#compare-run").click()
            summary = page.locator("#compare-summary")
            summary.get_by_text("gold accuracy").wait_for(timeout=90_000)
            text = summary.inner_text()
            assert "a photo of a red circle" in text and "clip" in text and "gold" in text
            assert ("✓" in text or "✗" in text) and "bumped-ckpt" in text and "zero" in text
            assert page.locator("#compare-grid img").count() == 1
            page.get_by_text("Single images").click()
            page.locator("#compare-gallery img").nth(9).wait_for(timeout=10_000)  # 5 variants x 2 seeds
            page.screenshot(path=str(shots / "demo-compare.png"), full_page=True)

            page.get_by_role("tab", name="Label pairs").click()
            status = page.locator("#label-status")
            status.get_by_text("Pair 000000").wait_for(timeout=30_000)
            assert page.locator("#label-image-left img").count() == 1
            page.locator("#label-left").click()
            status.get_by_text("Pair 000001").wait_for(timeout=30_000)
            assert "1 of 3 labelled" in status.inner_text()
            page.screenshot(path=str(shots / "demo-label.png"), full_page=True)
        finally:
            browser.close()
    lines = [json.loads(line) for line in served["labels"].read_text().splitlines()]
    assert [(r["id"], r["preferred"], r["choice"]) for r in lines] == [("000000", 0, "left")]
    assert external == []  # fonts, scripts and styles all come from the local server
