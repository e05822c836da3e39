"""`diffalign selftest`: the equivalence checks of the tests, run on the real files under `models/`.

The tests prove each piece on tiny models; this runs the same comparisons on whatever real
assets a user has downloaded, so the claim "equals the official code" is confirmed on the real
checkpoints in minutes.

- Assets are found by their contents, whatever the folder is called: a diffusers pipeline by
  `model_index.json` (`_class_name`), a transformers model by `config.json` (`architectures`),
  a reward or weights file by its official file name (`FILE_KINDS`). A recognised folder's
  sub-folders are its parts (a pipeline's components, `processor/`, `bert-base-uncased/`).
- Checks live in a registry (`register_check`): a name, which assets it applies to, a tolerance
  on the maximum absolute difference, and a function that returns that difference (or raises
  `SelftestSkip` when the asset cannot be checked, e.g. a LoRA without its base model). The
  engine registers the reward checks here; each capability registers its own in
  `diffalign/<capability>/selftest.py` (a new generator or pipeline family adds one entry).
- `run_checks` prints a table (asset, check, max difference, verdict) and writes
  `selftest.json`. Verdicts: pass, FAIL (difference above the tolerance), error (the check
  raised), skip (not checkable here).
"""

from __future__ import annotations

import fnmatch
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffalign.engine.errors import DiffalignError

SELFTEST_FILE = "selftest.json"
# exit codes: 0 every check passed (or skipped, or nothing was found), 1 a check failed or
# raised; bad input (no such models folder) is 2 like every other error
EXIT_PASS, EXIT_FAIL = 0, 1
MAX_DEPTH = 4  # how deep under the models folder assets are looked for

# official file names -> asset kind (a capability adds its weight files: `register_file_kind`)
FILE_KINDS: dict[str, str] = {
    "HPS_v2*_compressed.pt": "hpsv2",
    "ImageReward.pt": "imagereward",
    "sac+logos+ava1-l14-linearMSE.pth": "aesthetic",
}


def register_file_kind(pattern: str, kind: str) -> None:
    """Recognise files named like `pattern` (fnmatch) as assets of `kind`."""
    FILE_KINDS[pattern] = kind


@dataclass(frozen=True)
class Asset:
    """One recognised asset: `kind` is "pipeline" (`cls` = model_index `_class_name`),
    "transformers" (`cls` = the first of `architectures`) or a file kind (`hpsv2`, ...)."""

    path: Path
    kind: str
    cls: str = ""
    label: str = ""

    def describe(self) -> str:
        return f"{self.kind}:{self.cls}" if self.cls else self.kind


class SelftestSkip(Exception):  # noqa: N818 - a signal, not an error
    """Raised by a check that cannot run on this asset (the reason is its message)."""


@dataclass
class SelftestContext:
    """What every check gets besides its asset: all assets found, device, generator size."""

    assets: list[Asset]
    device: torch.device
    size: int = 64
    cache: dict[str, Any] = field(default_factory=dict)

    def find(self, predicate: Callable[[Asset], bool]) -> list[Asset]:
        return [a for a in self.assets if predicate(a)]


CheckFn = Callable[[Asset, SelftestContext], "float | tuple[float, str]"]


@dataclass(frozen=True)
class SelftestCheck:
    name: str
    applies: Callable[[Asset], bool]
    tolerance: float
    run: CheckFn


_CHECKS: dict[str, SelftestCheck] = {}


def register_check(
    name: str, applies: Callable[[Asset], bool], tolerance: float
) -> Callable[[CheckFn], CheckFn]:
    """Decorator: `fn(asset, ctx) -> max abs difference` (or `(difference, detail)`) runs on
    every asset `applies` accepts; above `tolerance` it fails."""

    def deco(fn: CheckFn) -> CheckFn:
        _CHECKS[name] = SelftestCheck(name, applies, float(tolerance), fn)
        return fn

    return deco


def registered_checks() -> list[SelftestCheck]:
    return list(_CHECKS.values())


def pipeline_of(*classes: str) -> Callable[[Asset], bool]:
    """`applies` for diffusers pipeline folders of one of `classes`."""
    return lambda a: a.kind == "pipeline" and a.cls in classes


def transformers_of(*classes: str) -> Callable[[Asset], bool]:
    """`applies` for transformers model folders of one of `classes` (`architectures[0]`)."""
    return lambda a: a.kind == "transformers" and a.cls in classes


def file_of(kind: str) -> Callable[[Asset], bool]:
    return lambda a: a.kind == kind


# ---------------------------------------------------------------------------------------------
# finding assets


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}


