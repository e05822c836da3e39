"""The shared training loop on accelerate (spec E: Training loop).

CONTRACT (other modules are written against these names; the implementation fills them in):

    from diffalign.engine.train import TrainConfig, OptimizerSpec, TrainTask, StepContext, train

    class MyTask(TrainTask):
        def trainable(self) -> dict[str, nn.Module]: ...        # saved in checkpoints, EMA'd
        def frozen(self) -> dict[str, nn.Module]: ...           # optional: moved to device, not saved
        def optimizers(self) -> dict[str, OptimizerSpec]: ...   # name -> spec ("main" by default)
        def train_dataloader(self) -> DataLoader: ...           # prepared (sharded) by accelerate
        def training_step(self, batch, step: int, ctx: StepContext) -> dict[str, Tensor | float]:
            # Simple case: return {"loss": tensor, ...}; the loop does backward/clip/step on the
            # single optimizer. Several optimizers (a GAN): call ctx.backward(loss, "d") yourself
            # for each, in the order you want, and return the logged values; the loop then
            # does nothing more for that step.
        def val_dataloader(self) -> DataLoader | None: ...      # optional
        def validation_step(self, batch) -> dict[str, float]: ...  # runs with EMA weights
        def on_validation_end(self, step: int, out_dir: Path) -> None: ...  # e.g. sample grids

    result = train(MyTask(...), TrainConfig(output_dir=..., max_steps=...))
    # result.history: list of per-log dicts; result.final_dir; result.best_dir

Checkpoint folder layout (`checkpoint-<step>/`, atomic): `<module>.safetensors` per trainable
module, `ema.safetensors`, `optimizer-<name>.pt` / `scheduler-<name>.pt` (state dicts saved with
torch.save and read back with weights_only=True), `rng.pt`, `state.json` (step, config, history).
"""

from __future__ import annotations
