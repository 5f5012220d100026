"""`make demo`'s pipeline (scripts/demo.py) on its tiny profile, launched as make launches it.

Every stage runs its real command lines (the trainers through `accelerate launch`, data-loader
workers in stage 0) on a few steps; the test checks each stage's files, the report's pieces and
that the scores were computed (not that they are high: that is `make demo`'s and the benchmarks'
job), then that a second run skips every finished stage, and that removing one stage's output or
changing what a stage depends on re-runs exactly the stages it should.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import OFFLINE_ENV, REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import demo  # noqa: E402

STAGES = ["bapps", "lpips", "shapes", "prep", "vae", "scale", "diffusion", "samples", "quality", "fid"]


def _demo(out, *extra) -> str:
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "scripts/demo.py", str(out), "--profile", "tiny", *extra], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, _demo(out)


def test_every_stage_writes_its_files_and_the_report_has_its_pieces(demo_run):
    out, stdout = demo_run
    state = json.loads((out / "demo_state.json").read_text())
    assert [s for s in state if not s.startswith("_")] == STAGES
    for stage in demo.build_stages(out, "tiny"):
        for rel in stage.outputs:
            assert (out / rel).exists(), (stage.name, rel)
        assert f"{stage.name} done in" in stdout
    for rel in ["lpips/lpips_demo.safetensors", "vae/model.safetensors", "diffusion/model.safetensors",
                "diffusion/DiffusionTrainer/loss_curve.png", "vae/VAETrainer/loss_curve.png", "quality_samples.png"]:
        assert (out / rel).is_file(), rel
    assert len(list((out / "samples").glob("*-grid.png"))) == 8  # one per prompt of configs/demo/shapes_prompts.txt

    quality = json.loads((out / "quality.json").read_text())
    assert 0 <= quality["ldm"]["samples"]["all"] <= 1 and quality["ldm"]["samples"]["count"] == 8
    assert quality["ldm"]["settings"]["guidance_scale"] == 4.0  # the export's: inference_ldm.py's default
    assert quality["vae"]["psnr"] > 0 and quality["vae"]["scaled_std"] > 0
    fid, rfid = json.loads((out / "fid.json").read_text()), json.loads((out / "rfid.json").read_text())
    assert fid["fid"] > 0 and fid["images"] == 8 and rfid["rfid"] > 0

    report = (out / "report.md").read_text()
    for piece in ["## Stages", "prompt adherence", "Stage 0: our LPIPS vs L2", "| cnn |", "FID", "rFID",
                  "latent scale", "![stage 2 loss](diffusion/DiffusionTrainer/loss_curve.png)", "## Commands",
                  "accelerate launch --num_processes 1", "stage2_diffusion_trainer.py", "A smoke run"]:
        assert piece in report, piece
    assert "missing" not in report, [line for line in report.splitlines() if "missing" in line]
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count('src="data:image/png;base64,') == 6 + 8  # the figures + a grid per prompt
    assert "report: " in stdout and "stage times (s): bapps" in stdout


def test_a_second_run_skips_finished_stages_and_reruns_what_changed(demo_run):
    out, _ = demo_run
    before = json.loads((out / "demo_state.json").read_text())
    stdout = _demo(out)
    assert stdout.count("skipped: finished") == len(STAGES), stdout
    assert json.loads((out / "demo_state.json").read_text()) == before

    # A stage's output gone: that stage runs again; the stages after it read nothing of it and stay.
    (out / "quality.json").unlink()
    stdout = _demo(out)
    assert "quality done in" in stdout and stdout.count("skipped: finished") == len(STAGES) - 1
    assert (out / "quality.json").is_file()


def test_an_upstream_rerun_or_a_changed_config_changes_the_fingerprints_downstream(tmp_path):
    stages = {s.name: s for s in demo.build_stages(tmp_path, "tiny")}
    state = {name: {"finished": "2026-01-01T00:00:00"} for name in stages}
    prints = {name: demo.fingerprint(s, state, "tiny") for name, s in stages.items()}
    state["vae"] = {"finished": "2026-01-02T00:00:00"}  # stage 1 ran again
    changed = {name for name, s in stages.items() if demo.fingerprint(s, state, "tiny") != prints[name]}
    assert changed == {"scale"}  # ... and through scale's new finish time, diffusion, then samples, quality, fid
    assert demo.fingerprint(stages["vae"], state, "full") != demo.fingerprint(stages["vae"], state, "tiny")

    # A config's contents are in the fingerprint of the stages that read it; its comments are not.
    config = tmp_path / "config.yaml"
    config.write_text("a: 1\n")
    stage = demo.Stage("x", "x", [["true"]], ["out"], configs=[str(config)])
    first = demo.fingerprint(stage, {}, "tiny")
    config.write_text("# a comment\na:   1   # another\n")
    assert demo.fingerprint(stage, {}, "tiny") == first
    config.write_text("a: 2\n")
    assert demo.fingerprint(stage, {}, "tiny") != first
