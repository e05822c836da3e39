"""Orthogonal Procrustes for the text stream (spec T: Calibration; seed 000), pure math.

For token-wise standardised origin tokens X and target tokens Y (`[tokens, d]`),
`min_R ||X R - Y||_F s.t. R^T R = I` has the closed form `R = U V^T` where `U S V^T = X^T Y`.
Only `X^T Y`, `||X||^2`, `||Y||^2` and the token count are needed, so `ProcrustesAccumulator`
streams them in float64 and never keeps tokens: memory is O(layers x d^2).
Column centring (`--col-center`, issue 15) subtracts each feature column's mean over the
calibration tokens from X and Y before the solve; streamed, that is
`Xc^T Yc = X^T Y - n mu_x mu_y^T = X^T Y - s_x s_y^T / n` with the column sums `s_x`, `s_y`,
so the accumulator also keeps those sums (memory still O(layers x d^2)).
With fewer token rows than d the solution is not unique (any rotation of the unseen subspace
fits as well); calibrate with many more tokens than features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffalign.engine.errors import DiffalignError

ORTHOGONALITY_TOL = 1e-3


def solve_procrustes(xty: torch.Tensor) -> torch.Tensor:
    """Orthogonal R minimising `||X R - Y||_F` given `xty = X^T Y` (`[d, d]`): `R = U V^T`.

    Computed in float64; returned in float64.
    """
    if not isinstance(xty, torch.Tensor) or xty.ndim != 2 or xty.shape[0] != xty.shape[1]:
        shape = tuple(xty.shape) if isinstance(xty, torch.Tensor) else type(xty).__name__
        raise DiffalignError(f"solve_procrustes needs a square [d, d] matrix X^T Y (got {shape})")
    m = xty.to(torch.float64)
    if not torch.isfinite(m).all():
        raise DiffalignError("solve_procrustes: X^T Y contains NaN or inf")
    u, _, vh = torch.linalg.svd(m)
    return u @ vh


def orthogonality_error(rotation: torch.Tensor) -> float:
    """`max |R^T R - I|` (float64); 0 for an exactly orthogonal matrix."""
    r = rotation.to(torch.float64)
    eye = torch.eye(r.shape[-1], dtype=torch.float64, device=r.device)
    return float((r.T @ r - eye).abs().max())


def alignment_error(
    xx: float, yy: float, xty: torch.Tensor, rotation: torch.Tensor | None = None
) -> float:
    """Relative error `||X R - Y||^2 / ||Y||^2` from the accumulators (R = I when None).

    Uses `||X R||^2 = ||X||^2` (R orthogonal) and `<X R, Y> = tr(R^T X^T Y)`.
    """
    m = xty.to(torch.float64)
    cross = float(m.diagonal().sum()) if rotation is None else float((rotation.to(m) * m).sum())
    if yy <= 0:
        return float("nan")
    return max(xx + yy - 2.0 * cross, 0.0) / yy


def centered_cross(
    xty: torch.Tensor, sum_x: torch.Tensor, sum_y: torch.Tensor, count: float
) -> torch.Tensor:
    """`Xc^T Yc` of column-centred X, Y from the streamed sums: `X^T Y - s_x s_y^T / n`."""
    m = xty.to(torch.float64)
    return m - torch.outer(sum_x.to(m), sum_y.to(m)) / float(count)


def pin_mean_direction(xty: torch.Tensor) -> torch.Tensor:
    """`X^T Y + s * 1 1^T / d`: makes the Procrustes solution unique for standardised tokens.

    Only applied when 1 is (numerically) a null direction. Token-wise standardised rows have zero mean, so `X 1 = Y 1 = 0` and the all-ones direction
    is a zero singular direction of `X^T Y`: `U V^T` may then map 1 to +1 or -1 at random (the
    two solutions differ by `2/d 1 1^T` and act identically on zero-mean tokens). Adding the
    rank-one term, i.e. one extra constant token pair, picks the solution with `R 1 = 1`
    without changing the fit on the zero-mean subspace.
    """
    m = xty.to(torch.float64)
    d = m.shape[-1]
    scale = float(torch.linalg.matrix_norm(m))
    ones = torch.ones(d, dtype=m.dtype, device=m.device)
    leak = max(float((m @ ones).norm()), float((ones @ m).norm())) / d**0.5
    if scale == 0.0 or leak > 1e-6 * scale:
        return m  # the rows were not zero-mean: nothing to pin
    return m + scale * torch.outer(ones, ones) / d


class ProcrustesAccumulator:
    """Streaming float64 sums per target layer: `X^T Y`, `||X||^2`, `||Y||^2`, token count and
    the column sums of X and Y (for column centring).

    `add(layer, x, y)` takes already standardised `[..., tokens, d]` tensors of equal shape
    (rows are paired tokens). `state()`/`load_state()` pack everything in one float64 tensor so
    processes can sum it with one all-reduce.
    """

    def __init__(self, target_layers: Sequence[int], feature_dim: int, device=None):
        self.target_layers = list(target_layers)
        self.feature_dim = int(feature_dim)
        n, d = len(self.target_layers), self.feature_dim
        self.xty = torch.zeros(n, d, d, dtype=torch.float64, device=device)
        self.xx = torch.zeros(n, dtype=torch.float64, device=device)
        self.yy = torch.zeros(n, dtype=torch.float64, device=device)
        self.count = torch.zeros(n, dtype=torch.float64, device=device)
        self.sum_x = torch.zeros(n, d, dtype=torch.float64, device=device)
        self.sum_y = torch.zeros(n, d, dtype=torch.float64, device=device)
        self._index = {layer: i for i, layer in enumerate(self.target_layers)}

    def add(self, layer: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Accumulate paired token rows of origin `x` and target `y` for `layer`."""
        if x.shape != y.shape or x.shape[-1] != self.feature_dim:
            raise DiffalignError(
                f"accumulator: origin {tuple(x.shape)} / target {tuple(y.shape)} do not match "
                f"feature size {self.feature_dim}"
            )
        i = self._index[layer]
        x2 = x.reshape(-1, self.feature_dim).to(device=self.xty.device, dtype=torch.float64)
        y2 = y.reshape(-1, self.feature_dim).to(device=self.xty.device, dtype=torch.float64)
        self.xty[i] += x2.T @ y2
        self.xx[i] += (x2 * x2).sum()
        self.yy[i] += (y2 * y2).sum()
        self.count[i] += x2.shape[0]
        self.sum_x[i] += x2.sum(0)
        self.sum_y[i] += y2.sum(0)

    def state(self) -> torch.Tensor:
        """All sums flattened into one float64 vector (for all-reduce)."""
        return torch.cat(
            [
                self.xty.flatten(),
                self.xx,
                self.yy,
                self.count,
                self.sum_x.flatten(),
                self.sum_y.flatten(),
            ]
        )

    def load_state(self, flat: torch.Tensor) -> None:
        """Inverse of `state()`."""
        n, d = len(self.target_layers), self.feature_dim
        flat = flat.to(device=self.xty.device, dtype=torch.float64)
        self.xty = flat[: n * d * d].reshape(n, d, d).clone()
        rest = flat[n * d * d :]
        self.xx, self.yy, self.count = (rest[k * n : (k + 1) * n].clone() for k in range(3))
        sums = rest[3 * n :]
        self.sum_x = sums[: n * d].reshape(n, d).clone()
        self.sum_y = sums[n * d :].reshape(n, d).clone()

    def solve(self, column_center: bool = False) -> tuple[dict[int, torch.Tensor], list[dict]]:
        """Rotation per target layer (float64) and per-layer error before/after rotation;
        with `column_center` on the column-centred tokens."""
        rotations: dict[int, torch.Tensor] = {}
        report = []
        for i, layer in enumerate(self.target_layers):
            n = float(self.count[i])
            if n <= 0:
                raise DiffalignError(f"no tokens were collected for target layer {layer}")
            # solved where the sums live (a GPU's SVD is much faster at d = 3072)
            xty = self.xty[i]
            xx, yy = float(self.xx[i]), float(self.yy[i])
            if column_center:
                sx, sy = self.sum_x[i], self.sum_y[i]
                xty = centered_cross(xty, sx, sy, n)
                xx -= float(sx @ sx) / n
                yy -= float(sy @ sy) / n
            r = solve_procrustes(pin_mean_direction(xty))
            rotations[layer] = r.cpu()
            report.append(
                {
                    "layer": layer,
                    "tokens": int(n),
                    "error_before": alignment_error(xx, yy, xty),
                    "error_after": alignment_error(xx, yy, xty, r),
                }
            )
        return rotations, report
