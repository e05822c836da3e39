"""Semantic cross-attention (spec F): identity at init, equal to the seed's explicit attention,
fused (no L x L matrix), stackable, checkpoints with a shape check."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffalign.engine.errors import DiffalignError
from diffalign.fill import SemanticCrossAttention, seed_reference_forward
from diffalign.fill.attention import load_semantic_module, save_semantic_module


def _tokens(b=2, n=48, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, d, generator=g), torch.randn(b, n, d, generator=g)


def test_init_is_exact_identity_and_shapes():
    torch.manual_seed(0)
    m = SemanticCrossAttention(dim=64, heads=8, layers=2)
    x, s = _tokens()
    y = m(x, s)
    assert y.shape == x.shape
    assert torch.equal(y, x)  # bit-identical: scale is exactly 0
    assert m.scales() == [0.0, 0.0]
    # The seed's count is for its own module; ours: 2 LayerNorms + 4 Linear(64, 64) + 1 scale.
    per_layer = 2 * 2 * 64 + 4 * (64 * 64 + 64) + 1
    assert m.num_parameters() == 2 * per_layer
    # The scale still receives a gradient at 0, so training can move it off the identity.
    y.sum().backward()
    assert all(layer.scale.grad is not None for layer in m.layers)
    assert m.layers[0].scale.grad.abs() > 0


@pytest.mark.parametrize("layers", [1, 3])
def test_equals_seed_explicit_attention_when_scale_nonzero(layers):
    torch.manual_seed(1)
    m = SemanticCrossAttention(dim=64, heads=8, layers=layers).double()
    with torch.no_grad():
        for i, layer in enumerate(m.layers):
            layer.scale.fill_(0.3 + 0.1 * i)
            layer.norm_x.weight.uniform_(0.5, 1.5)  # non-trivial LayerNorm affine too
            layer.norm_s.bias.uniform_(-0.5, 0.5)
    x, s = (t.double() for t in _tokens(n=40))
    ours = m(x, s)
    ref = seed_reference_forward(m, x, s)
    assert not torch.allclose(ours, x)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    assert m.scales() == pytest.approx([0.3 + 0.1 * i for i in range(layers)])
    # Gradients agree too.
    ga = torch.autograd.grad(ours.square().sum(), list(m.parameters()))
    gb = torch.autograd.grad(ref.square().sum(), list(m.parameters()))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_l_by_l_matrix_is_materialised():
    n, b, heads = 1024, 1, 8
    m = SemanticCrossAttention(dim=64, heads=heads, layers=1)
    with torch.no_grad():
        m.layers[0].scale.fill_(0.5)
    x, s = _tokens(b=b, n=n)
    with _LargestTensor() as spy:
        y = m(x, s)
        y.sum().backward()
    # Largest intermediate: tokens or weights, far below one head's L x L scores.
    assert spy.largest < n * n // 4, (spy.largest, sorted(spy.ops))
    assert any("scaled_dot_product" in op for op in spy.ops)
    # The seed's explicit form does build it (the spy can see it).
    with _LargestTensor() as spy_ref, torch.no_grad():
        seed_reference_forward(m, x, s)
    assert spy_ref.largest >= b * heads * n * n


def test_bad_shapes_and_config():
    with pytest.raises(DiffalignError, match="multiple of heads"):
        SemanticCrossAttention(dim=60, heads=8)
    with pytest.raises(DiffalignError, match="layers"):
        SemanticCrossAttention(dim=64, heads=8, layers=0)
    m = SemanticCrossAttention(dim=64, heads=8)
    with pytest.raises(DiffalignError, match="width 64"):
        m(torch.zeros(1, 4, 32), torch.zeros(1, 4, 32))
    with pytest.raises(DiffalignError, match="batch"):
        m(torch.zeros(2, 4, 64), torch.zeros(1, 4, 64))


def test_checkpoint_roundtrip_and_shape_mismatch(tmp_path):
    torch.manual_seed(2)
    m = SemanticCrossAttention(dim=64, heads=8, layers=2)
    with torch.no_grad():
        m.layers[1].scale.fill_(0.25)
    path = tmp_path / "semantic.safetensors"
    save_semantic_module(path, m)
    back = load_semantic_module(path, expect={"dim": 64})
    assert back.config() == m.config() and back.scales() == m.scales()
    x, s = _tokens()
    torch.testing.assert_close(back(x, s), m(x, s))
    with pytest.raises(DiffalignError, match="dim=64, this model needs 16"):
        load_semantic_module(path, expect={"dim": 16})
    other = tmp_path / "other.safetensors"
    from diffalign.engine.io import save_tensors

    save_tensors(other, {"w": torch.zeros(2)}, metadata={"dim": "64", "heads": "8", "layers": "1"})
    with pytest.raises(DiffalignError, match="do not match"):
        load_semantic_module(other)
    save_tensors(other, {"w": torch.zeros(2)})
    with pytest.raises(DiffalignError, match="not a semantic cross-attention checkpoint"):
        load_semantic_module(other)


def test_hostile_module_metadata_is_refused_before_allocating(tmp_path):
    """A file claiming a huge or impossible shape is one error, checked before any layer is built
    (building 10**7 layers would exhaust memory)."""
    from diffalign.engine.io import save_tensors
    from diffalign.fill.attention import semantic_tensor_shapes

    m = SemanticCrossAttention(dim=64, heads=8, layers=1)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == semantic_tensor_shapes(64, 1)
    path = tmp_path / "m.safetensors"
    tensors = m.state_dict()
    for meta, words in (
        ({"dim": "64", "heads": "8", "layers": "10000000"}, "do not match"),
        ({"dim": "64", "heads": "7", "layers": "1"}, "impossible"),
        ({"dim": "64", "heads": "8", "layers": "0"}, "impossible"),
        ({"dim": "64", "heads": "-8", "layers": "1"}, "impossible"),
    ):
        save_tensors(path, tensors, metadata=meta)
        with pytest.raises(DiffalignError, match=words):
            load_semantic_module(path)
    bad = dict(tensors)
    bad["layers.0.scale"] = torch.zeros(3)
    save_tensors(path, bad, metadata={"dim": "64", "heads": "8", "layers": "1"})
    with pytest.raises(DiffalignError, match="layers.0.scale"):
        load_semantic_module(path)
