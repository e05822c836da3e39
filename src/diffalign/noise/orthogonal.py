"""Patch-wise orthogonal noise transform (spec N; seed 001).

A latent ``z [B, C, H, W]`` is cut into non-overlapping ``p x p`` patches; each patch vector
(length ``D = C p^2``, flattened channel-major as ``(c, dy, dx)``) is multiplied by one shared
orthogonal ``Q``. For a fixed ``Q`` and ``z ~ N(0, I)``, ``Q z ~ N(0, I)`` exactly (a rotation
of an isotropic Gaussian), and every patch keeps its Euclidean norm.

``Q`` is parameterised by a free matrix ``A`` as the seed does (``PatchOrthogonalNoise.raw``):
``S = A - A^T`` (so a gradient step on ``A`` at a given lr moves ``S`` exactly as the seed's
step does), mapped to the orthogonal group exactly (no truncated series):

- ``matrix_exp``: ``Q = exp(S)`` (``torch.linalg.matrix_exp``),
- ``cayley``: ``Q = (I - S)^{-1} (I + S)`` (``torch.linalg.solve``; ``I - S`` is always
  invertible because the eigenvalues of ``S`` are purely imaginary),

optionally composed with a fixed Haar-random base ``Q0`` (``Q = Q0 f(S)``), so a random start
is still trainable. Gradient steps move ``A`` freely and ``Q`` stays on the group. ``A`` starts
at 0 (``Q = I`` exactly, the spec's default) or, with ``init_std``, at ``init_std * N(0, 1)``
(the seed's ``init_scale = 1e-4`` start).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffalign.engine.errors import DiffalignError

PARAMETRIZATIONS = ("matrix_exp", "cayley")
INITS = ("identity", "random")


def _check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DiffalignError(f"{name} must be a positive integer, got {value!r}")
    return value


def patchify(z: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B, (H/p)(W/p), C p^2]``; patches row-major, vectors ``(c, dy, dx)``."""
    p = _check_positive_int(patch_size, "patch_size")
    if z.ndim != 4:
        raise DiffalignError(f"expected a latent of shape [B, C, H, W], got {tuple(z.shape)}")
    b, c, h, w = z.shape
    if h % p or w % p:
        raise DiffalignError(
            f"latent height and width ({h}x{w}) must be divisible by the patch size {p}"
        )
    x = z.reshape(b, c, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 1, 3, 5)  # [B, H/p, W/p, C, p, p]
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(
    x: torch.Tensor, patch_size: int, channels: int, height: int, width: int
) -> torch.Tensor:
    """Exact inverse of :func:`patchify`: ``[B, L, C p^2] -> [B, C, H, W]``."""
    p = _check_positive_int(patch_size, "patch_size")
    if height % p or width % p:
        raise DiffalignError(
            f"height and width ({height}x{width}) must be divisible by the patch size {p}"
        )
    hp, wp = height // p, width // p
    if x.ndim != 3 or x.shape[1] != hp * wp or x.shape[2] != channels * p * p:
        raise DiffalignError(
            f"expected patches of shape [B, {hp * wp}, {channels * p * p}], got {tuple(x.shape)}"
        )
    b = x.shape[0]
    x = x.reshape(b, hp, wp, channels, p, p).permute(0, 3, 1, 4, 2, 5)  # [B, C, H/p, p, W/p, p]
    return x.reshape(b, channels, height, width)


def skew_part(a: torch.Tensor) -> torch.Tensor:
    """``S = A - A^T``: the seed's skew-symmetric matrix of the free parameter ``A``."""
    return a - a.transpose(-1, -2)


def skew_to_orthogonal(a: torch.Tensor, parametrization: str = "matrix_exp") -> torch.Tensor:
    """Map a free ``[..., D, D]`` matrix ``A`` to an orthogonal float32 ``f(A - A^T)``.

    Both maps are exact; they are evaluated in float64 and rounded to float32, because in
    float32 the error of ``exp`` grows with ``||S||`` (up to ~3e-4 for D = 256 after large
    optimiser steps), while float64-then-round keeps ``max |Q^T Q - I|`` near 1e-7 for any ``S``.
    """
    return _skew_to_orthogonal_f64(a, parametrization).float()


