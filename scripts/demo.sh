#!/usr/bin/env bash
# make demo: the whole pipeline on the built-in data, offline, on a CPU.
#   synthetic BAPPS -> stage 0 LPIPS -> shapes (img2dataset parquet) -> prep_cc.py -> stage 1 KL-VAE
#   -> compute_vae_scaling.py -> stage 2 text-conditional latent UNet -> inference_ldm.py
# Everything goes under $1 (default demo_out/). The models are small (configs/demo/) so that it runs in
# about half an hour on 2 CPU cores (run it alone); the commands are the tutorial's.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo_out}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
LAUNCH="accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no"
section() { echo; echo "=================== $* ==================="; }
start=$(date +%s)

section "0. synthetic BAPPS -> our LPIPS (stage 0)"
[ -d "$OUT/bapps/2afc" ] || python generate_data.py bapps "$OUT/bapps" --num_train 300 --num_val 50 --num_jnd 50 --img_size 64
rm -rf "$OUT/lpips"
$LAUNCH stage0_lpips_trainer.py --path_to_root "$OUT/bapps" --work_dir "$OUT/lpips" \
  --checkpoint_name lpips_demo.pt --img_size 64 --batch_size 25 --num_workers 0 \
  --num_epochs 3 --decay_epochs 2 --logging_steps 10 --backbone alex --no-pretrained_backbone \
  --initial_lr 1e-3 --use_dropout --img_range minus_one_to_one --middle_channels 32

section "1. shapes -> img2dataset-layout parquet -> prep_cc.py (tiny CLIP tokenizer/text model)"
[ -f "$OUT/shapes_raw/00000.parquet" ] || python generate_data.py shapes "$OUT/shapes_raw" --num_images 4000 --img_size 32
[ -f "$OUT/tiny_clip/config.json" ] || python generate_data.py tiny_clip "$OUT/tiny_clip" --hidden_size 64
rm -rf "$OUT/shapes_hf"
python prep_cc.py --path_to_data_root "$OUT/shapes_raw" --path_to_save "$OUT/shapes_hf" \
  --hf_clip_model_name "$OUT/tiny_clip" --cpu_batch_size 512 --gpu_batch_size 256 --num_cpu_workers 0 --dtype float32

section "2. stage 1: KL-VAE with L1 + our LPIPS + PatchGAN (switched on part-way)"
rm -rf "$OUT/vae"
$LAUNCH stage1_vae_trainer.py --experiment_name VAETrainer --working_directory "$OUT/vae" \
  --training_config configs/demo/stage1_vae_shapes.yaml --model_config configs/demo/ldm_shapes.yaml \
  --dataset conceptual_captions --path_to_dataset "$OUT/shapes_hf" --path_to_save_gens "$OUT/vae_gens" \
  --set training_args.lpips_checkpoint="$OUT/lpips/lpips_demo.safetensors"
python - "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/vae/VAETrainer/metrics.jsonl")]
val = [r for r in rows if any(k.startswith("val") for k in r)]
print("held-out reconstruction:", {k: round(v, 4) for k, v in (val[-1] if val else {}).items()})
PY

section "3. latent scale factor"
python compute_vae_scaling.py --path_to_pretrained_weights "$OUT/vae/model.safetensors" \
  --dataset conceptual_captions --path_to_dataset "$OUT/shapes_hf" --model_config configs/demo/ldm_shapes.yaml

section "4. stage 2: text-conditional latent UNet with DDPM (cached latents)"
rm -rf "$OUT/diffusion"
$LAUNCH stage2_diffusion_trainer.py --experiment_name DiffusionTrainer --working_directory "$OUT/diffusion" \
  --training_config configs/stage2_diffusion_train.yaml --model_config configs/demo/ldm_shapes.yaml \
  --path_to_vae_backbone "$OUT/vae/model.safetensors" --dataset conceptual_captions \
  --path_to_dataset "$OUT/shapes_hf" --path_to_save_gens "$OUT/diffusion_gens" \
  --set unet.text_conditioning_hf_model="$OUT/tiny_clip" \
  --set training_args.total_training_iterations=3000 --set training_args.per_gpu_batch_size=64 \
  --set training_args.learning_rate=5e-4 --set training_args.lr_warmup_steps=100 \
  --set training_args.cache_latents=true --set training_args.num_workers=0 \
  --set training_args.mixed_precision=no --set training_args.ema_decay=0.999 \
  --set training_args.checkpoint_iterations=1000 --set training_args.val_generation_freq=1000 \
  --set training_args.logging_steps=50 --set training_args.num_inference_steps=25 \
  --set training_args.guidance_scale=3.0 --set training_args.sample_prompts_file=configs/demo/shapes_prompts.txt

section "5. inference from the one exported file"
mkdir -p "$OUT/samples"
for prompt in "a red circle on a blue background" "a yellow square on a black background" "a white triangle on a green background"; do
  python inference_ldm.py --model_config configs/demo/ldm_shapes.yaml \
    --path_to_weights "$OUT/diffusion/model.safetensors" --text_conditional --training_dataset conceptual_captions \
    --prompt "$prompt" --num_images 4 --guidance_scale 3.0 --num_inference_steps 50 --seed 0 \
    --output "$OUT/samples/${prompt// /_}.png"
done
if [ -f benchmarks/bench_quality.py ]; then
  section "6. quality: held-out PSNR of the VAE, prompt accuracy of the samples"
  # Held-out images: shapes rendered on the fly with another seed than the training data's.
  python benchmarks/bench_quality.py --vae "$OUT/vae/model.safetensors" --ldm "$OUT/diffusion/model.safetensors" \
    --dataset shapes --shapes_seed 12345 --num_images 512 --lpips "$OUT/lpips/lpips_demo.safetensors"
fi
echo; echo "demo finished in $(( $(date +%s) - start )) s; outputs under $OUT/"
