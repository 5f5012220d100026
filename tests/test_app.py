"""app.py, the web page: the real server as a subprocess on a free 127.0.0.1 port with a tiny
text-conditional export (built like tests/test_inference.py's), driven through gradio_client and
through Debian's headless Chromium (Playwright, ``executable_path=/usr/bin/chromium``; ``make test``
installs it). Nothing may reach the network: analytics are off and the browser refuses (and the
test reports) any request that is not to the server.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import app
import inference_ldm
from modules.errors import UserError
from modules.ldm_io import load_ldm_export
from tiny_exports import IMG, tiny_clip, tiny_export

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "a red circle on a blue background"
STORED_GUIDANCE = 3.0  # what the export says stage 2 drew its sample grids with
NO_NETWORK_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                  "DO_NOT_TRACK": "1", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def _export(path: Path, clip: Path, conditioning: str = "text") -> Path:
    """A tiny export that records the guidance its sample grids used."""
    return tiny_export(path, conditioning, clip if conditioning == "text" else None,
                       training_config={"sampler": "ddim", "num_inference_steps": 3, "guidance_scale": STORED_GUIDANCE})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **NO_NETWORK_ENV}


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def export(clip, tmp_path_factory) -> Path:
    return _export(tmp_path_factory.mktemp("app") / "text.safetensors", clip)


@pytest.fixture(scope="module")
def server(export, tmp_path_factory):
    """app.py serving ``export``: (url, log file). One process for the whole module."""
    root = tmp_path_factory.mktemp("server")
    port = _free_port()
    log = root / "app.log"
    env = {**_env(), "GRADIO_TEMP_DIR": str(root / "gradio_tmp")}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--path_to_weights", str(export),
                                 "--port", str(port)], cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"app.py did not answer within 90 s:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            time.sleep(0.3)
    yield url, log
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _expected_image(export: Path, seed: int, steps: int, guidance: float) -> Image.Image:
    """What ``inference_ldm.py --seed <seed> --num_images 1`` draws (in process: same model, same rounding)."""
    model = load_ldm_export(export)
    images = model.generate(1, prompts=[PROMPT], negative_prompts=[""], guidance_scale=guidance, sampler="ddim",
                            num_inference_steps=steps, generator=torch.Generator().manual_seed(seed))
    return inference_ldm.to_pil(images[0])


def test_one_api_request_returns_the_images_and_the_settings(server, export, tmp_path):
    from gradio_client import Client

    url, _ = server
    client = Client(url, download_files=str(tmp_path), verbose=False)
    gallery, settings_text = client.predict(PROMPT, "", "ddim", 3, STORED_GUIDANCE, 5, 2, api_name="/generate")
    settings = json.loads(settings_text)
    assert settings["prompt"] == PROMPT and settings["negative_prompt"] == ""
    assert (settings["sampler"], settings["num_inference_steps"], settings["guidance_scale"]) == ("ddim", 3, 3.0)
    assert settings["seed"] == 5 and settings["seeds"] == [5, 6] and settings["num_images"] == 2
    assert [item["caption"] for item in gallery] == ["seed 5", "seed 6"]
    pixels = []
    for item, seed in zip(gallery, (5, 6)):
        with Image.open(item["image"]) as image:
            assert image.format == "PNG" and image.size == (IMG, IMG) and image.mode == "RGB"
            pixels.append(np.asarray(image))
        # Image i is drawn from seed + i alone: exactly what a one-image run with that seed gives.
        assert np.array_equal(pixels[-1], np.asarray(_expected_image(export, seed, 3, STORED_GUIDANCE)))
    assert not np.array_equal(pixels[0], pixels[1])


def test_the_page_in_headless_chromium(server, tmp_path):
    from playwright.sync_api import sync_playwright

    url, _ = server
    outside = []  # requests the page tried to make anywhere but the server

    def only_the_server(route):
        if route.request.url.startswith(url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_playwright() as pw:
        # Playwright adds --headless itself; a persistent context makes the profile folder ours and fresh.
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
            args=[flag for flag in CHROMIUM_FLAGS if flag != "--headless"], viewport={"width": 1280, "height": 900})
        try:
            browser.route("**/*", only_the_server)
            page = browser.new_page()
            page.goto(url, wait_until="networkidle", timeout=60_000)
            # The guidance control starts at what the export recorded for stage 2's sample grids.
            assert float(page.locator("#guidance input").input_value()) == STORED_GUIDANCE
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#seed input").fill("11")
            page.locator("#generate").click()
            images = page.locator("#gallery img")
            images.nth(3).wait_for(state="visible", timeout=60_000)  # the default is 4 images
            page.wait_for_function("[...document.querySelectorAll('#gallery img')].every(i => i.complete && "
                                   "i.naturalWidth > 0)", timeout=30_000)
            page.locator("#settings").get_by_text('"seeds"').wait_for(timeout=30_000)
            shot = tmp_path / "app.png"
            page.screenshot(path=str(shot), full_page=True)
            assert images.count() == 4
            settings = json.loads(page.locator("#settings .cm-content").inner_text())
        finally:
            browser.close()
    assert settings["prompt"] == PROMPT and settings["seed"] == 11 and settings["seeds"] == [11, 12, 13, 14]
    assert settings["guidance_scale"] == STORED_GUIDANCE
    with Image.open(shot) as image:
        assert image.size[0] == 1280 and image.size[1] >= 600
    assert outside == []


def test_a_second_request_is_served_by_the_same_process(server, tmp_path):
    from gradio_client import Client

    url, log = server
    client = Client(url, download_files=str(tmp_path), verbose=False)
    for seed in (1, 2):
        gallery, settings_text = client.predict("a green square on a white background", "a red circle", "ddpm", 2,
                                                1.5, seed, 1, api_name="/generate")
        assert len(gallery) == 1 and json.loads(settings_text)["seeds"] == [seed]
    text = log.read_text()
    assert text.count(" loaded ") == 1  # the model was loaded once, at start
    assert text.count("generated ") >= 2
    assert "Traceback" not in text


def test_page_defaults_come_from_the_export_else_the_stage2_config():
    from modules.sampling_settings import SamplingSettings
    from stage2_diffusion_trainer import Stage2TrainingArgs

    stored = app.page_defaults({"training_config": {"sampler": "ddpm", "num_inference_steps": 7,
                                                    "guidance_scale": 2.5, "timestep_spacing": "trailing"}})
    assert stored == SamplingSettings("ddpm", 7, 2.5, timestep_spacing="trailing")
    # An export that records nothing: the built-in defaults, which are the stage-2 config's own.
    fallback = Stage2TrainingArgs()
    got = app.page_defaults({"step": 0})
    assert (got.sampler, got.num_inference_steps, got.guidance_scale, got.eta, got.karras) == (
        fallback.sampler, fallback.num_inference_steps, fallback.guidance_scale, fallback.ddim_eta,
        fallback.karras_sigmas)
    assert app.SAMPLERS == tuple(__import__("modules.ldm_io", fromlist=["SAMPLERS"]).SAMPLERS)


def test_a_missing_file_a_wrong_kind_or_a_class_model_is_one_line_and_exit_2(clip, tmp_path):
    missing = subprocess.run([sys.executable, str(REPO / "app.py"), "--path_to_weights", str(tmp_path / "nope.safetensors")],
                             env=_env(), capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope.safetensors'}: weights file not found"]
    # The same UserError path (run_main makes each one line and exit 2), in process: faster.
    from modules.export import export_safetensors

    vae = export_safetensors({"w": torch.zeros(1)}, tmp_path / "vae.safetensors", kind="vae", metadata={})
    with pytest.raises(UserError, match=rf"--path_to_weights {vae} is a stage-1 VAE export .*; expected a stage-2"):
        app.main(["--path_to_weights", str(vae), "--device", "cpu"])
    class_export = _export(tmp_path / "class.safetensors", clip, "class")
    with pytest.raises(UserError, match="is class-conditional; the page needs a text-conditional model"):
        app.main(["--path_to_weights", str(class_export), "--device", "cpu"])