def _skew_to_orthogonal_f64(a: torch.Tensor, parametrization: str) -> torch.Tensor:
    if parametrization not in PARAMETRIZATIONS:
        raise DiffalignError(
            f"unknown parametrization {parametrization!r}; choose one of {', '.join(PARAMETRIZATIONS)}"
        )
    a = a.to(_compute_dtype(a.device))
    s = skew_part(a)
    if parametrization == "matrix_exp":
        return torch.linalg.matrix_exp(s)
    eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device).expand_as(s)
    return torch.linalg.solve(eye - s, eye + s)


def _compute_dtype(device: torch.device) -> torch.dtype:
    # float64 everywhere it exists (MPS has no float64; there Q is built in float32).
    return torch.float32 if device.type == "mps" else torch.float64


def haar_orthogonal(
    dim: int, count: int | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Haar-distributed orthogonal ``[D, D]`` (or ``[count, D, D]``), float32.

    QR of a Gaussian matrix with the sign fix ``Q <- Q diag(sign(diag R))``, which makes the
    distribution exactly Haar on O(D) (without it QR's sign convention biases it).
    """
    _check_positive_int(dim, "dim")
    shape = (dim, dim) if count is None else (count, dim, dim)
    g = torch.randn(shape, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return (q * signs.unsqueeze(-2)).float()


def apply_patch_orthogonal(z: torch.Tensor, q: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Multiply every ``p x p`` patch vector of ``z`` by ``Q`` (pure function).

    ``q`` is ``[D, D]`` (shared by the batch) or ``[B, D, D]`` (sample ``i`` uses ``q[i]``).
    The product runs in float32 with autocast off; the result has ``z``'s dtype. It is written
    as ``x + x (Q - I)^T`` so that ``Q = I`` returns ``z`` bit for bit (also under TF32).
    """
    if z.ndim != 4:
        raise DiffalignError(f"expected a latent of shape [B, C, H, W], got {tuple(z.shape)}")
    b, c, h, w = z.shape
    d = c * patch_size * patch_size
    if q.ndim not in (2, 3) or q.shape[-2:] != (d, d):
        raise DiffalignError(
            f"Q must be [{d}, {d}] or [B, {d}, {d}] for {c} channels and patch size "
            f"{patch_size}, got {tuple(q.shape)}"
        )
    if q.ndim == 3 and q.shape[0] != b:
        raise DiffalignError(
            f"got {q.shape[0]} per-sample transforms but a batch of {b} latents; they must match"
        )
    with torch.autocast(device_type=z.device.type, enabled=False):
        x = patchify(z.float(), patch_size)
        q = q.float()
        eye = torch.eye(d, dtype=q.dtype, device=q.device)
        delta_t = (q - eye).transpose(-1, -2)
        y = x + torch.matmul(x, delta_t)
    return unpatchify(y, patch_size, c, h, w).to(z.dtype)


def seed_start(dim: int, init_std: float, seed: int | None = None) -> torch.Tensor:
    """The seed's start of ``A``: ``init_std * randn(D, D)`` from a CPU generator seeded with
    ``seed`` (the seed draws it right after ``torch.manual_seed(seed)``, so the same seed gives
    the same ``A``); every transform of a batch starts from this one draw, as every prompt of the
    seed's runs does."""
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    return float(init_std) * torch.randn((dim, dim), generator=gen, dtype=torch.float32)


def orthogonality_error(q: torch.Tensor) -> float:
    """``max |Q^T Q - I|`` over all entries (and all matrices of a ``[N, D, D]`` stack)."""
    q = q.detach()
    q64 = (q.cpu() if q.device.type == "mps" else q).to(torch.float64)
    eye = torch.eye(q64.shape[-1], dtype=torch.float64, device=q64.device)
    return float((q64.transpose(-1, -2) @ q64 - eye).abs().max())


class PatchOrthogonal(nn.Module):
    """Trainable patch-wise orthogonal map ``z -> Q z`` (spec N: Patch-wise orthogonal transform).

    ``num_transforms = N > 1`` holds N independent ``Q``'s trained at once: the input batch must
    be N and sample ``i`` uses ``Q_i`` (one optimiser step updates all of them).
    ``init="identity"`` starts at ``Q = I`` (``q(z) == z`` exactly); ``init="random"`` starts at a
    seeded Haar-random ``Q0`` and learns ``Q = Q0 f(S)``; ``init_std > 0`` starts ``A`` at the
    seed's ``init_std * randn`` (:func:`seed_start`, seeded by ``seed``) instead of 0. The parameter and ``Q0`` stay float32
    even under ``module.to(torch.bfloat16)`` (only device moves apply); ``Q`` is built in float64
    and returned as float32; the product runs in float32 and the output has the input's dtype.
    """

    def __init__(
        self,
        channels: int,
        patch_size: int = 2,
        parametrization: str = "matrix_exp",
        init: str = "identity",
        num_transforms: int = 1,
        seed: int | None = None,
        init_std: float = 0.0,
    ) -> None:
        super().__init__()
        self.channels = _check_positive_int(channels, "channels")
        self.patch_size = _check_positive_int(patch_size, "patch_size")
        self.num_transforms = _check_positive_int(num_transforms, "num_transforms")
        if parametrization not in PARAMETRIZATIONS:
            raise DiffalignError(
                f"unknown parametrization {parametrization!r}; "
                f"choose one of {', '.join(PARAMETRIZATIONS)}"
            )
        if init not in INITS:
            raise DiffalignError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
        if not (isinstance(init_std, (int, float)) and math.isfinite(init_std) and init_std >= 0):
            raise DiffalignError(f"init_std must be finite and >= 0, got {init_std!r}")
        self.parametrization = parametrization
        self.init = init
        self.init_std = float(init_std)
        self.dim = self.channels * self.patch_size**2
        n, d = self.num_transforms, self.dim
        # Free parameter A; S = A - A^T enters Q. Zero -> S = 0 -> f(S) = I.
        self.weight = nn.Parameter(torch.zeros(n, d, d, dtype=torch.float32))
        if self.init_std > 0:
            self.weight.data.copy_(seed_start(d, self.init_std, seed).expand(n, d, d))
        if init == "random":
            gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
            self.register_buffer("base", haar_orthogonal(d, count=n, generator=gen))
        else:
            self.base = None

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, patch_size={self.patch_size}, dim={self.dim}, "
            f"parametrization={self.parametrization!r}, init={self.init!r}, "
            f"num_transforms={self.num_transforms}, init_std={self.init_std}"
        )

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` / `.half()` must not round A or the Haar base (Q would stop
        # being orthogonal to float32 precision): take device moves, ignore dtype changes.
        def device_only(t: torch.Tensor) -> torch.Tensor:
            moved = fn(t)
            return t.to(moved.device) if moved.dtype != t.dtype else moved

        return super()._apply(device_only, recurse)

    def _matrices(self) -> torch.Tensor:
        if self.base is None:
            return skew_to_orthogonal(self.weight, self.parametrization)  # [N, D, D], float32
        # Compose with the Haar base in float64 too, so the product is not a second rounding.
        f = _skew_to_orthogonal_f64(self.weight, self.parametrization)
        return torch.matmul(self.base.to(f.dtype), f).float()

    def matrix(self) -> torch.Tensor:
        """``Q`` as float32: ``[D, D]``, or ``[N, D, D]`` when ``num_transforms > 1``."""
        q = self._matrices()
        return q[0] if self.num_transforms == 1 else q

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4:
            raise DiffalignError(f"expected a latent of shape [B, C, H, W], got {tuple(z.shape)}")
        if z.shape[1] != self.channels:
            raise DiffalignError(
                f"latent has {z.shape[1]} channels but the orthogonal transform was built for "
                f"{self.channels}"
            )
        h, w = z.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise DiffalignError(
                f"latent height and width ({h}x{w}) must be divisible by the patch size "
                f"{self.patch_size}"
            )
        if self.num_transforms > 1 and z.shape[0] != self.num_transforms:
            raise DiffalignError(
                f"this transform holds {self.num_transforms} per-sample matrices, so the batch "
                f"must be {self.num_transforms}, got {z.shape[0]}"
            )
        q = self.matrix()
        return apply_patch_orthogonal(z, q, self.patch_size)
