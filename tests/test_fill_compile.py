"""`fill train --compile` (issue 18): the transformer's blocks (peft LoRA layers inside) and the
semantic module compiled by inductor on the CPU give the eager run's losses (to fp32 rounding in
float32, to bf16 rounding under bf16 autocast on a bfloat16 base), write the eager run's
checkpoint keys (no `_orig_mod.`), and a compiled run stopped after its checkpoint resumes to the
uninterrupted compiled run's weights exactly. The runs use the shipped config's switches
(configs/fill_semantic.yaml: gradient checkpointing, accumulation, text cache, validation) and
LoRA dropout (random masks inside the compiled blocks)."""

from __future__ import annotations

import pytest
import torch

from fill_helpers import tiny_train_args, write_triptychs

EXPORTS = ("pytorch_lora_weights.safetensors", "semantic_module.safetensors")
SHIPPED = dict(
    gradient_checkpointing="true", gradient_accumulation_steps=2, cache_text="true", ema_decay=0.9
)


def _run(args) -> int:
    from diffalign.cli import main

    torch._dynamo.reset()  # each run compiles as a fresh process would (the disk cache stays)
    return main(args)


def _losses(run, step: int, key: str = "loss") -> list[tuple[int, float]]:
    """(step, value) of the training (`loss`) or validation (`val/loss`) entries."""
    from diffalign.engine.io import read_json

    hist = read_json(run / "checkpoints" / f"checkpoint-{step}" / "state.json")["history"]
    return [(e["step"], e[key]) for e in hist if key in e]


def _values(run, key: str = "loss", step: int = 4) -> torch.Tensor:
    """The logged values of `key` up to checkpoint `step`, as a float32 tensor."""
    return torch.tensor([v for _, v in _losses(run, step, key)], dtype=torch.float32)


def _keys(folder) -> dict[str, set[str]]:
    from diffalign.engine.io import load_tensors

    return {f.name: set(load_tensors(f)[0]) for f in sorted(folder.glob("*.safetensors"))}


@pytest.fixture
def compiled_modules(monkeypatch):
    """Records (module class, how) of every `compile_module` call of the training loop, and
    clears dynamo's counters (graphs made, graph breaks)."""
    import diffalign.engine.compile as loop  # speed_up_modules: the loop's compile step

    seen: list[tuple[str, str]] = []
    original = loop.compile_module

    def spy(module, *a, **kw):
        seen.append((type(module).__name__, original(module, *a, **kw)))
        return seen[-1][1]

    monkeypatch.setattr(loop, "compile_module", spy)
    torch._dynamo.utils.counters.clear()
    return seen


def _check_compiled(seen: list[tuple[str, str]]) -> None:
    """Regional for the transformer (its FLUX blocks), whole for the semantic module; every
    block, LoRA layers and attention processor included, traced without a graph break."""
    counters = torch._dynamo.utils.counters
    assert seen == [("FluxTransformer2DModel", "regional"), ("SemanticCrossAttention", "whole")]
    assert counters["stats"]["unique_graphs"] >= 3 and not counters["graph_break"]


@pytest.mark.inductor
def test_compiled_fill_training_equals_eager_and_resumes_exactly(
    tiny_model_dir, tmp_path, monkeypatch, compiled_modules
):
    from diffalign.engine.io import load_tensors
    from diffalign.fill.train import FillTrainTask

    flux = tiny_model_dir("flux-fill")
    data = write_triptychs(tmp_path / "trip", n=3)
    eager, compiled, split = tmp_path / "eager", tmp_path / "compiled", tmp_path / "split"

    def args(out, **kw):
        # LoRA dropout inside the compiled blocks: the eager run's masks (`eager_random`)
        opts = dict(max_steps=4, checkpoint_every=2, validate_every=2, lora_dropout=0.1)
        opts.update(SHIPPED)
        return tiny_train_args(flux, data, out, **opts, **kw)

    assert _run(args(compiled, compile="true")) == 0
    _check_compiled(compiled_modules)
    assert _run(args(eager)) == 0

    assert [s for s, _ in _losses(compiled, 4)] == [1, 2, 3, 4]
    assert [s for s, _ in _losses(compiled, 4, "val/loss")] == [2, 4]
    for key in ("loss", "val/loss"):  # fp32 rounding: float32 tensors' default tolerance
        torch.testing.assert_close(_values(compiled, key), _values(eager, key))
    for folder in ("checkpoints/checkpoint-2", "checkpoint-final"):
        keys = _keys(compiled / folder)
        assert keys == _keys(eager / folder)
        assert not any("_orig_mod" in k for names in keys.values() for k in names)
    assert {"transformer.safetensors", "semantic.safetensors", "ema.safetensors"} <= set(
        _keys(compiled / "checkpoints" / "checkpoint-2")
    )
    # LoRA moves up to ~lr (1e-3) per step; compiled and eager agree far below that
    a, _ = load_tensors(eager / "checkpoint-final" / EXPORTS[0])
    b, _ = load_tensors(compiled / "checkpoint-final" / EXPORTS[0])
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)

    # compiled, killed in its 4th step after checkpoint-2, resumed compiled: bit-identical
    original_step = FillTrainTask.training_step

    def killed(self, batch, step, ctx):
        if step == 3:
            raise KeyboardInterrupt
        return original_step(self, batch, step, ctx)

    monkeypatch.setattr(FillTrainTask, "training_step", killed)
    assert _run(args(split, compile="true")) == 130
    assert not (split / "checkpoint-final").exists()
    monkeypatch.setattr(FillTrainTask, "training_step", original_step)
    assert _run(args(split, compile="true", resume="latest")) == 0
    for key in ("loss", "val/loss"):
        assert _losses(split, 4, key) == _losses(compiled, 4, key)
    for name in EXPORTS:
        a, _ = load_tensors(compiled / "checkpoint-final" / name)
        b, _ = load_tensors(split / "checkpoint-final" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.inductor
def test_compiled_bf16_fill_training_equals_eager_to_bf16_rounding(
    tiny_model_dir, tmp_path, compiled_modules
):
    """The shipped precision (bfloat16 base, bf16 autocast, float32 LoRA and module)."""
    flux = tiny_model_dir("flux-fill")
    data = write_triptychs(tmp_path / "trip", n=3)
    opts = dict(max_steps=2, checkpoint_every=2, base_dtype="bfloat16", mixed_precision="bf16")
    opts.update(SHIPPED, num_validation=0)
    assert _run(tiny_train_args(flux, data, tmp_path / "c", compile="true", **opts)) == 0
    _check_compiled(compiled_modules)
    assert _run(tiny_train_args(flux, data, tmp_path / "e", **opts)) == 0
    assert [s for s, _ in _losses(tmp_path / "c", 2)] == [1, 2]
    # within one bf16 rounding step (2^-8 relative): the compiled kernels round differently
    compiled, eager = _values(tmp_path / "c", step=2), _values(tmp_path / "e", step=2)
    torch.testing.assert_close(compiled, eager, rtol=2**-8, atol=0.0)