def identify(folder: Path, entries: list[Path] | None = None) -> list[Asset]:
    """The assets `folder` itself is or holds directly (not its sub-folders); `entries`: its
    listing, when the caller has it already."""
    index = folder / "model_index.json"
    if index.is_file():
        return [Asset(folder, "pipeline", str(_read_json(index).get("_class_name", "")))]
    config = folder / "config.json"
    if config.is_file():
        arch = _read_json(config).get("architectures") or []
        if isinstance(arch, list) and arch:
            return [Asset(folder, "transformers", str(arch[0]))]
    found = []
    listing = folder.iterdir() if entries is None else entries
    for f in sorted(p for p in listing if p.is_file()):
        for pattern, kind in FILE_KINDS.items():
            if fnmatch.fnmatch(f.name, pattern):
                found.append(Asset(f, kind))
                break
    return found


def find_assets(root: str | Path) -> list[Asset]:
    """Every asset under `root` (depth <= MAX_DEPTH); a recognised folder is not entered."""
    root = Path(root)
    if not root.is_dir():
        raise DiffalignError(f"--models {root}: no such folder")
    out: list[Asset] = []

    def walk(folder: Path, depth: int) -> None:
        try:
            entries = list(folder.iterdir())  # listed once: for its files and its sub-folders
            here = identify(folder, entries)
            subs = sorted(p for p in entries if p.is_dir())
        except OSError:  # an unreadable folder holds nothing we can check
            return
        for a in here:
            label = str(a.path.relative_to(root)) if a.path != root else "."
            out.append(Asset(a.path, a.kind, a.cls, label))
        if here or depth >= MAX_DEPTH:
            return
        for sub in subs:
            if not sub.name.startswith("."):
                walk(sub, depth + 1)

    walk(root, 0)
    return out


# ---------------------------------------------------------------------------------------------
# running


@dataclass
class Finding:
    asset: str
    check: str
    max_difference: float | None
    tolerance: float | None
    verdict: str  # pass | FAIL | error | skip
    detail: str = ""
    seconds: float = 0.0


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def run_check(check: SelftestCheck, asset: Asset, ctx: SelftestContext) -> Finding:
    t0 = time.perf_counter()
    diff, detail, verdict = None, "", "pass"
    try:
        got = check.run(asset, ctx)
        diff, detail = got if isinstance(got, tuple) else (got, "")
        diff = float(diff)
        if not diff <= check.tolerance:  # NaN fails too
            verdict = "FAIL"
    except SelftestSkip as e:
        verdict, detail = "skip", str(e)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a check that raises is reported, the others still run
        verdict, detail = "error", _one_line(e)
    return Finding(
        asset.label or str(asset.path),
        check.name,
        diff,
        check.tolerance,
        verdict,
        detail,
        round(time.perf_counter() - t0, 3),
    )


def format_table(findings: Sequence[Finding]) -> str:
    """asset | check | max difference | verdict (+ detail), aligned columns."""
    rows = [("asset", "check", "max difference", "verdict")]
    for f in findings:
        diff = "-" if f.max_difference is None else f"{f.max_difference:.3g}"
        verdict = f.verdict + (f" ({f.detail})" if f.detail else "")
        rows.append((f.asset, f.check, diff, verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows)


def run_checks(
    models: str | Path,
    output_dir: str | Path = ".",
    *,
    device: str | None = None,
    size: int = 64,
    checks: Sequence[SelftestCheck] | None = None,
    log: Callable[[str], None] = print,
) -> int:
    """Find the assets under `models`, run every applicable check, print the table, write
    `<output_dir>/selftest.json`; returns the exit code (EXIT_PASS / EXIT_FAIL)."""
    from diffalign.engine.distributed import check_device
    from diffalign.engine.io import write_json

    if size < 16 or size % 16:
        raise DiffalignError(f"--size must be a positive multiple of 16, got {size}")
    dev = torch.device(check_device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    assets = find_assets(models)
    checks = list(checks if checks is not None else registered_checks())
    ctx = SelftestContext(assets, dev, size)
    findings: list[Finding] = []
    if not assets:
        log(f"[selftest] nothing found under {models}: no pipeline, model or reward file")
    for asset in assets:
        mine = [c for c in checks if c.applies(asset)]
        if not mine:
            findings.append(
                Finding(asset.label, "-", None, None, "skip", f"no check for {asset.describe()}")
            )
        for check in mine:
            log(f"[selftest] {asset.label}: {check.name} ...")
            findings.append(run_check(check, asset, ctx))
    if findings:
        log(format_table(findings))
    failed = [f for f in findings if f.verdict in ("FAIL", "error")]
    counts = {v: sum(f.verdict == v for f in findings) for v in ("pass", "FAIL", "error", "skip")}
    out = Path(output_dir) / SELFTEST_FILE
    write_json(
        out,
        {
            "models_dir": str(models),
            "device": str(dev),
            "size": size,
            "assets": [{"path": a.label, "kind": a.kind, "class": a.cls or None} for a in assets],
            "results": [f.__dict__ for f in findings],
            "counts": counts,
            "passed": not failed,
        },
    )
    summary = ", ".join(f"{n} {v}" for v, n in counts.items() if n) or "no checks"
    log(f"[selftest] {summary}; written {out}")
    return EXIT_FAIL if failed else EXIT_PASS


# ---------------------------------------------------------------------------------------------
# the reward checks (engine.rewards against engine.selftest_refs)

PROMPTS = ["a photo of a cat on a red sofa", "an oil painting of a harbour at dusk"]


def _images(seed: int = 0) -> torch.Tensor:
    """Two non-square images in [0, 1] (the preprocessing resizes and crops them)."""
    return torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(seed))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float().cpu() - b.detach().float().cpu()).abs().max())


