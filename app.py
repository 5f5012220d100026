"""A web page that generates images with a trained text-conditional latent diffusion model.

The stage-2 export (``<working_directory>/model.safetensors``) is loaded once, when the server
starts, and then serves every request: prompt, negative prompt, sampler, steps, classifier-free
guidance, seed and number of images in; a gallery and the settings used (JSON) out. Image ``i``
is drawn from its own seed, ``seed + i``, so each one is what
``inference_ldm.py --seed <seed + i> --num_images 1`` gives with the same settings. The sampler,
steps and guidance start at what stage 2 used for its sample grids (the export's
``training_config``), else at the built-in defaults (DDIM, 50 steps, guidance 7.5); the sampler's
spacing, Karras sigmas and eta follow the export for its own sampler. Requests are served one at a time.

Usage (serves http://127.0.0.1:7860 by default; nothing is shared or sent anywhere):

    python app.py --path_to_weights work_dir/diffusion_cc/model.safetensors
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import threading
import time
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import torch

from inference_ldm import to_pil  # the same rounding to 8 bits
from modules import ldm_io
from modules.cli import one_line, positive_int, run_main, setup_logging
from modules.errors import OneLineArgumentParser, UserError
from modules.export import check_export_kind, read_export_metadata
from modules.ldm_io import DTYPES, LDM_EXPORT_KIND, LatentDiffusion, inference_device, load_ldm_export
from modules.sampling_settings import SamplingSettings, resolve_sampling

logger = logging.getLogger("ldm")
SAMPLERS: Tuple[str, ...] = tuple(ldm_io.SAMPLERS)  # whatever build_sampler accepts
MAX_IMAGES = 16  # per request: a page, not a batch job
MAX_SEED = 2**31 - 1


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path_to_weights", required=True, help="the stage-2 export (model.safetensors), text-conditional")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=positive_int, default=7860)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=("auto",) + tuple(DTYPES), default="auto",
                        help="weights dtype (auto: bfloat16/float16 on a GPU, float32 on a CPU)")
    parser.add_argument("--hf_cache_dir", default=None, help="Hugging Face cache for a hub text encoder")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------
# Defaults of the page, from the export
# ----------------------------------------------------------------------------------------

def page_defaults(metadata: Mapping[str, Any]) -> SamplingSettings:
    """Where the page's controls start: the sampler, steps and guidance stage 2 drew its sample
    grids with (the export's ``training_config``), else the built-in defaults
    (:mod:`modules.sampling_settings`)."""
    return resolve_sampling(metadata)[0]


# ----------------------------------------------------------------------------------------
# The model, loaded once
# ----------------------------------------------------------------------------------------

def load_text_model(path: str, device: torch.device, dtype: torch.dtype,
                    cache_dir: Optional[str] = None) -> LatentDiffusion:
    """The export as a :class:`LatentDiffusion` on ``device``; anything but a text-conditional
    stage-2 export is a :class:`UserError`."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    weights = Path(path)
    check_export_kind(read_export_metadata(weights), weights, LDM_EXPORT_KIND, "--path_to_weights")
    model = load_ldm_export(weights, text_encoder_cache_dir=cache_dir)
    if model.conditioning != "text":
        kind = "class-conditional" if model.conditioning == "class" else "unconditional"
        raise UserError(f"--path_to_weights {path} is {kind}; the page needs a text-conditional model "
                        "(use inference_ldm.py for this one)")
    return model.to(device, dtype)


class Studio:
    """The loaded model behind the page: one request at a time (a lock), every image from its own seed."""

    def __init__(self, model: LatentDiffusion, source: str):
        self.model = model
        self.source = source
        self.lock = threading.Lock()

    def __call__(self, prompt: str, negative_prompt: str, sampler: str, steps: float, guidance: float,
                 seed: float, num_images: float) -> Tuple[List[Tuple[Any, str]], str]:
        """The page's inputs -> (gallery items (PIL image, caption), settings as JSON text).

        ``seed`` < 0 draws one; image i uses ``seed + i``.
        """
        prompt = (prompt or "").strip()
        if not prompt:
            raise UserError("type a prompt")
        if sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {sampler!r}; expected one of: {', '.join(SAMPLERS)}")
        steps, count = int(steps), int(num_images)
        if steps < 1 or not 1 <= count <= MAX_IMAGES:
            raise UserError(f"need steps >= 1 and 1 to {MAX_IMAGES} images, got {steps} steps, {count} images")
        seed = int(seed) if seed is not None and int(seed) >= 0 else random.SystemRandom().randrange(MAX_SEED)
        seeds = [seed + i for i in range(count)]
        negative = negative_prompt or ""
        start = time.perf_counter()
        # The sampler's spacing / Karras sigmas / eta: the export's for its own sampler, as inference_ldm.py.
        used, _ = resolve_sampling(self.model.metadata, sampler=sampler, num_inference_steps=steps,
                                   guidance_scale=float(guidance))
        with self.lock:  # one generation at a time on the one model
            images = self.model.generate(
                count, prompts=[prompt] * count, negative_prompts=[negative] * count,
                guidance_scale=used.guidance_scale, sampler=used.sampler, num_inference_steps=used.num_inference_steps,
                eta=used.eta, timestep_spacing=used.timestep_spacing, karras_sigmas=used.karras,
                generator=[torch.Generator().manual_seed(s) for s in seeds])  # CPU draws, as inference_ldm.py
        seconds = time.perf_counter() - start
        logger.info("generated %d image(s) for %r with %s, %d steps, guidance %.3g, seeds %s in %.1f s",
                    count, prompt, sampler, steps, float(guidance), seeds, seconds)
        settings = {"prompt": prompt, "negative_prompt": negative, "sampler": sampler, "num_inference_steps": steps,
                    "guidance_scale": float(guidance), "seed": seed, "num_images": count, "seeds": seeds,
                    "img_size": self.model.img_size, "model": self.source, "seconds": round(seconds, 2)}
        gallery = [(to_pil(image), f"seed {s}") for image, s in zip(images, seeds)]
        return gallery, json.dumps(settings, indent=2)


# ----------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------

def build_page(studio: Studio, defaults: SamplingSettings):
    """The Gradio Blocks of the page; its one event is also the API endpoint ``/generate``."""
    import gradio as gr

    def run(*inputs):
        try:
            return studio(*inputs)
        except UserError as err:  # shown on the page, not a traceback
            raise gr.Error(str(err)) from None

    with gr.Blocks(title="Latent diffusion") as page:
        gr.Markdown(f"### Latent diffusion\n`{studio.source}` ({studio.model.img_size}x"
                    f"{studio.model.img_size}, trained on {studio.model.metadata.get('training_dataset', '?')})")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", elem_id="prompt", lines=2)
                negative = gr.Textbox(label="Negative prompt", elem_id="negative_prompt",
                                      placeholder="what to steer away from (default: the empty prompt)")
                sampler = gr.Dropdown(choices=list(SAMPLERS), value=defaults.sampler, label="Sampler",
                                      elem_id="sampler")
                steps = gr.Slider(1, 1000, value=defaults.num_inference_steps, step=1, label="Steps", elem_id="steps")
                guidance = gr.Number(value=defaults.guidance_scale, label="Guidance scale (1 = off)",
                                     elem_id="guidance")
                seed = gr.Number(value=0, precision=0, minimum=-1, maximum=MAX_SEED, label="Seed (-1: random)",
                                 elem_id="seed")
                count = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Number of images", elem_id="num_images")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                gallery = gr.Gallery(label="Images", elem_id="gallery", columns=4, format="png", preview=False)
                settings = gr.Code(label="Settings used", language="json", elem_id="settings", interactive=False)
        button.click(run, [prompt, negative, sampler, steps, guidance, seed, count], [gallery, settings],
                     api_name="generate")
    return page


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    setup_logging(True)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no phoning home

    start = time.perf_counter()
    device, dtype = inference_device(args.device, args.dtype)
    model = load_text_model(args.path_to_weights, device, dtype, args.hf_cache_dir)
    logger.info("loaded %s (%dx%d, %s, %s) in %.1f s", args.path_to_weights, model.img_size, model.img_size,
                device, str(dtype).removeprefix("torch."), time.perf_counter() - start)
    defaults = page_defaults(model.metadata)
    page = build_page(Studio(model, args.path_to_weights), defaults)

    import gradio as gr

    # System fonts: the default theme would have the browser fetch Google's.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    page.queue(default_concurrency_limit=1)
    try:
        page.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False, ssr_mode=False,
                    theme=theme, quiet=True, prevent_thread_lock=True)
    except OSError as err:  # the port is taken, or the address is not this machine's
        raise UserError(f"cannot serve on {args.host}:{args.port}: {one_line(err)}") from None
    logger.info("serving on http://%s:%d (Ctrl+C stops)", args.host, args.port)
    try:
        page.block_thread()
    finally:
        page.close()


if __name__ == "__main__":
    run_main(main)
