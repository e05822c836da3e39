"""Procrustes solve, streaming accumulator and rotation files (spec T: Calibration, Rotation
file), checked against scipy and direct computations on stored tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes
from scipy.stats import ortho_group

from diffalign.engine.errors import DiffalignError
from diffalign.textstream import RotationSet, load_rotations, save_rotations, solve_procrustes
from diffalign.textstream.procrustes import (
    ProcrustesAccumulator,
    alignment_error,
    orthogonality_error,
    pin_mean_direction,
)
from diffalign.textstream.residual import standardize


def test_solve_procrustes_matches_scipy_and_is_optimal():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6))
    y = x @ rng.normal(size=(6, 6)) + 0.3 * rng.normal(size=(50, 6))
    r = solve_procrustes(torch.from_numpy(x.T @ y)).numpy()
    r_scipy, _ = orthogonal_procrustes(x, y)
    np.testing.assert_allclose(r, r_scipy, atol=1e-10)
    np.testing.assert_allclose(r.T @ r, np.eye(6), atol=1e-12)
    best = np.linalg.norm(x @ r - y)
    for seed in range(200):  # no random orthogonal matrix does better
        q = ortho_group.rvs(6, random_state=seed)
        assert np.linalg.norm(x @ q - y) >= best - 1e-9


def test_solve_procrustes_recovers_a_known_rotation():
    r0 = torch.from_numpy(ortho_group.rvs(16, random_state=3))
    x = torch.randn(200, 16, dtype=torch.float64)
    r = solve_procrustes(x.T @ (x @ r0))
    torch.testing.assert_close(r, r0, atol=1e-10, rtol=0)
    assert r.dtype == torch.float64


def test_solve_procrustes_rejects_bad_input():
    with pytest.raises(DiffalignError, match="square"):
        solve_procrustes(torch.zeros(3, 4))
    with pytest.raises(DiffalignError, match="NaN"):
        solve_procrustes(torch.full((3, 3), float("nan")))


def test_accumulator_equals_stored_tokens_and_errors_are_exact():
    g = torch.Generator().manual_seed(0)
    acc = ProcrustesAccumulator([2, 5], 8)
    xs, ys = {2: [], 5: []}, {2: [], 5: []}
    for _ in range(4):  # streamed in uneven chunks
        n = int(torch.randint(3, 9, (1,), generator=g))
        x = torch.randn(n, 8, generator=g, dtype=torch.float64)
        for layer in (2, 5):
            y = x @ torch.randn(8, 8, generator=g, dtype=torch.float64) * 0.1 + x
            acc.add(layer, x, y)
            xs[layer].append(x)
            ys[layer].append(y)
    rotations, report = acc.solve()
    for i, layer in enumerate((2, 5)):
        x, y = torch.cat(xs[layer]).numpy(), torch.cat(ys[layer]).numpy()
        r_ref, _ = orthogonal_procrustes(x, y)
        np.testing.assert_allclose(rotations[layer].numpy(), r_ref, atol=1e-10)
        before = np.linalg.norm(x - y) ** 2 / np.linalg.norm(y) ** 2
        after = np.linalg.norm(x @ r_ref - y) ** 2 / np.linalg.norm(y) ** 2
        assert report[i]["layer"] == layer and report[i]["tokens"] == len(x)
        assert report[i]["error_before"] == pytest.approx(before, rel=1e-9)
        assert report[i]["error_after"] == pytest.approx(after, rel=1e-9, abs=1e-12)
        assert report[i]["error_after"] <= report[i]["error_before"]
    # state round trip (what the all-reduce moves)
    other = ProcrustesAccumulator([2, 5], 8)
    other.load_state(acc.state() * 2)
    torch.testing.assert_close(other.xty, acc.xty * 2)
    assert other.count.tolist() == [2 * c for c in acc.count.tolist()]


def test_pinned_solution_for_standardised_tokens_is_unique_and_optimal():
    g = torch.Generator().manual_seed(1)
    x = standardize(torch.randn(300, 8, generator=g, dtype=torch.float64))[0]
    y = standardize(x @ torch.randn(8, 8, generator=g, dtype=torch.float64) + x)[0]
    m = x.T @ y
    r = solve_procrustes(pin_mean_direction(m))
    torch.testing.assert_close(
        r @ torch.ones(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64)
    )
    # the flipped solution fits exactly as well: the pin only removes the ambiguity
    flipped = r - 2 * torch.ones(8, 8, dtype=torch.float64) / 8
    assert orthogonality_error(flipped) < 1e-12
    torch.testing.assert_close((x @ r - y).norm(), (x @ flipped - y).norm())
    r_plain = torch.from_numpy(orthogonal_procrustes(x.numpy(), y.numpy())[0])
    torch.testing.assert_close((x @ r - y).norm(), (x @ r_plain - y).norm())
    # not zero-mean rows: left alone
    raw = torch.randn(8, 8, generator=g, dtype=torch.float64)
    assert torch.equal(pin_mean_direction(raw), raw)


def test_accumulator_errors():
    acc = ProcrustesAccumulator([1], 4)
    with pytest.raises(DiffalignError, match="feature size"):
        acc.add(1, torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(DiffalignError, match="no tokens"):
        acc.solve()
    assert np.isnan(alignment_error(0.0, 0.0, torch.zeros(2, 2)))


def rotation_set(d=8, targets=(2, 3, 5)) -> RotationSet:
    rots = {t: torch.from_numpy(ortho_group.rvs(d, random_state=t)).float() for t in targets}
    return RotationSet(0, list(targets), rots, d, 1234, "valid", {"model": "tiny", "seed": 7})


def test_rotation_file_round_trip_and_layout(tmp_path):
    from safetensors import safe_open

    rs = rotation_set()
    path = tmp_path / "rot.safetensors"
    save_rotations(path, rs)
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"rotation_matrices", "target_layers"}
        assert f.get_tensor("rotation_matrices").shape == (3, 8, 8)
        assert f.get_tensor("target_layers").dtype == torch.int64
        meta = f.metadata()
    assert json.loads(meta["target_layers"]) == [2, 3, 5]
    assert (meta["origin_layer"], meta["feature_dim"], meta["strategy"]) == ("0", "8", "row_ln")
    assert meta["token_strategy"] == "valid"
    assert meta["num_valid_tokens"] == "1234"
    back = load_rotations(path, feature_dim=8)
    assert (back.origin_layer, back.target_layers, back.feature_dim) == (0, [2, 3, 5], 8)
    assert (back.num_valid_tokens, back.token_strategy, back.strategy) == (1234, "valid", "row_ln")
    assert back.metadata["model"] == "tiny" and back.metadata["seed"] == 7
    for t in (2, 3, 5):
        assert torch.equal(back.rotations[t], rs.rotations[t])
    # a safetensors file under the seed's .pt name still loads (format sniffed, not suffix)
    pt_named = tmp_path / "procrustes_rotations.pt"
    save_rotations(pt_named, rs)
    assert load_rotations(pt_named).target_layers == [2, 3, 5]


def test_seed_pt_layout_is_read(tmp_path):
    rs = rotation_set()
    path = tmp_path / "seed.pt"
    torch.save(
        {
            "origin_layer": 0,
            "target_layers": [2, 3, 5],
            "rotation_matrices": torch.stack([rs.rotations[t] for t in (2, 3, 5)]),
            "feature_dim": 8,
            "num_valid_tokens": 99,
            "strategy": "all",
        },
        path,
    )
    back = load_rotations(path, feature_dim=8)
    assert back.target_layers == [2, 3, 5] and back.token_strategy == "all"
    assert torch.equal(back.rotations[5], rs.rotations[5])
    # one matrix per block (indexed by layer) is accepted too
    full = torch.stack([torch.eye(8)] * 6)
    for t in (2, 3, 5):
        full[t] = rs.rotations[t]
    torch.save(
        {
            "origin_layer": 0,
            "target_layers": torch.tensor([2, 3, 5]),
            "rotation_matrices": full,
            "feature_dim": 8,
            "num_valid_tokens": 1,
            "strategy": "all",
        },
        path,
    )
    assert torch.equal(load_rotations(path).rotations[3], rs.rotations[3])


@pytest.mark.parametrize(
    "identity", [{"dtype": "float32", "seed": 3}, "{not json", [1, 2], None], ids=str
)
def test_recorded_identity_read_with_the_rotations(tmp_path, identity):
    """`load_rotations` hands over the identity the file records, as `recorded_identity`
    reads it alone (a malformed or non-object value is none, and the file still loads); a
    `.pt` file records none."""
    from diffalign.textstream.calibrate import recorded_identity

    rs = rotation_set()
    if identity is not None:
        rs.metadata["identity"] = identity if isinstance(identity, str) else json.dumps(identity)
    path = tmp_path / "rot.safetensors"
    save_rotations(path, rs)
    back = load_rotations(path)
    assert back.recorded_identity == recorded_identity(path)
    assert back.recorded_identity == (identity if isinstance(identity, dict) else None)
    pt = tmp_path / "seed.pt"
    torch.save({**back.metadata, **_pt_keys(rs)}, pt)  # an "identity" key in a .pt: none
    assert load_rotations(pt).recorded_identity is None is recorded_identity(pt)


def _pt_keys(rs: RotationSet) -> dict:
    return {
        "origin_layer": rs.origin_layer,
        "target_layers": rs.target_layers,
        "rotation_matrices": torch.stack([rs.rotations[t] for t in rs.target_layers]),
        "feature_dim": rs.feature_dim,
        "num_valid_tokens": rs.num_valid_tokens,
        "strategy": "all",
    }


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_bad_rotation_files(tmp_path):
    rs = rotation_set()
    good = tmp_path / "good.safetensors"
    save_rotations(good, rs)
    with pytest.raises(DiffalignError, match="feature size 8.*16"):
        load_rotations(good, feature_dim=16)
    with pytest.raises(DiffalignError, match="not found"):
        load_rotations(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a tensor file at all")
    with pytest.raises(DiffalignError, match="cannot read"):
        load_rotations(junk)
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(DiffalignError):
        load_rotations(truncated)
    pickle_file = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, pickle_file)
    with pytest.raises(DiffalignError, match="weights_only"):
        load_rotations(pickle_file)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(DiffalignError, match="missing origin_layer"):
        load_rotations(other)

    def write(**override):
        raw = {
            "origin_layer": 0,
            "target_layers": [2, 3, 5],
            "rotation_matrices": torch.stack([rs.rotations[t] for t in (2, 3, 5)]),
            "feature_dim": 8,
            "num_valid_tokens": 1,
            "strategy": "all",
            **override,
        }
        p = tmp_path / "bad.pt"
        torch.save(raw, p)
        return p

    bad_orth = torch.stack([rs.rotations[t] for t in (2, 3, 5)])
    bad_orth[1] *= 1.01
    with pytest.raises(DiffalignError, match="layer 3.*not orthogonal"):
        load_rotations(write(rotation_matrices=bad_orth))
    with pytest.raises(DiffalignError, match="2 rotation matrices for 3"):
        load_rotations(write(rotation_matrices=bad_orth[:2]))
    with pytest.raises(DiffalignError, match="feature_dim"):
        load_rotations(write(feature_dim=9))
    with pytest.raises(DiffalignError, match=r"\[L, d, d\]"):
        load_rotations(write(rotation_matrices=torch.zeros(3, 8)))
    with pytest.raises(DiffalignError, match="malformed"):
        load_rotations(write(target_layers="two"))
    with pytest.raises(DiffalignError, match="duplicates"):
        load_rotations(write(target_layers=[2, 2, 5]))
    with pytest.raises(DiffalignError, match="NaN"):
        load_rotations(write(rotation_matrices=torch.full((3, 8, 8), float("nan"))))


def test_save_rotations_validates_and_is_atomic(tmp_path):
    path = tmp_path / "rot.safetensors"
    save_rotations(path, rotation_set())
    before = path.read_bytes()
    bad = rotation_set()
    bad.rotations[3] = bad.rotations[3] * 2
    with pytest.raises(DiffalignError, match="not orthogonal"):
        save_rotations(path, bad)
    missing = rotation_set()
    del missing.rotations[5]
    with pytest.raises(DiffalignError, match="no rotation"):
        save_rotations(path, missing)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rot.safetensors"]
    assert orthogonality_error(load_rotations(path).rotations[2]) < 1e-6
