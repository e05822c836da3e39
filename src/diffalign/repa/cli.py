"""`diffalign repa ...` (spec R, seed 003): one group, one module per verb family."""

from __future__ import annotations

from diffalign.engine.cliutils import make_subparsers


def register(sub) -> None:
    from diffalign.repa import cli_preprocess, cli_train

    parser = sub.add_parser(
        "repa",
        help="U-REPA for SD 1.5: preprocessing, alignment training, probes (spec R)",
        description=(
            "U-REPA on Stable Diffusion 1.5 (the reference SD 1.5 recipe): preprocess a dataset into a data folder "
            "(images, VAE latents, DINOv2 teacher tokens, CLIP class embeddings), train LoRA + "
            "AlignHeads, extract aligned features and probe them."
        ),
    )
    verbs = make_subparsers(parser)
    cli_preprocess.register_preprocess(verbs)
    cli_train.register(verbs)
