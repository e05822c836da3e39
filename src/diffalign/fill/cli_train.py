"""`diffalign fill train` (spec F: Train): a YAML config plus typed `--key value` overrides.
Heavy imports stay inside the handler."""

from __future__ import annotations

import argparse


def register(verbs) -> None:
    from diffalign.fill.config import config_fields

    p = verbs.add_parser(
        "train",
        help="train LoRA + semantic cross-attention on FLUX.1-Fill by flow matching (seed 004)",
        description=(
            "Train a LoRA on the FLUX.1-Fill transformer and the semantic cross-attention "
            "branch on a triptych folder ([visible | target | semantic]) by flow matching "
            "(x_t = (1-t) x_0 + t x_1, target x_1 - x_0, MSE). Options come from --config (YAML, "
            "e.g. configs/fill_semantic.yaml); every config key is also an option that overrides "
            "it (--lora-rank 32, --max-steps 10, --resume latest). Runs under `accelerate "
            "launch` for several GPUs. Writes checkpoints/, checkpoint-final/ "
            "(pytorch_lora_weights.safetensors that FluxFillPipeline.load_lora_weights loads, "
            "semantic_module.safetensors, fill_semantic.safetensors), validation/step-*/grid.png, "
            "logs/ (TensorBoard), train_history.png and summary.json in output_dir."
        ),
    )
    p.add_argument("--config", default=None, help="YAML config file (default: built-in defaults)")
    for name, default, meta in config_fields():
        extra = {}
        if isinstance(default, bool):
            extra = {"nargs": "?", "const": "true", "metavar": "BOOL"}
        choices = meta.get("choices")
        shown = f"; one of {', '.join(choices)}" if choices else ""
        p.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=argparse.SUPPRESS,
            help=f"{meta['help']} (config key {name}, default: {default}{shown})",
            **extra,
        )
    p.set_defaults(func=_run)


def _run(args) -> int:
    from diffalign.fill.config import config_fields, load_config
    from diffalign.fill.train import run_train

    names = {name for name, _, _ in config_fields()}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    cfg = load_config(args.config, overrides)
    run_train(cfg)
    return 0
