"""inference_ldm.py and the stage-2 export: the tutorial's command, determinism, guidance,
negative prompts, img2img, class labels, and clear errors.

The exports are tests/tiny_exports.py's: tiny random networks, the UNet perturbed off its zero init.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import inference_ldm
from modules.cli import run_main
from modules.errors import UserError
from modules.ldm_io import LatentDiffusion, load_ldm_export, save_ldm_export, text_encoder_export
from modules.text_encoder import TextEncoder
from tiny_exports import IMG, tiny_clip, tiny_export

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks: one thread is fastest, and immune to a busy machine's OpenMP contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    clip = tiny_clip(root / "clip")
    init = root / "init.png"
    Image.new("RGB", (24, 20), (200, 60, 40)).save(init)
    return {"root": root, "clip": clip, "init": init, "text": tiny_export(root / "text.safetensors", "text", clip),
            "class": tiny_export(root / "class.safetensors", "class", None),
            "text_g4": tiny_export(root / "text_g4.safetensors", "text", clip, training_config={"guidance_scale": 4.0})}


def generate(export: Path, out: Path, *extra: str) -> bytes:
    """Run inference_ldm.main in process with few steps; return the PNG bytes."""
    paths = inference_ldm.main(["--path_to_weights", str(export), "--num_inference_steps", "4", "--output", str(out),
                                *extra])
    assert paths == [out]
    return out.read_bytes()


def test_tutorial_command_writes_a_png(exports, tmp_path):
    cmd = [sys.executable, str(REPO / "inference_ldm.py"), "--model_config", "configs/ldm.yaml", "--path_to_weights",
           str(exports["text"]), "--text_conditional", "--training_dataset", "conceptual_captions",
           "--prompt", "A beautiful sunset at the beach"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # tiny nets: one thread is fastest
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    written = sorted((tmp_path / "generated").glob("*.png"))
    assert len(written) == 1 and written[0].name.startswith("A_beautiful_sunset_at_the_beach-seed")
    assert result.stdout.strip() == str(Path("generated") / written[0].name)
    with Image.open(written[0]) as image:
        assert image.size == (IMG, IMG) and image.mode == "RGB"
    # configs/ldm.yaml (SD-sized) describes other weights: reported, the export's own config used.
    assert "differs from the export's own model config" in result.stderr
    assert "trained on shapes" in result.stderr


def test_same_seed_same_bytes_other_seed_other_image(exports, tmp_path):
    a = generate(exports["text"], tmp_path / "a.png", "--prompt", PROMPT, "--seed", "3")
    b = generate(exports["text"], tmp_path / "b.png", "--prompt", PROMPT, "--seed", "3")
    c = generate(exports["text"], tmp_path / "c.png", "--prompt", PROMPT, "--seed", "4")
    assert a == b and a != c
    d = generate(exports["text"], tmp_path / "d.png", "--prompt", PROMPT, "--seed", "3", "--sampler", "ddpm")
    e = generate(exports["text"], tmp_path / "e.png", "--prompt", PROMPT, "--seed", "3", "--sampler", "ddpm")
    assert d == e and d != a
    # Several images into a folder: one PNG each; into a .png file: one grid.
    paths = inference_ldm.main(["--path_to_weights", str(exports["text"]), "--prompt", PROMPT, "--num_images", "3",
                                "--num_inference_steps", "2", "--seed", "0", "--output", str(tmp_path / "many")])
    assert [p.name for p in paths] == [f"a_red_circle_on_a_blue_background-seed{i}.png" for i in range(3)] + \
        ["a_red_circle_on_a_blue_background-grid.png"]
    inference_ldm.main(["--path_to_weights", str(exports["text"]), "--prompt", PROMPT, "--num_images", "4",
                        "--num_inference_steps", "2", "--seed", "0", "--output", str(tmp_path / "grid.png")])
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (2 * IMG + 6, 2 * IMG + 6)


def _images(model: LatentDiffusion, seed: int = 0, **kw) -> torch.Tensor:
    kw.setdefault("num_inference_steps", 4)
    return model.generate(2, generator=torch.Generator().manual_seed(seed), **kw)


def test_guidance_and_negative_prompt_behave_as_their_formula_says(exports):
    model = load_ldm_export(exports["text"])
    other = "a green square on a white background"
    guided = _images(model, prompts=[PROMPT] * 2, guidance_scale=7.5)
    plain = _images(model, prompts=[PROMPT] * 2, guidance_scale=1.0)
    assert (guided - plain).abs().max() > 1e-3  # guidance changes the image
    # w = 1 is the conditional model alone: the negative prompt (the unconditional branch) has no effect.
    assert torch.equal(_images(model, prompts=[PROMPT] * 2, negative_prompts=[other] * 2, guidance_scale=1.0), plain)
    # With guidance it does.
    negative = _images(model, prompts=[PROMPT] * 2, negative_prompts=[other] * 2, guidance_scale=7.5)
    assert (negative - guided).abs().max() > 1e-3
    # w = 0 is the unconditional branch alone, i.e. the negative prompt as if it were the prompt.
    only_negative = _images(model, prompts=[PROMPT] * 2, negative_prompts=[other] * 2, guidance_scale=0.0)
    assert torch.allclose(only_negative, _images(model, prompts=[other] * 2, guidance_scale=1.0), atol=1e-5)


def test_img2img_strength(exports, tmp_path):
    model = load_ldm_export(exports["text"])
    init = inference_ldm.load_init_image(str(exports["init"]), IMG, 2)  # (2, 3, 16, 16), resized + cropped
    assert init.shape == (2, 3, IMG, IMG)
    # Strength 0 runs no step: the image comes back through the VAE unchanged otherwise.
    kept = _images(model, prompts=[PROMPT] * 2, init_images=init, strength=0.0)
    assert torch.allclose(kept, model.decode_latents(model.encode_images(init)), atol=1e-6)
    half = _images(model, prompts=[PROMPT] * 2, init_images=init, strength=0.5)
    assert torch.equal(half, _images(model, prompts=[PROMPT] * 2, init_images=init, strength=0.5))
    full = _images(model, prompts=[PROMPT] * 2)
    distance = lambda a, b: (a - b).abs().mean().item()
    assert distance(half, kept) > 1e-3 and distance(half, full) > 1e-3
    # The less of the schedule it runs, the closer it stays to the init image.
    assert distance(half, kept) < distance(full, kept)
    # Through the command line.
    png = generate(exports["text"], tmp_path / "i.png", "--prompt", PROMPT, "--seed", "1", "--init_image",
                   str(exports["init"]), "--strength", "0.5")
    assert png != generate(exports["text"], tmp_path / "j.png", "--prompt", PROMPT, "--seed", "1")


def test_class_labels_by_index_or_name(exports, tmp_path):
    by_index = generate(exports["class"], tmp_path / "a.png", "--class_label", "2", "--seed", "0")
    by_name = generate(exports["class"], tmp_path / "b.png", "--class_label", "fox", "--seed", "0")
    other = generate(exports["class"], tmp_path / "c.png", "--class_label", "cat", "--seed", "0")
    assert by_index == by_name and by_index != other


def one_line_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        run_main(inference_ldm.main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_bad_inputs_are_one_line_errors(exports, tmp_path, capsys):
    text, cls = str(exports["text"]), str(exports["class"])
    assert "pass --prompt" in one_line_error(["--path_to_weights", text], capsys)
    assert "not text-conditional" in one_line_error(["--path_to_weights", cls, "--text_conditional"], capsys)
    assert "pass --class_label" in one_line_error(["--path_to_weights", cls], capsys)
    assert "outside [0, 2]" in one_line_error(["--path_to_weights", cls, "--class_label", "7"], capsys)
    assert "neither a class index nor a class name" in one_line_error(
        ["--path_to_weights", cls, "--class_label", "zebra"], capsys)
    assert "takes no --prompt" in one_line_error(
        ["--path_to_weights", cls, "--prompt", "x", "--class_label", "1"], capsys)
    assert "weights file not found" in one_line_error(["--path_to_weights", str(tmp_path / "none.safetensors")], capsys)
    assert "unknown; known datasets" in one_line_error(
        ["--path_to_weights", text, "--prompt", "x", "--training_dataset", "laion"], capsys)
    assert "file not found" in one_line_error(
        ["--path_to_weights", text, "--prompt", "x", "--init_image", str(tmp_path / "no.png")], capsys)
    assert "takes --prompt or --prompts_file, not --class_label" in one_line_error(
        ["--path_to_weights", text, "--class_label", "1"], capsys)
    assert "--num_inference_steps: expected a number >= 1, got 0" in one_line_error(
        ["--path_to_weights", text, "--prompt", "x", "--num_inference_steps", "0"], capsys)
    assert "--strength must be in [0, 1], got 1.5" in one_line_error(
        ["--path_to_weights", text, "--prompt", "x", "--init_image", str(exports["init"]), "--strength", "1.5"], capsys)
    assert "argument --sampler: invalid choice: 'heun'" in one_line_error(
        ["--path_to_weights", text, "--prompt", "x", "--sampler", "heun"], capsys)
    assert "--karras works with the samplers dpmpp_2m, euler, euler_a, lms, not ddim" in one_line_error(
        ["--path_to_weights", text, "--prompt", "x", "--karras"], capsys)
    if not torch.cuda.is_available():  # on a machine without a GPU (CI's): a device that is not there
        assert "--device cuda: this machine has no CUDA GPU" in one_line_error(
            ["--path_to_weights", text, "--prompt", "x", "--device", "cuda"], capsys)
    assert "--device 'tpu': expected cpu, cuda or cuda:N" in one_line_error(
        ["--path_to_weights", text, "--prompt", "x", "--device", "tpu"], capsys)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# nothing but a comment\n\n")
    assert f"--prompts_file {prompts}: no prompts in it" in one_line_error(
        ["--path_to_weights", text, "--prompts_file", str(prompts)], capsys)
    assert "with --prompts_file the output is a folder" in one_line_error(
        ["--path_to_weights", text, "--prompts_file", str(prompts), "--output", str(tmp_path / "x.png")], capsys)
    assert "not allowed with argument --prompt" in one_line_error(
        ["--path_to_weights", text, "--prompt", "x", "--prompts_file", str(prompts)], capsys)
    with pytest.raises(SystemExit) as exc:  # argparse: an img2img flag without an image
        inference_ldm.main(["--path_to_weights", text, "--prompt", "x", "--strength", "0.3"])
    assert exc.value.code == 2


def test_export_round_trip(exports, tmp_path):
    model = load_ldm_export(exports["text"])
    tensors = load_file(str(exports["text"]))
    assert all(torch.equal(tensors[f"unet.{k}"], v) for k, v in model.unet.state_dict().items())
    assert all(torch.equal(tensors[f"vae.{k}"], v) for k, v in model.vae.state_dict().items())
    # The embedded text encoder (weights + tokenizer files) encodes exactly like the folder it came from.
    source = TextEncoder(exports["clip"])
    with torch.no_grad():
        for (h1, m1), (h2, m2) in [(source([PROMPT, ""]), model.text_encoder([PROMPT, ""]))]:
            assert torch.equal(h1, h2) and torch.equal(m1, m2)
    assert model.text_encoder.tokenizer.tokenize(PROMPT) == source.tokenizer.tokenize(PROMPT)
    assert model.latent_shape == (4, 8, 8) and model.scaling_factor == 0.7
    # A frozen hub text encoder is stored by name only; offline and uncached, loading says so.
    text, meta = text_encoder_export(source, "someone/not-cached-clip", embed=False)
    assert text == {} and meta == {"source": "hub", "name": "someone/not-cached-clip"}
    path = save_ldm_export(tmp_path / "hub.safetensors", model.unet.state_dict(), model.vae.state_dict(), model.config,
                           0.7, 0.0, "text", "shapes", IMG, text_encoder=(text, meta))
    with pytest.raises(UserError, match="not-cached-clip"):
        load_ldm_export(path, text_encoder_cache_dir=tmp_path / "empty_cache")


# ---- prompts files, per-image seeds, batches, settings in the PNGs -----------------------------

def test_every_png_carries_its_settings_and_the_web_ui_parameters(exports, tmp_path, caplog):
    from modules.generation_record import file_sha256, read_png_settings

    weights = exports["text_g4"]
    paths = inference_ldm.main(["--path_to_weights", str(weights), "--prompt", PROMPT, "--negative_prompt", "green",
                                "--num_inference_steps", "3", "--seed", "11", "--output", str(tmp_path)])
    assert paths == [tmp_path / "a_red_circle_on_a_blue_background-seed11.png"]
    assert ("sampling with ddim, 3 steps, guidance 4: guidance_scale from the export (stage 2 drew its sample grids "
            "with them; the flags override)") in caplog.text
    got = read_png_settings(paths[0])
    sha = file_sha256(weights)
    assert {k: got[k] for k in ("prompt", "negative_prompt", "seed", "guidance_scale", "sampler", "num_inference_steps",
                                "size", "weights", "weights_sha256", "eta", "timestep_spacing")} == {
        "prompt": PROMPT, "negative_prompt": "green", "seed": "11", "guidance_scale": "4.0", "sampler": "ddim",
        "num_inference_steps": "3", "size": f"{IMG}x{IMG}", "weights": "text_g4.safetensors", "weights_sha256": sha,
        "eta": "0.0", "timestep_spacing": "leading"}
    assert got["parameters"] == (f"{PROMPT}\nNegative prompt: green\nSteps: 3, Sampler: DDIM, CFG scale: 4, Seed: 11, "
                                 f"Size: {IMG}x{IMG}, Model hash: {sha[:10]}, Model: text_g4")
    # --guidance_scale wins over the export's; an export that records none gets 7.5, said.
    other = inference_ldm.main(["--path_to_weights", str(exports["text"]), "--prompt", PROMPT, "--num_inference_steps",
                                "2", "--seed", "1", "--output", str(tmp_path / "b")])
    assert read_png_settings(other[0])["guidance_scale"] == "7.5"
    assert "the export records no sampling settings: built-in defaults for what no flag gives" in caplog.text
    third = inference_ldm.main(["--path_to_weights", str(weights), "--prompt", PROMPT, "--num_inference_steps", "2",
                                "--seed", "1", "--guidance_scale", "2.5", "--output", str(tmp_path / "c")])
    assert read_png_settings(third[0])["guidance_scale"] == "2.5"


def test_sampling_settings_flag_by_flag():
    from modules.sampling_settings import BUILTIN, SamplingSettings, resolve_sampling

    recipe = {"training_config": {"sampler": "euler", "num_inference_steps": 12, "guidance_scale": 3.0,
                                  "timestep_spacing": "trailing", "karras_sigmas": True, "ddim_eta": 0.5}}
    assert resolve_sampling(recipe)[0] == SamplingSettings("euler", 12, 3.0, 0.0, "trailing", True)  # eta: DDIM's
    assert resolve_sampling({"training_config": {**recipe["training_config"], "sampler": "ddim",
                                                 "karras_sigmas": False}})[0].eta == 0.5
    # Each given value wins; the export's step count and options stay with its own sampler.
    assert resolve_sampling(recipe, num_inference_steps=30, karras=False)[0] == SamplingSettings(
        "euler", 30, 3.0, 0.0, "trailing", False)
    assert resolve_sampling(recipe, sampler="ddim")[0] == SamplingSettings("ddim", 50, 3.0, 0.0, None, False)
    assert resolve_sampling(recipe, sampler="euler", guidance_scale=1.0)[0] == SamplingSettings(
        "euler", 12, 1.0, 0.0, "trailing", True)
    # Nothing recorded, or nothing valid: the built-in defaults (DDIM, 50, 7.5), and the log says so.
    settings, source = resolve_sampling({"step": 3})
    assert settings == BUILTIN == SamplingSettings("ddim", 50, 7.5, 0.0, None, False)
    assert source.startswith("the export records no sampling settings")
    junk = {"training_config": {"sampler": "heun", "num_inference_steps": 0, "guidance_scale": True,
                                "timestep_spacing": "odd", "karras_sigmas": "yes", "ddim_eta": -1}}
    assert resolve_sampling(junk)[0] == BUILTIN
    # Karras sigmas recorded for a sampler without them (ddim) are not carried over.
    assert resolve_sampling({"training_config": {"sampler": "ddim", "karras_sigmas": True}})[0].karras is False


def test_without_flags_it_samples_as_stage_2_drew_its_grids(exports, tmp_path, caplog):
    """An export that records DPM-Solver++ 2M, 3 steps, linspace, Karras sigmas and guidance 2 is
    sampled so; a different --sampler gets the built-in steps and its own spacing, not the export's."""
    from modules.generation_record import read_png_settings

    recipe = {"sampler": "dpmpp_2m", "num_inference_steps": 3, "guidance_scale": 2.0, "timestep_spacing": "trailing",
              "karras_sigmas": True, "ddim_eta": 0.0}
    weights = tiny_export(exports["root"] / "recipe.safetensors", "text", exports["clip"], training_config=recipe)
    default = inference_ldm.main(["--path_to_weights", str(weights), "--prompt", PROMPT, "--seed", "3",
                                  "--output", str(tmp_path / "default")])
    got = read_png_settings(default[0])
    assert {k: got.get(k) for k in ("sampler", "num_inference_steps", "guidance_scale", "timestep_spacing", "karras")} == {
        "sampler": "dpmpp_2m", "num_inference_steps": "3", "guidance_scale": "2.0", "timestep_spacing": "trailing",
        "karras": "True"}
    assert ("sampling with dpmpp_2m (Karras sigmas), 3 steps, guidance 2: guidance_scale, sampler, "
            "num_inference_steps, timestep_spacing, karras from the export") in caplog.text
    # The same settings given as flags draw the same pixels: the export's recipe, not a look-alike.
    explicit = inference_ldm.main(["--path_to_weights", str(weights), "--prompt", PROMPT, "--seed", "3",
                                   "--sampler", "dpmpp_2m", "--num_inference_steps", "3", "--guidance_scale", "2",
                                   "--timestep_spacing", "trailing", "--karras", "--output", str(tmp_path / "flags")])
    assert torch.equal(_pixels(default[0]), _pixels(explicit[0]))
    # Another sampler: the export's steps and spacing belong to DPM++, so DDIM gets 50 and its own spacing.
    ddim = inference_ldm.main(["--path_to_weights", str(weights), "--prompt", PROMPT, "--seed", "3", "--sampler",
                               "ddim", "--output", str(tmp_path / "ddim")])
    got = read_png_settings(ddim[0])
    assert (got["sampler"], got["num_inference_steps"], got["guidance_scale"], got["timestep_spacing"],
            got.get("karras")) == ("ddim", "50", "2.0", "leading", None)


