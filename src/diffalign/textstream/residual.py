"""The residual mix of spec T as pure tensor functions (seeds 002 and 000; no hooks, no I/O).

Plain mode (seed 002): `c <- c + w * o`.
LN + rescale (+ rotation) mode (seed 000), per token over the feature axis:

    t_norm, mean_t, std_t = standardize(t)          # std = sqrt(population var + eps)
    o_norm, _, _          = standardize(o)
    o_norm                = o_norm @ R              # optional, R orthogonal [d, d]
    m                     = t_norm + w * o_norm
    m                     = layer_norm(m, eps)      # optional, no affine parameters
    out                   = m * std_t + mean_t

Column centring (`--col-center`, issue 15) belongs to calibration only (`procrustes`): a file
calibrated with it is applied as above, to the row-standardised origin with no centring, as the
method's authors' generation code does (Yaoyuxuanyyds/Training-free-Residual-SD3 at e9d7900:
Flux-Residual/flux_transformer_res.py `_apply_residual`; the files hold no column means).
With timestep buckets, `R` is the rotation of the bucket the current timestep falls in
(`bucket_index`). `w` may be a tensor (learned weights): the mix is differentiable in it.

The arithmetic runs in float32 (or float64 when given float64) and the result is cast back to
the target's dtype. Speed options (issue 18): the rotation GEMM may run in the target's own dtype
when the model runs in half precision (`rotation_precision="model"`; its error is below the
model's own bf16/fp16 rounding, fp32 models are unchanged bit for bit), all targets' rotations
may run as one GEMM of the shared origin (`rotate_all`), and the standardise-mix-rescale
(`mix_rescale`) may run compiled (`compiled_mix_rescale`: torch.compile fuses it into a few
kernels).
"""

from __future__ import annotations

import torch

from diffalign.engine.errors import DiffalignError

MODES = ("plain", "ln")
ROTATION_PRECISIONS = ("fp32", "model")


