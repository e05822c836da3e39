"""`load_reward`: a spec or name -> a frozen `Reward` built from the official checkpoint files,
plus the command-line options every reward-driven command shares (issue 7 "Rewards"; seed 001
`cli_sdxl_reward` / `cli_pickscore` / `cli_imagereward` / `cli_hpsv2` model-path options)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from diffalign.engine.download import HPS_FILES
from diffalign.engine.errors import DiffalignError
from diffalign.engine.rewards.base import CombinedReward, Reward
from diffalign.engine.rewards.spec import (
    RENO_DEFAULT_SPEC,
    REWARD_NAMES,
    REWARD_TYPES,
    expand_spec,
    parse_reward_spec,
    reward_type_spec,
)

HPS_VERSIONS = tuple(sorted(HPS_FILES))  # ("v2.0", "v2.1")
HPS_GEOMETRIES = ("reno", "official")  # rewards.base.GEOMETRIES
# laion CLIP-H/14: the tokenizer + image processor PickScore and HPSv2 were trained with
CLIP_H_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def _has_tokenizer(folder: Path) -> bool:
    return any(
        (folder / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")
    )


class _Loader:
    """Builds the rewards of one `load_reward` call, sharing models between terms (the CLIP
    model of `clip` and `aesthetic`)."""

    def __init__(self, device, dtype, opts: dict[str, Any]):
        self.device, self.dtype, self.opts = device, dtype, opts
        self._bundles: dict[str, Any] = {}

    def clip_bundle(self):
        from diffalign.engine.rewards.clip import load_clip_bundle
        from diffalign.engine.rewards.files import resolve_folder

        source = resolve_folder(
            self.opts["clip_model"], "", "CLIP model", "CLIP-ViT-L-14", "--clip-model"
        )
        if source not in self._bundles:
            self._bundles[source] = load_clip_bundle(
                source,
                device=self.device,
                dtype=self.dtype,
                what="CLIP model",
                download_name="CLIP-ViT-L-14",
                gradient_checkpointing=self.opts["gradient_checkpointing"],
            )
        return self._bundles[source]

    def clip(self) -> Reward:
        from diffalign.engine.rewards.clip import CLIPScoreReward

        return CLIPScoreReward(self.clip_bundle(), name="clip", scale=100.0, loss_offset=100.0)

    def aesthetic(self) -> Reward:
        from diffalign.engine.rewards.clip import AESTHETIC_FILE, AestheticReward, load_mlp_head
        from diffalign.engine.rewards.files import resolve_file

        path = resolve_file(
            self.opts["aesthetic_ckpt"],
            AESTHETIC_FILE,
            "aesthetic checkpoint",
            "Aesthetic",
            "--aesthetic-ckpt",
        )
        head = load_mlp_head(path, "aesthetic checkpoint").to(self.device, self.dtype)
        return AestheticReward(self.clip_bundle(), head)

    def pickscore(self) -> Reward:
        from diffalign.engine.rewards.clip import CLIPScoreReward, load_clip_bundle
        from diffalign.engine.rewards.files import resolve_folder

        source = resolve_folder(
            self.opts["pickscore_model"],
            "",
            "PickScore model",
            "PickScore_v1",
            "--pickscore-model-id",
        )
        processor = self.opts["pickscore_processor"]
        if processor is None:
            folder = Path(source)
            if (folder / "processor").is_dir():
                processor = str(folder / "processor")
            elif folder.is_dir() and _has_tokenizer(folder):
                processor = str(folder)
            elif folder.is_dir():
                raise DiffalignError(
                    f"PickScore model {folder}: no processor/ folder and no tokenizer files; "
                    "fetch them with `diffalign download --only PickScore` or pass "
                    "--pickscore-processor"
                )
            else:
                processor = CLIP_H_REPO
        bundle = load_clip_bundle(
            source,
            device=self.device,
            dtype=self.dtype,
            processor=processor,
            what="PickScore model",
            download_name="PickScore_v1",
            gradient_checkpointing=self.opts["gradient_checkpointing"],
        )
        scale = float(bundle.model.logit_scale.detach().float().exp())
        return CLIPScoreReward(bundle, name="pickscore", scale=scale, loss_offset=30.0)

    def imagereward(self) -> Reward:
        from diffalign.engine.rewards.imagereward import load_imagereward

        return load_imagereward(
            self.opts["imagereward_model_path"],
            self.opts["imagereward_med_config_path"],
            self.opts["imagereward_tokenizer"],
            device=self.device,
            dtype=self.dtype,
            gradient_checkpointing=self.opts["gradient_checkpointing"],
        )

    def hpsv2(self) -> Reward:
        from diffalign.engine.rewards.hpsv2 import load_hpsv2

        return load_hpsv2(
            self.opts["hps_checkpoint_path"],
            self.opts["hps_processor"],
            version=self.opts["hps_version"],
            geometry=self.opts["hps_geometry"],
            device=self.device,
            dtype=self.dtype,
            gradient_checkpointing=self.opts["gradient_checkpointing"],
        )


def load_reward(
    spec_or_name: str | list[tuple[str, float]],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    clip_model: str | None = None,
    aesthetic_ckpt: str | None = None,
    pickscore_model: str | None = None,
    pickscore_processor: str | None = None,
    imagereward_model_path: str | None = None,
    imagereward_med_config_path: str | None = None,
    imagereward_tokenizer: str | None = None,
    hps_version: str = "v2.1",
    hps_checkpoint_path: str | None = None,
    hps_processor: str | None = None,
    hps_geometry: str = "reno",
    gradient_checkpointing: bool = False,
) -> Reward:
    """Build the reward `spec_or_name` names (`"clip"`, `"hybrid"`,
    `"hpsv2:5,imagereward:1,clip:0.01,pickscore:0.05"` or parsed `[(name, weight), ...]`).

    A single unweighted name gives that reward itself; anything else a `CombinedReward`
    (`hybrid` alone is the seed's `aesthetic + 0.25 cos`, named "hybrid"). Paths left `None`
    resolve to `models/<download name>/...` (`diffalign download --only NAME`).
    """
    from diffalign.engine.loading import parse_dtype

    if hps_version not in HPS_VERSIONS:
        raise DiffalignError(
            f"--hps-version must be one of {', '.join(HPS_VERSIONS)}, got '{hps_version}'"
        )
    terms = parse_reward_spec(spec_or_name) if isinstance(spec_or_name, str) else list(spec_or_name)
    for name, _ in terms:
        if name not in REWARD_NAMES:
            raise DiffalignError(f"unknown reward '{name}'; valid names: {', '.join(REWARD_NAMES)}")
    opts = {
        "clip_model": clip_model,
        "aesthetic_ckpt": aesthetic_ckpt,
        "pickscore_model": pickscore_model,
        "pickscore_processor": pickscore_processor,
        "imagereward_model_path": imagereward_model_path,
        "imagereward_med_config_path": imagereward_med_config_path,
        "imagereward_tokenizer": imagereward_tokenizer,
        "hps_version": hps_version,
        "hps_checkpoint_path": hps_checkpoint_path,
        "hps_processor": hps_processor,
        "hps_geometry": hps_geometry,
        "gradient_checkpointing": bool(gradient_checkpointing),
    }
    loader = _Loader(device, parse_dtype(dtype), opts)
    expanded = expand_spec(terms)
    built = [(name, weight, getattr(loader, name)()) for name, weight in expanded]
    if len(terms) == 1 and terms[0][1] == 1.0 and terms[0][0] != "hybrid":
        return built[0][2]
    name = "hybrid" if terms == [("hybrid", 1.0)] else None
    return CombinedReward(built, name=name)


# where `_RewardOption` records the options typed: {dest: (spelling typed, rewards using it)}
_TYPED = "_reward_options_typed"


class _RewardOption(argparse.Action):
    """Stores the value like `store` and records that the user typed the option (and which
    spelling), so that `reward_spec_from_args` can name an option of a reward the spec does not
    use. A default never passes through here, so it never counts."""

    def __init__(self, option_strings, dest, rewards: tuple[str, ...] = (), **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.rewards = tuple(rewards)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        typed = dict(getattr(namespace, _TYPED, None) or {})
        typed[self.dest] = (option_string or self.option_strings[0], self.rewards)
        setattr(namespace, _TYPED, typed)


def _check_typed_options(args: argparse.Namespace, spec: str, source: str) -> None:
    """One error line for model-path options typed for rewards that `spec` does not build
    (`--reward clip --aesthetic-ckpt F`): a researcher expects to be told, not to see the file
    silently ignored."""
    typed = getattr(args, _TYPED, None) or {}
    used = {name for name, _ in expand_spec(parse_reward_spec(spec))}
    unused = []
    for spelling, rewards in typed.values():
        if used.isdisjoint(rewards):
            owners = [
                name
                for name in REWARD_NAMES
                if not {part for part, _ in expand_spec([(name, 1.0)])}.isdisjoint(rewards)
            ]
            which = " and ".join(
                [", ".join(owners[:-1]), owners[-1]] if len(owners) > 1 else owners
            )
            noun = "rewards" if len(owners) > 1 else "reward"
            unused.append(f"{spelling} (for the {which} {noun})")
    if unused:
        it, its = ("it", "its") if len(unused) == 1 else ("them", "their")
        raise DiffalignError(
            f"{source} does not use {', '.join(unused)}; drop {it} or add {its} reward to --reward"
        )


def add_reward_arguments(parser: argparse.ArgumentParser, default: str | None = "clip") -> None:
    """Add `--reward`, `--reward-type` and the seed's reward model-path options to `parser`.

    With our `ArgumentParser` each kebab-case option is also accepted in the seed's snake_case
    (`--clip_local_dir`, `--aesthetic_ckpt`, ...). `default` is the reward used when neither
    `--reward` nor `--reward-type` is given. A model-path option typed for a reward that the
    chosen spec does not build is an error (`reward_spec_from_args`); defaults never are.
    """
    g = parser.add_argument_group(
        "rewards", "an option of a reward that --reward does not build is an error"
    )
    g.add_argument(
        "--reward",
        default=None,
        metavar="SPEC",
        help=(
            "reward(s) to maximise: NAME or NAME:WEIGHT,... with NAME one of "
            f"{', '.join(REWARD_NAMES)}; e.g. ReNO's defaults '{RENO_DEFAULT_SPEC}' "
            f"(default: {default})"
        ),
    )
    g.add_argument(
        "--reward-type",
        choices=sorted(REWARD_TYPES),
        default=None,
        help="the seed's reward choice: clip, aesthetic or hybrid (aesthetic + 0.25 CLIP cosine); "
        "same as --reward NAME",
    )
    g.add_argument(
        "--clip-model",
        "--clip-local-dir",
        dest="clip_model",
        action=_RewardOption,
        rewards=("clip", "aesthetic"),
        default=None,
        metavar="DIR",
        help="transformers CLIPModel folder or Hub id for the clip/aesthetic rewards "
        "(default: models/CLIP-ViT-L-14; ReNO's ViT-H-14: laion/CLIP-ViT-H-14-laion2B-s32B-b79K)",
    )
    g.add_argument(
        "--aesthetic-ckpt",
        action=_RewardOption,
        rewards=("aesthetic",),
        default=None,
        metavar="FILE",
        help="LAION aesthetic MLP (default: models/Aesthetic/sac+logos+ava1-l14-linearMSE.pth)",
    )
    g.add_argument(
        "--pickscore-model-id",
        dest="pickscore_model_id",
        action=_RewardOption,
        rewards=("pickscore",),
        default=None,
        metavar="DIR",
        help="PickScore_v1 CLIPModel folder or Hub id (default: models/PickScore_v1)",
    )
    g.add_argument(
        "--pickscore-processor",
        action=_RewardOption,
        rewards=("pickscore",),
        default=None,
        metavar="DIR",
        help="CLIP-H/14 tokenizer + processor folder for PickScore (default: the model's "
        "processor/ folder)",
    )
    g.add_argument(
        "--imagereward-model-path",
        action=_RewardOption,
        rewards=("imagereward",),
        default=None,
        metavar="FILE",
        help="official ImageReward.pt (default: models/ImageReward/ImageReward.pt)",
    )
    g.add_argument(
        "--imagereward-med-config-path",
        action=_RewardOption,
        rewards=("imagereward",),
        default=None,
        metavar="FILE",
        help="ImageReward's med_config.json (default: beside ImageReward.pt)",
    )
    g.add_argument(
        "--imagereward-tokenizer",
        action=_RewardOption,
        rewards=("imagereward",),
        default=None,
        metavar="DIR",
        help="BERT tokenizer folder for ImageReward (default: bert-base-uncased/ beside "
        "ImageReward.pt)",
    )
    g.add_argument(
        "--hps-version",
        choices=HPS_VERSIONS,
        action=_RewardOption,
        rewards=("hpsv2",),
        default="v2.1",
        help="HPSv2 checkpoint version (default: %(default)s)",
    )
    g.add_argument(
        "--hps-checkpoint-path",
        action=_RewardOption,
        rewards=("hpsv2",),
        default=None,
        metavar="FILE",
        help="HPS_v2.1_compressed.pt / HPS_v2_compressed.pt (default: models/HPSv2/ per "
        "--hps-version)",
    )
    g.add_argument(
        "--hps-processor",
        action=_RewardOption,
        rewards=("hpsv2",),
        default=None,
        metavar="DIR",
        help="CLIP-H/14 tokenizer + processor folder for HPSv2 (default: processor/ beside the "
        "checkpoint)",
    )
    g.add_argument(
        "--hps-geometry",
        choices=HPS_GEOMETRIES,
        action=_RewardOption,
        rewards=("hpsv2",),
        default="reno",
        help="how HPSv2 sees a non-square image: reno (resize the shorter side, centre crop; "
        "ReNO's, for optimisation) or official (img_score.py: resize the longer side, pad with "
        "black) (default: %(default)s)",
    )
    g.add_argument(
        "--reward-gradient-checkpointing",
        action="store_true",
        help="recompute the reward models' layers in the backward pass (less memory, as ReNO)",
    )
    parser.set_defaults(_reward_default=default)


def reward_spec_from_args(args: argparse.Namespace) -> str:
    """The spec `--reward` / `--reward-type` name (one of them, or the command's default).

    A model-path option the user typed for a reward the spec does not build is one error line
    naming the option and its reward (argparse defaults never count)."""
    spec = getattr(args, "reward", None)
    rtype = getattr(args, "reward_type", None)
    if spec and rtype and parse_reward_spec(spec) != parse_reward_spec(reward_type_spec(rtype)):
        raise DiffalignError(
            f"--reward {spec} and --reward-type {rtype} disagree; give only one of them"
        )
    if spec:
        source = f"--reward {spec}"
    elif rtype:
        spec, source = reward_type_spec(rtype), f"--reward-type {rtype}"
    else:
        spec = getattr(args, "_reward_default", None)
        if not spec:
            raise DiffalignError(
                "no reward given: pass --reward NAME[:WEIGHT],... or --reward-type"
            )
        source = f"the default reward {spec}"
    _check_typed_options(args, spec, source)
    return spec


def reward_from_args(
    args: argparse.Namespace,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
) -> Reward:
    """`load_reward` with the options `add_reward_arguments` added."""
    return load_reward(
        reward_spec_from_args(args),
        device=device,
        dtype=dtype,
        clip_model=getattr(args, "clip_model", None),
        aesthetic_ckpt=getattr(args, "aesthetic_ckpt", None),
        pickscore_model=getattr(args, "pickscore_model_id", None),
        pickscore_processor=getattr(args, "pickscore_processor", None),
        imagereward_model_path=getattr(args, "imagereward_model_path", None),
        imagereward_med_config_path=getattr(args, "imagereward_med_config_path", None),
        imagereward_tokenizer=getattr(args, "imagereward_tokenizer", None),
        hps_version=getattr(args, "hps_version", "v2.1") or "v2.1",
        hps_checkpoint_path=getattr(args, "hps_checkpoint_path", None),
        hps_processor=getattr(args, "hps_processor", None),
        hps_geometry=getattr(args, "hps_geometry", "reno") or "reno",
        gradient_checkpointing=bool(getattr(args, "reward_gradient_checkpointing", False)),
    )