def _clip_assets(a: Asset) -> bool:
    return a.kind == "transformers" and a.cls == "CLIPModel"


@register_check("reward clip/pickscore vs CLIPModel forward", _clip_assets, 1e-3)
def _check_clip(asset: Asset, ctx: SelftestContext) -> tuple[float, str]:
    from transformers import AutoTokenizer, CLIPModel

    from diffalign.engine.rewards import clip_preprocess, load_reward
    from diffalign.engine.selftest_refs import reference_clip_cos

    processor = asset.path / "processor"
    if processor.is_dir():  # PickScore_v1's layout: its CLIP-H tokenizer in processor/
        name = "pickscore"
        reward = load_reward(name, pickscore_model=str(asset.path), device=ctx.device)
        tok_dir = processor
    else:
        name = "clip"
        reward = load_reward(name, clip_model=str(asset.path), device=ctx.device)
        tok_dir = asset.path
    x = _images()
    with torch.no_grad():
        value = reward(x.to(ctx.device), PROMPTS)
    model = CLIPModel.from_pretrained(str(asset.path), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    pix = clip_preprocess(x, reward.bundle.size, reward.bundle.mean, reward.bundle.std)
    cos, _ = reference_clip_cos(model, tokenizer, pix, PROMPTS)
    return _max_diff(value / reward.scale, cos), f"{name}, difference of cos"


@register_check("reward aesthetic vs LAION nn.Sequential", file_of("aesthetic"), 1e-3)
def _check_aesthetic(asset: Asset, ctx: SelftestContext) -> tuple[float, str]:
    from transformers import AutoTokenizer, CLIPModel

    from diffalign.engine.io import load_pt
    from diffalign.engine.rewards import clip_preprocess, load_reward
    from diffalign.engine.rewards.files import state_dict_of
    from diffalign.engine.selftest_refs import reference_aesthetic_head, reference_clip_cos

    sd = state_dict_of(load_pt(asset.path), asset.path, "aesthetic head")
    width = int(sd["layers.0.weight"].shape[1])
    clips = [
        a
        for a in ctx.find(_clip_assets)
        if not (a.path / "processor").is_dir()
        and _read_json(a.path / "config.json").get("projection_dim") == width
    ]
    if not clips:
        raise SelftestSkip(f"needs a CLIP model with {width}-wide embeddings (CLIP-ViT-L-14)")
    clip = clips[0].path
    reward = load_reward(
        "aesthetic", clip_model=str(clip), aesthetic_ckpt=str(asset.path), device=ctx.device
    )
    x = _images(1)
    with torch.no_grad():
        value = reward(x.to(ctx.device), PROMPTS)
    model = CLIPModel.from_pretrained(str(clip), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(clip), local_files_only=True)
    pix = clip_preprocess(x, reward.bundle.size, reward.bundle.mean, reward.bundle.std)
    _, embeds = reference_clip_cos(model, tokenizer, pix, PROMPTS)
    with torch.no_grad():
        ref = reference_aesthetic_head(sd)(embeds).squeeze(-1)
    return _max_diff(value, ref), f"with {clips[0].label}"


@register_check("reward hpsv2 vs open_clip reference", file_of("hpsv2"), 1e-3)
def _check_hpsv2(asset: Asset, ctx: SelftestContext) -> float:
    from diffalign.engine.io import load_pt
    from diffalign.engine.rewards import clip_preprocess, load_reward
    from diffalign.engine.rewards.files import state_dict_of
    from diffalign.engine.rewards.hpsv2 import open_clip_heads
    from diffalign.engine.selftest_refs import reference_hps

    version = "v2.0" if asset.path.name == "HPS_v2_compressed.pt" else "v2.1"
    reward = load_reward(
        "hpsv2", hps_checkpoint_path=str(asset.path), hps_version=version, device=ctx.device
    )
    x = _images(2)
    with torch.no_grad():
        value = reward(x.to(ctx.device), PROMPTS)
    sd = state_dict_of(load_pt(asset.path), asset.path, "HPS checkpoint")
    sd = {k: v.float() for k, v in sd.items()}
    context = int(sd["positional_embedding"].shape[0])
    tokens = reward.bundle.tokenizer(
        PROMPTS, padding="max_length", max_length=context, truncation=True, return_tensors="pt"
    )["input_ids"]
    pix = clip_preprocess(x, reward.bundle.size, reward.bundle.mean, reward.bundle.std)
    heads_t = open_clip_heads(int(sd["token_embedding.weight"].shape[1]))
    heads_v = open_clip_heads(int(sd["visual.class_embedding"].numel()))
    with torch.no_grad():
        ref = reference_hps(sd, pix, tokens, heads_t, heads_v)
    return _max_diff(value, ref)


@register_check("reward imagereward vs BLIP reference", file_of("imagereward"), 1e-3)
def _check_imagereward(asset: Asset, ctx: SelftestContext) -> float:
    from diffalign.engine.io import load_pt
    from diffalign.engine.rewards import CLIP_MEAN, CLIP_STD, clip_preprocess, load_reward
    from diffalign.engine.rewards.files import state_dict_of
    from diffalign.engine.rewards.imagereward import IMAGEREWARD_MEAN, IMAGEREWARD_STD, vit_heads
    from diffalign.engine.selftest_refs import reference_imagereward

    reward = load_reward("imagereward", imagereward_model_path=str(asset.path), device=ctx.device)
    x = _images(3)
    with torch.no_grad():
        value = reward(x.to(ctx.device), PROMPTS)
    sd = state_dict_of(load_pt(asset.path), asset.path, "ImageReward checkpoint")
    sd = {k: v.float() for k, v in sd.items()}
    med = _read_json(asset.path.parent / "med_config.json")
    ids, mask = reward.tokens(PROMPTS)
    pix = clip_preprocess(x, reward.size, CLIP_MEAN, CLIP_STD)
    heads_v = vit_heads(int(sd["blip.visual_encoder.cls_token"].shape[-1]))
    with torch.no_grad():
        ref = reference_imagereward(
            sd,
            pix,
            ids.cpu(),
            mask.cpu(),
            heads_v,
            int(med.get("num_attention_heads", 12)),
            IMAGEREWARD_MEAN,
            IMAGEREWARD_STD,
        )
    return _max_diff(value, ref)


def plain_pipeline(path: Path, device: torch.device):
    """The diffusers pipeline `model_index.json` names, in float32 on `device`, as a user would
    load it (no diffalign loading code in between), without progress bars."""
    from diffusers import DiffusionPipeline

    from diffalign.engine.loading import _dtype_kw
    from diffalign.engine.progress import quiet_library_bars

    quiet_library_bars()  # diffusers is imported now: its loading bar goes too
    pipe = DiffusionPipeline.from_pretrained(str(path), **_dtype_kw(torch.float32)).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------
# the U-Net LoRA export (engine.lora: noise SFT/EM and U-REPA write their LoRA with it)

UNET_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def _unet_inputs(unet, device) -> dict:
    """Fixed random inputs of one U-Net call on an 8x8 latent (SDXL: with its text_time
    conditioning)."""
    cfg = unet.config
    g = torch.Generator().manual_seed(5)
    kw: dict[str, Any] = {
        "sample": torch.randn(1, cfg.in_channels, 8, 8, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 8, cfg.cross_attention_dim, generator=g),
    }
    if cfg.addition_embed_type == "text_time":
        n_text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, n_text, generator=g).to(device),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).to(device),
        }
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


