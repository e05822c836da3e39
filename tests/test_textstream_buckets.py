"""Timestep-bucketed and column-centred calibration (issue 15): a planted rotation per bucket is
recovered through the calibration hooks on a FLUX-shaped block stack (global indices over
double then single blocks), and the streamed centred/uncentred solves equal dense references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes

from diffalign.textstream.adapters import stream_adapter
from diffalign.textstream.calibrate import _TokenCollector
from diffalign.textstream.procrustes import ProcrustesAccumulator
from diffalign.textstream.residual import bucket_index, standardize
from diffalign.textstream.rotations import equal_bucket_edges

D = 24
EDGES = equal_bucket_edges(3)  # [0, 333.3, 666.7, 1000]


def rotation_fixing_ones(d: int, seed: int) -> torch.Tensor:
    """A random orthogonal matrix with R 1 = 1: it maps standardised rows to standardised rows."""
    g = torch.Generator().manual_seed(seed)
    ones = torch.ones(d, 1, dtype=torch.float64) / d**0.5
    basis = torch.linalg.qr(
        torch.cat([ones, torch.randn(d, d - 1, generator=g, dtype=torch.float64)], 1)
    )[0][:, 1:]
    q = torch.linalg.qr(torch.randn(d - 1, d - 1, generator=g, dtype=torch.float64))[0]
    return basis @ q @ basis.T + ones @ ones.T


PLANTED = [rotation_fixing_ones(D, 50 + b) for b in range(3)]


class PlantedBlock(torch.nn.Module):
    """A block whose text output is its input times the planted rotation of the row's bucket."""

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None):
        buckets = bucket_index(temb * 1000, EDGES)
        rots = torch.stack([PLANTED[int(b)] for b in buckets]).to(encoder_hidden_states)
        return encoder_hidden_states @ rots, hidden_states


class FluxTransformer2DModel(torch.nn.Module):
    """FLUX.1's block layout: 2 double-stream, then 3 single-stream blocks, t / 1000 in."""

    def __init__(self):
        super().__init__()
        self.config = type("C", (), {"num_attention_heads": 2, "attention_head_dim": D // 2})()
        self.transformer_blocks = torch.nn.ModuleList([PlantedBlock() for _ in range(2)])
        self.single_transformer_blocks = torch.nn.ModuleList([PlantedBlock() for _ in range(3)])

    def forward(self, hidden_states, encoder_hidden_states, timestep):
        text = encoder_hidden_states
        for block in [*self.transformer_blocks, *self.single_transformer_blocks]:
            text, hidden_states = block(hidden_states, text, timestep)
        return hidden_states


def test_planted_rotation_per_bucket_is_recovered_through_the_hooks():
    tr = FluxTransformer2DModel()
    adapter = stream_adapter(tr)
    assert adapter.num_blocks == 5 and adapter.block_name(3) == "single_transformer_blocks.1"
    origin, targets = 1, [2, 4]  # a double-block origin, single-block targets
    accs = [ProcrustesAccumulator(targets, D) for _ in range(3)]
    col = _TokenCollector(adapter, origin, targets, accs, 1e-6, transformer=tr, bucket_edges=EDGES)
    g = torch.Generator().manual_seed(0)
    try:
        for step in range(6):
            t = torch.tensor([0.1, 0.5, 0.9, 0.2])[torch.randperm(4, generator=g)]
            text = standardize(torch.randn(4, 40, D, generator=g, dtype=torch.float64) + 0.3)[0]
            col.rows = torch.tensor([0, 1, 2, 3] if step % 2 else [1, 3])
            col.mask = None
            tr(hidden_states=torch.zeros(4, 1), encoder_hidden_states=text, timestep=t)
    finally:
        col.close()
    assert all(a.count[0] > 0 for a in accs)
    for b, acc in enumerate(accs):
        for center in (False, True):
            rots, report = acc.solve(column_center=center)
            # entering target k = origin tokens times R_b^(k - origin)
            for t in targets:
                want = torch.linalg.matrix_power(PLANTED[b], t - origin)
                torch.testing.assert_close(rots[t], want, atol=1e-8, rtol=0)
            assert all(r["error_after"] < 1e-12 for r in report)


def dense_solve(x: np.ndarray, y: np.ndarray, center: bool):
    """Stored tokens: (optionally) centre the columns, pin R 1 = 1, scipy's Procrustes."""
    if center:
        x, y = x - x.mean(0), y - y.mean(0)
    ones = np.ones((1, x.shape[1]))
    r, _ = orthogonal_procrustes(np.vstack([x, ones]), np.vstack([y, ones]))
    yy = (y**2).sum()
    return r, ((x - y) ** 2).sum() / yy, ((x @ r - y) ** 2).sum() / yy


@pytest.mark.parametrize("center", [False, True], ids=["uncentred", "col-centred"])
def test_streamed_solve_equals_dense_reference(center):
    g = torch.Generator().manual_seed(1)
    acc = ProcrustesAccumulator([3], D)
    xs, ys = [], []
    for _ in range(5):  # samples streamed one by one; columns with non-zero means
        raw = torch.randn(60, D, generator=g, dtype=torch.float64) + torch.linspace(-1, 1, D)
        x = standardize(raw)[0]
        y = standardize(
            x @ PLANTED[0] + 0.3 * torch.randn(60, D, generator=g, dtype=torch.float64) + 0.5
        )[0]
        acc.add(3, x, y)
        xs.append(x.numpy())
        ys.append(y.numpy())
    rots, report = acc.solve(column_center=center)
    r, before, after = dense_solve(np.concatenate(xs), np.concatenate(ys), center)
    np.testing.assert_allclose(rots[3].numpy(), r, atol=1e-8)
    assert report[0]["error_before"] == pytest.approx(before, rel=1e-9)
    assert report[0]["error_after"] == pytest.approx(after, rel=1e-9)
    other, _, _ = dense_solve(np.concatenate(xs), np.concatenate(ys), not center)
    assert np.abs(other - r).max() > 1e-3  # centring really changes the solution here


def test_bucket_index_edges():
    edges = [0.0, 250.0, 500.0, 1000.0]
    t = torch.tensor([0.0, 249.9, 250.0, 999.0, 1000.0, 1200.0, -5.0])
    assert bucket_index(t, edges).tolist() == [0, 0, 1, 2, 2, 2, 0]
