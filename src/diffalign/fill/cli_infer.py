"""`diffalign fill infer` (spec F: Infer). Heavy imports stay inside the handler."""

from __future__ import annotations

from diffalign.engine.cliutils import finite_float, positive_int, seed_int


def register(verbs) -> None:
    p = verbs.add_parser(
        "infer",
        help="inpaint the target panel with FLUX.1-Fill + LoRA + semantic cross-attention",
        description=(
            "Paint the target panel next to a visible panel: the diptych [visible | blank] with "
            "the right half masked goes through FLUX.1-Fill's flow-match sampler, the semantic "
            "cross-attention enhancing the noisy latents from the semantic image at every step. "
            "One input (--visible --semantic --prompt) or a folder (--input-dir: inputs.jsonl "
            "with visible/semantic/prompt fields, or <name>_visible.png + <name>_semantic.png + "
            "<name>.txt). Writes <name>.png (the target panel), <name>_diptych.png with "
            "--save-diptych, and summary.json; images already in --output-dir are kept."
        ),
    )
    p.add_argument(
        "--model",
        default="flux-fill",
        help="FLUX.1-Fill: preset flux-fill, diffusers folder or Hub id (default: %(default)s)",
    )
    p.add_argument(
        "--lora",
        default=None,
        help="LoRA: pytorch_lora_weights.safetensors, fill_semantic.safetensors or a "
        "checkpoint folder such as <run>/checkpoint-final (default: none)",
    )
    p.add_argument(
        "--semantic-module",
        default=None,
        help="semantic cross-attention: semantic_module.safetensors, fill_semantic.safetensors "
        "or a checkpoint folder (default: none = plain FLUX Fill)",
    )
    p.add_argument("--visible", default=None, help="visible panel image (one input)")
    p.add_argument("--semantic", default=None, help="semantic image, same size as --visible")
    p.add_argument("--prompt", default=None, help="caption of the triptych (one input)")
    p.add_argument(
        "--input-dir",
        default=None,
        help="folder of (visible, semantic, prompt) triples instead of --visible/--prompt",
    )
    p.add_argument(
        "--output-dir",
        "--output",  # the earlier spelling
        dest="output",
        metavar="DIR",
        default="outputs/fill",
        help="output folder (default: %(default)s; --output: the earlier spelling)",
    )
    p.add_argument(
        "--steps", type=positive_int, default=50, help="sampling steps (default: %(default)s)"
    )
    p.add_argument(
        "--guidance",
        type=finite_float,
        default=30.0,
        help="guidance-embedding value (FLUX.1-Fill-dev: 30; default: %(default)s)",
    )
    p.add_argument(
        "--seed", type=seed_int, default=0, help="seed of input i is seed + i (default: 0)"
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=1, help="images per batch (default: 1)"
    )
    p.add_argument(
        "--save-diptych",
        action="store_true",
        help="also write <name>_diptych.png (visible | generated target)",
    )
    p.add_argument(
        "--semantic-layout",
        choices=("target-half", "both-halves", "panel"),
        default=None,
        help="the semantic K/V tokens: on the diptych grid's target half (zeros on the visible "
        "half), on both halves, or the semantic panel's own tokens (panel, the seed's) "
        "(default: the layout recorded in --semantic-module's checkpoint, else target-half; "
        "another one than the recorded layout is an error)",
    )
    p.add_argument(
        "--max-sequence-length",
        type=positive_int,
        default=512,
        help="T5 tokens per prompt (default: %(default)s)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        help="float32 | bfloat16 | float16 (default: bfloat16 on a GPU, float32 on the CPU)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over: the earlier run's images in --output-dir are removed once the model "
        "has loaded and every input is generated again (default: keep them, so a run resumes)",
    )
    p.set_defaults(func=_run)


def _run(args) -> int:
    import torch

    from diffalign.fill.infer import run_infer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    run_infer(
        model=args.model,
        output=args.output,
        lora=args.lora,
        semantic_module=args.semantic_module,
        visible=args.visible,
        semantic=args.semantic,
        prompt=args.prompt,
        input_dir=args.input_dir,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        batch_size=args.batch_size,
        save_diptych=args.save_diptych,
        semantic_layout=args.semantic_layout,
        max_sequence_length=args.max_sequence_length,
        dtype=args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"),
        device=device,
        overwrite=args.overwrite,
    )
    return 0