def _pixels(path: Path) -> torch.Tensor:
    import numpy as np

    with Image.open(path) as img:
        return torch.from_numpy(np.asarray(img.convert("RGB")).copy())


def test_a_prompts_file_gives_a_grid_per_prompt_and_batches_do_not_change_the_images(exports, tmp_path):
    """Image i of a prompt has seed S+i from its own generator: --batch_size 1 and 4 give the same
    pixels, and each image is made again alone with --seed S+i --num_images 1."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na red circle on a blue background\n\na green square on a red background\n")
    run = lambda out, *extra: inference_ldm.main(
        ["--path_to_weights", str(exports["text"]), "--prompts_file", str(prompts), "--num_images", "3",
         "--num_inference_steps", "3", "--seed", "5", "--sampler", "ddpm", "--output", str(out), *extra])
    one = run(tmp_path / "b1", "--batch_size", "1")
    four = run(tmp_path / "b4", "--batch_size", "4")
    names = [p.name for p in one]
    assert names == [f"000-a_red_circle_on_a_blue_background-seed{s}.png" for s in (5, 6, 7)] + \
        ["000-a_red_circle_on_a_blue_background-grid.png"] + \
        [f"001-a_green_square_on_a_red_background-seed{s}.png" for s in (5, 6, 7)] + \
        ["001-a_green_square_on_a_red_background-grid.png"]
    assert [p.name for p in four] == names
    # Same seeds, same images whatever the batch: up to a few uint8 levels, since a CPU's kernels may
    # sum in another order for another batch size (seen on 2026-12-04's machine); other seeds differ wholly.
    near = lambda x, y: (_pixels(x).int() - _pixels(y).int()).abs().max().item() <= 4
    for a, b in zip(one, four):
        assert near(a, b), a.name
    with Image.open(one[3]) as grid:
        assert grid.size == (2 * IMG + 6, 2 * IMG + 6)
    assert not near(one[0], one[1])  # other seeds, other images
    alone = inference_ldm.main(["--path_to_weights", str(exports["text"]), "--prompt", "a green square on a red background",
                                "--num_inference_steps", "3", "--seed", "6", "--sampler", "ddpm", "--output",
                                str(tmp_path / "alone")])
    assert torch.equal(_pixels(alone[0]), _pixels(one[5]))  # both drawn one at a time: bit for bit


def test_fast_samplers_from_the_command_line_record_their_web_ui_names(exports, tmp_path):
    from modules.generation_record import read_png_settings

    for sampler, karras, name, spacing in (("dpmpp_2m", True, "DPM++ 2M Karras", "linspace"),
                                           ("euler_a", False, "Euler a", "linspace"),
                                           ("lms", False, "LMS", "linspace")):
        paths = inference_ldm.main(["--path_to_weights", str(exports["text"]), "--prompt", PROMPT, "--sampler", sampler,
                                    *(["--karras"] if karras else []), "--num_inference_steps", "4", "--seed", "2",
                                    "--output", str(tmp_path / sampler)])
        got = read_png_settings(paths[0])
        assert f"Sampler: {name}," in got["parameters"] and got["sampler"] == sampler
        assert got["timestep_spacing"] == spacing and got.get("karras") == ("True" if karras else None)
        assert _pixels(paths[0]).float().std() > 0
