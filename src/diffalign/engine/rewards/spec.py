"""Reward specs: `--reward hpsv2:5,imagereward:1,clip:0.01,pickscore:0.05` and the seed's
`--reward_type clip|aesthetic|hybrid` (issue 7 "Rewards"; seed 001 `rewards_clip.py`)."""

from __future__ import annotations

import math
import re

from diffalign.engine.errors import DiffalignError

# every reward `load_reward` builds; `hybrid` is a named combination (below)
REWARD_NAMES: tuple[str, ...] = ("clip", "aesthetic", "hybrid", "pickscore", "imagereward", "hpsv2")
BASE_REWARDS: tuple[str, ...] = ("clip", "aesthetic", "pickscore", "imagereward", "hpsv2")

# ReNO's default combination (HPS 5, ImageReward 1, CLIP 0.01, PickScore 0.05)
RENO_DEFAULT_SPEC = "hpsv2:5,imagereward:1,clip:0.01,pickscore:0.05"

# The seed's hybrid: `aesthetic + 0.25 * clip_cosine`; our `clip` reward is `100 cos` (ReNO's
# scale, = the seed's `logit_scale.exp() * cos` for OpenAI CLIP), so its weight is 0.25 / 100.
HYBRID_TERMS: tuple[tuple[str, float], ...] = (("aesthetic", 1.0), ("clip", 0.0025))

# the seed's `--reward_type` values -> specs
REWARD_TYPES: dict[str, str] = {
    "clip": "clip",
    "aesthetic": "aesthetic",
    "hybrid": "hybrid",
}

_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


def _valid() -> str:
    return ", ".join(REWARD_NAMES)


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """`"hpsv2:5,imagereward:1"` -> `[("hpsv2", 5.0), ("imagereward", 1.0)]`.

    A bare name has weight 1. Names are case-insensitive (`HPSv2`, `ImageReward`, `PickScore`
    as the download names spell them). An unknown name, a weight that is not a finite number
    or is 0, an empty item or a name given twice is one DiffalignError line listing the valid
    names; so is a reward whose total weight after `hybrid` is expanded is 0 or not finite
    (`hybrid,clip:-0.0025`, see `expand_spec`).
    `hybrid` stays one item here; `load_reward` expands it to the seed's clip + aesthetic.
    """
    text = str(spec).strip() if spec is not None else ""
    if not text:
        raise DiffalignError(
            f"--reward is empty; give NAME[:WEIGHT],... with NAME one of {_valid()}"
        )
    out: list[tuple[str, float]] = []
    seen: set[str] = set()
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise DiffalignError(
                f"--reward '{spec}': empty item; use NAME[:WEIGHT],... with NAME one of {_valid()}"
            )
        name, sep, weight_text = item.partition(":")
        name = name.strip().lower()
        if name not in REWARD_NAMES or not _NAME.match(name):
            raise DiffalignError(
                f"--reward '{spec}': unknown reward '{name}'; valid names: {_valid()}"
            )
        weight = 1.0
        if sep:
            try:
                weight = float(weight_text.strip())
            except ValueError:
                weight = math.nan
            if not math.isfinite(weight) or ":" in weight_text:
                raise DiffalignError(
                    f"--reward '{spec}': weight of '{name}' must be a finite number, got "
                    f"'{weight_text.strip()}' (use NAME:WEIGHT, e.g. hpsv2:5; valid names: {_valid()})"
                )
        if weight == 0:  # the term would be loaded and computed for nothing
            raise DiffalignError(
                f"--reward '{spec}': weight of '{name}' is 0 (it would change nothing); "
                "leave the reward out or give it a non-zero weight"
            )
        if name in seen:
            raise DiffalignError(f"--reward '{spec}': '{name}' is listed twice")
        seen.add(name)
        out.append((name, weight))
    expand_spec(out, spec)  # hybrid's parts merged with explicit terms: each weight non-zero
    return out


def reward_type_spec(reward_type: str) -> str:
    """The seed's `--reward_type clip|aesthetic|hybrid` as a `--reward` spec."""
    key = str(reward_type).strip().lower()
    if key not in REWARD_TYPES:
        raise DiffalignError(
            f"--reward-type '{reward_type}': choose one of {', '.join(REWARD_TYPES)}"
        )
    return REWARD_TYPES[key]


# a total weight within this fraction of its contributions' sizes has cancelled (the rounding
# residue of `hybrid:1.1,clip:-0.00275` is 4e-19, not a weight anyone meant)
_CANCELLED = 1e-9
# the largest |weight| of a term. Rewards and their loss offsets are at most a few hundred
# (clip is 100 cos) and ReNO's weights at most 5, so 1e6 is far above any meaningful weighting
# while `weight * reward`, the weighted total, its loss offset and their gradients stay many
# orders of magnitude inside float32 (3.4e38): `aesthetic:1e308` would overflow them to inf/NaN
# at run time (a float32 reward times even 1e37 can), so it is refused at spec time instead.
MAX_REWARD_WEIGHT = 1e6


def _parts(name: str) -> tuple[tuple[str, float], ...]:
    return HYBRID_TERMS if name == "hybrid" else ((name, 1.0),)


def expand_spec(terms: list[tuple[str, float]], spec: str | None = None) -> list[tuple[str, float]]:
    """Replace `hybrid:w` by the seed's `aesthetic:w, clip:0.0025 w` (merging repeated names).

    Every resulting weight must be a finite non-zero number of size at most
    `MAX_REWARD_WEIGHT`. A hybrid part cancelled by an explicit term (`hybrid,clip:-0.0025` ->
    clip 0, computed for nothing), a product that overflows (inf) or underflows (0), a 0 / NaN
    weight in a parsed list, or a weight above the bound (`aesthetic:1e308`, whose weighted
    reward would overflow at run time) is one DiffalignError line naming the component and its
    weight (and `spec`, else the terms).
    """
    merged: dict[str, float] = {}
    size: dict[str, float] = {}  # sum of |contribution|: what "cancelled" is relative to
    sources: dict[str, list[str]] = {}
    for name, weight in terms:
        for part, w in _parts(name):
            merged[part] = merged.get(part, 0.0) + weight * w
            size[part] = size.get(part, 0.0) + abs(weight * w)
            sources.setdefault(part, []).append(f"{weight * w:g} from {name}:{weight:g}")
    label = spec if spec is not None else ",".join(f"{n}:{w:g}" for n, w in terms)
    for part, weight in merged.items():
        finite = math.isfinite(weight) and math.isfinite(size[part])
        if finite and abs(weight) > MAX_REWARD_WEIGHT:
            raise DiffalignError(
                f"--reward '{label}': the weight of '{part}' is {weight:g} "
                f"({' + '.join(sources[part])}), above the bound {MAX_REWARD_WEIGHT:g} in size "
                "(its weighted reward could overflow to inf/NaN); use a weight within +-1e6"
            )
        if finite and abs(weight) > _CANCELLED * size[part]:
            continue
        shown = f"{weight:g}" if not finite or weight == 0 else f"{weight:g}, i.e. 0"
        effect = "change nothing" if finite else "not be a finite number"
        raise DiffalignError(
            f"--reward '{label}': the effective weight of '{part}' is {shown} "
            f"({' + '.join(sources[part])}), so its term would {effect}; give each reward "
            "a finite non-zero total weight or leave it out"
        )
    return list(merged.items())
