"""Differentiable rewards on the official checkpoints (issue 7 "Rewards", seed 001).

`load_reward("hpsv2:5,imagereward:1,clip:0.01,pickscore:0.05")` -> a frozen `Reward`:
`reward(images [B,3,H,W] in [0,1], prompts) -> [B]` (higher is better), `reward.loss(...)` =
ReNO's loss. Rewards: clip, aesthetic, hybrid, pickscore, imagereward, hpsv2.
"""

from diffalign.engine.rewards.base import (
    CLIP_MEAN,
    CLIP_STD,
    CombinedReward,
    Reward,
    clip_preprocess,
    resize_center_crop,
    resize_max_pad,
)
from diffalign.engine.rewards.load import (
    HPS_VERSIONS,
    add_reward_arguments,
    load_reward,
    reward_from_args,
    reward_spec_from_args,
)
from diffalign.engine.rewards.spec import (
    BASE_REWARDS,
    HYBRID_TERMS,
    RENO_DEFAULT_SPEC,
    REWARD_NAMES,
    REWARD_TYPES,
    expand_spec,
    parse_reward_spec,
    reward_type_spec,
)

__all__ = [
    "BASE_REWARDS",
    "CLIP_MEAN",
    "CLIP_STD",
    "HPS_VERSIONS",
    "HYBRID_TERMS",
    "RENO_DEFAULT_SPEC",
    "REWARD_NAMES",
    "REWARD_TYPES",
    "CombinedReward",
    "Reward",
    "add_reward_arguments",
    "clip_preprocess",
    "expand_spec",
    "load_reward",
    "parse_reward_spec",
    "resize_center_crop",
    "resize_max_pad",
    "reward_from_args",
    "reward_spec_from_args",
    "reward_type_spec",
]