def standardize(
    x: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-wise standardisation over the last axis: `(x - mean) / sqrt(var + eps)`.

    The variance is the population variance (divide by d). Returns `(x_norm, mean, std)` with
    `mean` and `std` keeping the reduced axis (shape `[..., 1]`), so `x_norm * std + mean == x`.
    """
    var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
    std = torch.sqrt(var + eps)
    return (x - mean) / std, mean, std


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else is mixed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def bucket_index(timesteps: torch.Tensor, edges) -> torch.Tensor:
    """Bucket of each timestep for increasing `edges` `[N + 1]`: bucket b holds
    `edges[b] <= t < edges[b + 1]`; timesteps below or above the edges go to the end buckets."""
    e = torch.as_tensor(edges, dtype=torch.float64)
    t = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1)
    inner = e[1:-1].to(t.device)
    return torch.bucketize(t, inner, right=True).to(torch.long)


def _scaled_add(a: torch.Tensor, b: torch.Tensor, weight) -> torch.Tensor:
    """`a + weight * b`; a tensor weight stays in the graph (learned weights)."""
    if isinstance(weight, torch.Tensor):
        return a + weight.to(device=a.device, dtype=a.dtype) * b
    return torch.add(a, b, alpha=weight)


def residual_mix(
    target: torch.Tensor,
    origin: torch.Tensor,
    weight: float | torch.Tensor,
    mode: str,
    rotation: torch.Tensor | None = None,
    layernorm: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Mix the origin text tokens into the target text tokens (spec T), `[..., n, d]` each.

    `mode` is "plain" or "ln"; `rotation` (a `[d, d]` orthogonal matrix, or `[B, d, d]` one per
    batch row) and `layernorm` apply to "ln" mode only. Returns a tensor of
    `target`'s shape and dtype.
    """
    if mode not in MODES:
        raise DiffalignError(f"residual mode must be one of {', '.join(MODES)} (got '{mode}')")
    if target.shape != origin.shape:
        raise DiffalignError(
            f"origin tokens {tuple(origin.shape)} and target tokens {tuple(target.shape)} differ "
            "in shape"
        )
    compute = compute_dtype(target)
    if mode == "plain":
        if rotation is not None or layernorm:
            raise DiffalignError("rotations and --residual-layernorm need mode 'ln', not 'plain'")
        return _scaled_add(target.to(compute), origin.to(compute), weight).to(target.dtype)
    origin_norm = standardize(origin.to(compute), eps)[0]
    return ln_mix(target, origin_norm, weight, rotation, layernorm, eps)


def ln_mix(
    target: torch.Tensor,
    origin_norm: torch.Tensor,
    weight: float | torch.Tensor,
    rotation: torch.Tensor | None = None,
    layernorm: bool = False,
    eps: float = 1e-6,
    rotation_precision: str = "fp32",
) -> torch.Tensor:
    """LN-mode mix given the already standardised origin (the hooks standardise the origin
    once per forward and share it between all targets); otherwise as `residual_mix`.
    `rotation_precision`: "fp32" (the compute dtype) or "model" (see `gemm_dtype`)."""
    o_norm = origin_norm
    if rotation is not None:
        d = target.shape[-1]
        if rotation.shape[-2:] != (d, d) or rotation.ndim not in (2, 3):
            raise DiffalignError(
                f"rotation of shape {tuple(rotation.shape)} does not fit feature size {d}"
            )
        if rotation.ndim == 3 and (o_norm.ndim != 3 or rotation.shape[0] != o_norm.shape[0]):
            raise DiffalignError(
                f"{rotation.shape[0]} per-row rotations for tokens of shape {tuple(o_norm.shape)}"
            )
        o_norm = rotate(o_norm, rotation, gemm_dtype(target.dtype, rotation_precision))
    return mix_rescale(target, o_norm, weight, layernorm, eps)


def gemm_dtype(target_dtype: torch.dtype, precision: str = "fp32") -> torch.dtype:
    """The dtype of the rotation GEMM: the compute dtype ("fp32"), or with "model" the target's
    own dtype when it is half precision (fp16/bf16 tensor cores; float32 models keep float32)."""
    if precision not in ROTATION_PRECISIONS:
        raise DiffalignError(
            f"rotation precision must be one of {', '.join(ROTATION_PRECISIONS)} "
            f"(got '{precision}')"
        )
    if precision == "model" and target_dtype in (torch.float16, torch.bfloat16):
        return target_dtype
    return torch.float64 if target_dtype == torch.float64 else torch.float32


def rotate(o_norm: torch.Tensor, rotation: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`o_norm @ R` (R `[d, d]`, or `[B, d, d]` one per batch row) computed in `dtype`,
    returned in the compute dtype of `o_norm`."""
    compute = compute_dtype(o_norm)
    out = o_norm.to(dtype) @ rotation.to(device=o_norm.device, dtype=dtype)
    return out.to(compute)


def rotate_all(
    o_norm: torch.Tensor, stacked: torch.Tensor, dtype: torch.dtype
) -> list[torch.Tensor]:
    """Every target's `o_norm @ R_t` as one GEMM: `stacked` is `[R_1 | R_2 | ...]` (`[d, T*d]`,
    `stack_rotations`); returns the T products (views), in the compute dtype of `o_norm`."""
    d = o_norm.shape[-1]
    return list(rotate(o_norm, stacked, dtype).split(d, dim=-1))


def stack_rotations(rotations: list[torch.Tensor]) -> torch.Tensor:
    """`[R_1 | R_2 | ...]`: `[d, d]` rotations side by side, `[d, T*d]` (for `rotate_all`)."""
    return torch.cat(list(rotations), dim=1)


def mix_rescale(
    target: torch.Tensor,
    o_rot: torch.Tensor,
    weight: float | torch.Tensor,
    layernorm: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Standardise the target, add `weight` times the (rotated, standardised) origin, optional
    parameter-free LayerNorm, rescale to the target's mean and std, cast to its dtype."""
    compute = compute_dtype(target)
    t_norm, mean_t, std_t = standardize(target.to(compute), eps)
    mixed = _scaled_add(t_norm, o_rot.to(compute), weight)
    if layernorm:
        mixed = torch.nn.functional.layer_norm(mixed, mixed.shape[-1:], eps=eps)
    return torch.addcmul(mean_t, mixed, std_t).to(target.dtype)


_COMPILED: dict[str, object] = {}


def compiled_mix_rescale():
    """`mix_rescale` under torch.compile (built once per process; the same results to float
    rounding, fewer kernels: the standardise, mix and rescale fused)."""
    if "mix_rescale" not in _COMPILED:
        from diffalign.engine.compile import compile_function

        _COMPILED["mix_rescale"] = compile_function(mix_rescale, dynamic=False)
    return _COMPILED["mix_rescale"]
