#!/usr/bin/env bash
# Launcher for SD3 / SD3.5 / FLUX.1 / Qwen-Image sampling with the text-stream residual (seed
# 002's run_inference.sh).
#
#   ./run_inference.sh sd3|sd3.5|flux-dev|flux-schnell|qwen-image "prompt" [extra options...]
#
# Runs `diffalign textstream sample --model <checkpoint> [--vae <vae>] --prompt "prompt" ...`.
# Weights are looked up in $MODEL_DIR (default: models); override single paths with
#   SD3_MODEL_PATH   (default: $MODEL_DIR/sd3_medium.safetensors)
#   SD35_MODEL_PATH  (default: $MODEL_DIR/sd3.5_large.safetensors)
#   FLUX_DEV_MODEL_PATH, FLUX_SCHNELL_MODEL_PATH, QWEN_IMAGE_MODEL_PATH (default: the preset)
#   VAE_PATH         (default for sd3/sd3.5: $MODEL_DIR/sd3_vae.safetensors; the default is
#                     passed only if it exists, a VAE_PATH you set is always passed)
# FLUX.1 and Qwen-Image sample with their model card's steps/guidance unless given
# (--steps, --guidance, --cfg, --max-sequence-length).
# When the default checkpoint file is absent the preset (sd3 / sd3.5) is used instead: the
# diffusers folder that `diffalign download --only sd3` writes to $MODEL_DIR/sd3, or the Hub.
# Any further arguments go to `diffalign textstream sample` unchanged, e.g.
#   ./run_inference.sh sd3.5 "cinematic portrait" --residual_origin_layer 0 \
#       --residual_target_layers 4,8,12 --residual_weights 1.0,0.5,0.25
set -euo pipefail

usage() {
    cat >&2 <<'USAGE'
usage: ./run_inference.sh sd3|sd3.5|flux-dev|flux-schnell|qwen-image "prompt" [extra options
       for `diffalign textstream sample`]

environment: MODEL_DIR (default: models), SD3_MODEL_PATH, SD35_MODEL_PATH, FLUX_DEV_MODEL_PATH,
             FLUX_SCHNELL_MODEL_PATH, QWEN_IMAGE_MODEL_PATH, VAE_PATH
example:     ./run_inference.sh sd3 "neon street at night" --residual_target_layers 3,5,7
USAGE
}

if [[ $# -lt 2 ]]; then
    usage
    exit 2
fi

model_kind="$1"
prompt="$2"
shift 2

MODEL_DIR="${MODEL_DIR:-${DIFFALIGN_MODELS_DIR:-models}}"

# checkpoint: an explicit *_MODEL_PATH as given; else the seed's default file if it exists;
# else the preset, looked up in $MODEL_DIR/<preset>/ (diffalign download's layout), then the Hub
case "$model_kind" in
    sd3)
        preset=sd3 explicit="${SD3_MODEL_PATH:-}" path_var=SD3_MODEL_PATH
        default_file="$MODEL_DIR/sd3_medium.safetensors"
        ;;
    sd3.5 | sd35)
        preset=sd3.5 explicit="${SD35_MODEL_PATH:-}" path_var=SD35_MODEL_PATH
        default_file="$MODEL_DIR/sd3.5_large.safetensors"
        ;;
    flux-dev | flux-schnell | qwen-image)
        preset="$model_kind" default_file=""
        case "$model_kind" in
            flux-dev) explicit="${FLUX_DEV_MODEL_PATH:-}" path_var=FLUX_DEV_MODEL_PATH ;;
            flux-schnell) explicit="${FLUX_SCHNELL_MODEL_PATH:-}" path_var=FLUX_SCHNELL_MODEL_PATH ;;
            qwen-image) explicit="${QWEN_IMAGE_MODEL_PATH:-}" path_var=QWEN_IMAGE_MODEL_PATH ;;
        esac
        ;;
    *)
        echo "run_inference.sh: unknown model '$model_kind'" \
            "(expected sd3, sd3.5, flux-dev, flux-schnell or qwen-image)" >&2
        usage
        exit 2
        ;;
esac
if [[ -n "$explicit" ]]; then
    model="$explicit"
elif [[ -n "$default_file" && -e "$default_file" ]]; then
    model="$default_file"
else
    model="$preset"
    export DIFFALIGN_MODELS_DIR="$MODEL_DIR"
    if [[ ! -f "$MODEL_DIR/$preset/model_index.json" ]]; then
        # say where we looked: a missing file and folder otherwise show only as a Hub failure
        echo "run_inference.sh: no ${default_file:+$default_file and no }preset folder" \
            "$MODEL_DIR/$preset/;" \
            "fetch it with \`diffalign download --only $preset --dir $MODEL_DIR\`" \
            "(download writes to ./models unless --dir names your MODEL_DIR)," \
            "or set $path_var; trying the Hugging Face Hub" >&2
    fi
fi

if [[ -z "$prompt" ]]; then
    echo "run_inference.sh: the prompt is empty" >&2
    usage
    exit 2
fi

vae_args=()
if [[ -n "${VAE_PATH:-}" ]]; then
    vae_args=(--vae "$VAE_PATH") # set by the user: always passed (a missing one is an error)
elif [[ "$preset" == sd3* && -e "$MODEL_DIR/sd3_vae.safetensors" ]]; then
    vae_args=(--vae "$MODEL_DIR/sd3_vae.safetensors")
fi

if command -v diffalign >/dev/null 2>&1; then
    diffalign_cmd=(diffalign)
else
    diffalign_cmd=("${PYTHON:-python3}" -m diffalign)
fi

exec "${diffalign_cmd[@]}" textstream sample --model "$model" ${vae_args[@]+"${vae_args[@]}"} \
    --prompt "$prompt" "$@"
