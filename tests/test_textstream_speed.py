"""Text-stream residual speed options (issue 18): the rotation GEMM in the model's half
precision, one batched GEMM for all targets, and the compiled standardise-mix-rescale give the
reference result (fp32 models bit for bit where the arithmetic is the same; half precision:
below the model's own bf16 rounding; compiled: float rounding)."""

from __future__ import annotations

import copy

import pytest
import torch

from diffalign.engine.errors import DiffalignError
from diffalign.textstream import TextStreamResidual
from diffalign.textstream.residual import (
    compiled_mix_rescale,
    gemm_dtype,
    mix_rescale,
    rotate,
    rotate_all,
    stack_rotations,
)
from test_textstream_residual import make_inputs, make_transformer, random_orthogonal, run

TARGETS = [1, 2, 3]


def _residual(**kw) -> TextStreamResidual:
    rotations = {t: random_orthogonal(32, 10 + t) for t in TARGETS}
    return TextStreamResidual(0, TARGETS, [0.6], mode="ln", rotations=rotations, **kw)


def _forward(tr, inputs, res) -> torch.Tensor:
    with torch.no_grad(), res.attach(tr):
        return run(tr, inputs)


def test_gemm_dtype_and_batched_rotation_are_the_per_target_products():
    assert gemm_dtype(torch.float32, "model") == torch.float32
    assert gemm_dtype(torch.bfloat16, "model") == torch.bfloat16
    assert gemm_dtype(torch.bfloat16, "fp32") == torch.float32
    assert gemm_dtype(torch.float64, "model") == torch.float64
    with pytest.raises(DiffalignError, match="rotation precision"):
        gemm_dtype(torch.float32, "tf16")
    with pytest.raises(DiffalignError, match="rotation precision"):
        _residual(rotation_precision="half")
    g = torch.Generator().manual_seed(0)
    o = torch.randn(2, 5, 32, generator=g)
    rots = [random_orthogonal(32, s) for s in range(3)]
    each = [rotate(o, r, torch.float32) for r in rots]
    for a, b in zip(rotate_all(o, stack_rotations(rots), torch.float32), each):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(each[0], (o.double() @ rots[0].double()).float())


@pytest.mark.parametrize("kind", ["sd3", "sd35"])
def test_fp32_model_is_unchanged_and_batched_is_fp32_rounding(kind):
    tr = make_transformer(kind)
    inputs = make_inputs(batch=2)
    ref = _forward(tr, inputs, _residual())
    assert torch.equal(_forward(tr, inputs, _residual(rotation_precision="model")), ref)
    batched = _forward(tr, inputs, _residual(batched_rotation=True, rotation_precision="model"))
    torch.testing.assert_close(batched, ref, rtol=1e-5, atol=1e-6)
    assert _residual(batched_rotation=True).settings()["batched_rotation"] is True
    assert "rotation_precision" not in _residual().settings()


@pytest.mark.parametrize("batched", [False, True], ids=["per-target", "batched"])
def test_bf16_rotation_gemm_error_is_below_the_models_bf16_rounding(batched):
    tr16 = make_transformer("sd3").to(torch.bfloat16)
    tr32 = copy.deepcopy(tr16).float()  # the same (bf16-representable) weights in float32
    inputs32 = make_inputs(batch=2)
    inputs16 = {k: v.to(torch.bfloat16) for k, v in inputs32.items()}
    exact = _forward(tr32, inputs32, _residual())  # no bf16 rounding anywhere
    ref = _forward(tr16, inputs16, _residual()).float()  # bf16 model, fp32 rotation GEMM
    fast = _forward(
        tr16, inputs16, _residual(rotation_precision="model", batched_rotation=batched)
    ).float()
    assert not torch.equal(fast, ref)  # the GEMM really ran in bf16
    rounding = (ref - exact).norm()  # what running the model in bf16 already costs
    assert (fast - ref).norm() <= rounding
    assert (fast - exact).norm() <= 2 * rounding


def test_compiled_mix_rescale_equals_eager():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 7, 32, generator=g) * 3 + 1
    o = torch.randn(2, 7, 32, generator=g)
    fn = compiled_mix_rescale()
    assert compiled_mix_rescale() is fn  # built once per process
    torch.testing.assert_close(
        fn(t, o, 0.7, False, 1e-6), mix_rescale(t, o, 0.7, False, 1e-6), rtol=1e-5, atol=1e-5
    )
    tb = t.to(torch.bfloat16)
    eager, compiled = mix_rescale(tb, o, 0.7, False, 1e-6), fn(tb, o, 0.7, False, 1e-6)
    assert compiled.dtype == torch.bfloat16
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=2**-7, atol=2**-7)