@register_check(
    "U-Net LoRA round trip (save_unet_lora -> load_lora_weights)",
    pipeline_of(*UNET_PIPELINES),
    1e-5,
)
def _check_unet_lora(asset: Asset, ctx: SelftestContext) -> tuple[float, str]:
    import tempfile

    from peft import LoraConfig

    from diffalign.engine.lora import save_unet_lora

    pipe = plain_pipeline(asset.path, ctx.device)
    unet = pipe.unet.eval()
    inputs = _unet_inputs(unet, ctx.device)
    torch.manual_seed(0)
    with torch.no_grad():
        plain = unet(**inputs).sample
        config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        unet.add_adapter(config, adapter_name="selftest")
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)  # fresh LoRA B is 0: give the adapter something to carry
        trained = unet(**inputs).sample
        with tempfile.TemporaryDirectory() as tmp:
            save_unet_lora(type(pipe), tmp, unet, "selftest")
            unet.delete_adapters("selftest")
            pipe.load_lora_weights(tmp, adapter_name="loaded")
        loaded = unet(**inputs).sample
    moved = _max_diff(trained, plain)
    if moved == 0:
        raise RuntimeError("the random LoRA did not change the output: nothing to compare")
    return _max_diff(loaded, trained), f"the LoRA moves the output by {moved:.3g}"