@pytest.mark.slow
@pytest.mark.inductor
def test_compiled_residual_forward_equals_eager():
    """Attached with compile=True (LayerNorm on): the eager forward to float rounding."""
    tr = make_transformer("sd3")
    inputs = make_inputs(batch=2)
    torch.testing.assert_close(
        _forward(tr, inputs, _residual(compile=True, layernorm=True)),
        _forward(tr, inputs, _residual(layernorm=True)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_bucketed_rotations_keep_the_per_target_path_under_batched_rotation():
    """With timestep buckets each row may take another rotation: `batched_rotation` falls back to
    the per-target GEMMs (the same result bit for bit); tensor weights too."""
    from diffalign.textstream.rotations import equal_bucket_edges

    tr = make_transformer("sd3")
    inputs = make_inputs(batch=2)
    rots = {
        t: torch.stack([random_orthogonal(32, 10 + t), random_orthogonal(32, 20 + t)])
        for t in TARGETS
    }

    def res(**kw):
        return TextStreamResidual(
            0, TARGETS, torch.tensor([0.6, 0.4, 0.2]), mode="ln", rotations=rots,
            timestep_bucket_edges=equal_bucket_edges(2), **kw,
        )  # fmt: skip

    ref = _forward(tr, inputs, res())
    assert torch.equal(_forward(tr, inputs, res(batched_rotation=True)), ref)
    assert torch.equal(_forward(tr, inputs, res(rotation_precision="model")), ref)


@pytest.mark.parametrize("batched", [False, True], ids=["per-target", "batched"])
def test_rotations_reach_the_device_once_for_every_attach(batched, monkeypatch):
    """A residual attached again (each pipeline call; each timed forward of bench/textstream.py)
    reuses its device copies of the rotations, already in the GEMM's dtype: no per-attach
    upload of every target's [d, d] matrix (a host-to-device copy on a GPU), no per-forward
    cast; the output is unchanged."""
    import diffalign.textstream.attach as attach_mod

    tr = make_transformer("sd3").to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) for k, v in make_inputs(batch=2).items()}
    res = _residual(rotation_precision="model", batched_rotation=batched)
    first = _forward(tr, inputs, res)
    seen, stacks = [], []
    real_rotate, real_all = attach_mod.rotate, attach_mod.rotate_all
    real_stack = attach_mod.stack_rotations

    def rotate(o, rotation, dtype):
        seen.append(rotation)
        return real_rotate(o, rotation, dtype)

    def rotate_all(o, stacked, dtype):
        seen.append(stacked)
        return real_all(o, stacked, dtype)

    def stack(rots):
        stacks.append(len(rots))
        return real_stack(rots)

    monkeypatch.setattr(attach_mod, "rotate", rotate)
    monkeypatch.setattr(attach_mod, "rotate_all", rotate_all)
    monkeypatch.setattr(attach_mod, "stack_rotations", stack)
    for _ in range(2):
        assert torch.equal(_forward(tr, inputs, res), first)
    assert stacks == [] and len(seen) == 2 * (1 if batched else len(TARGETS))
    assert all(r.dtype == torch.bfloat16 for r in seen)  # cast once, not in every forward
    half = len(seen) // 2
    assert [r.data_ptr() for r in seen[:half]] == [r.data_ptr() for r in seen[half:]]


def test_bucket_lookup_reads_the_timestep_once_per_forward(monkeypatch):
    """With timestep buckets the bucket is read on the host once per transformer forward (one
    host sync for a device timestep, not one per target), and each target's rotation is a view
    of its device copy, not a per-forward gather (`AttachedResidual._buckets`)."""
    import diffalign.textstream.attach as attach_mod
    from diffalign.textstream.adapters import StreamAdapter
    from diffalign.textstream.rotations import equal_bucket_edges

    tr = make_transformer("sd3")
    inputs = {**make_inputs(batch=2), "timestep": torch.tensor(700.0).expand(2)}  # a pipeline's
    rots = {t: torch.stack([random_orthogonal(32, 10 + t), random_orthogonal(32, 20 + t)])
            for t in TARGETS}  # fmt: skip
    res = TextStreamResidual(
        0, TARGETS, [0.6], mode="ln", rotations=rots, timestep_bucket_edges=equal_bucket_edges(2)
    )
    first = _forward(tr, inputs, res)
    calls, seen = [], []
    real_bucket, real_rotate = StreamAdapter.timestep_bucket, attach_mod.rotate

    def bucket(self, timestep, edges):
        calls.append(1)
        return real_bucket(self, timestep, edges)

    def rotate(o, rotation, dtype):
        seen.append(rotation)
        return real_rotate(o, rotation, dtype)

    monkeypatch.setattr(StreamAdapter, "timestep_bucket", bucket)
    monkeypatch.setattr(attach_mod, "rotate", rotate)
    for _ in range(2):
        assert torch.equal(_forward(tr, inputs, res), first)
    assert len(calls) == 2 and len(seen) == 2 * len(TARGETS)
    half = len(seen) // 2
    assert [r.data_ptr() for r in seen[:half]] == [r.data_ptr() for r in seen[half:]]
