"""The run around a trainer's loop: set-up, resume, non-finite policy, checkpoints, export, summary.

`Run` holds what every trainer needs between steps (mesh, tokenizer, model graph and state,
optimiser, PRNG key, checkpointer) so that sft.py and grpo.py contain only their own algorithm.
Exact resume: the checkpoint holds params, optimiser state, PRNG key data, the skipped-update
counter (arrays), the trainer's JSON metadata (GRPO: its KL controller's coefficient, float64 as the
controller computes it: a float32 copy would change the next controller update in the last bits) and
the data-iterator state of step s; a resumed run restores all of them and continues with step s + 1, so 3 + 3 steps give bitwise the parameters and data order of 6 steps.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from data_pipeline.chat import load_tokenizer
from vlaa_jax.train import common
from vlaa_jax.train.checkpointer import TrainCheckpointer
from vlaa_jax.train.metrics import MetricsWriter
from vlaa_jax.train import step as step_lib


class NonFiniteError(RuntimeError):
    """Raised with train.nonfinite_policy == 'stop' when a loss or gradient is NaN / inf."""


@dataclasses.dataclass
class Run:
    config: ml_collections.ConfigDict
    workdir: str
    mesh: Any
    rules: Any
    tokenizer_dir: str
    tokenizer: Any
    mcfg: Any
    graphdef: Any
    params: Any
    rest: Any
    tx: Any = None
    schedule: Any = None
    opt_state: Any = None
    rng: Any = None
    skipped: int = 0
    checkpointer: TrainCheckpointer | None = None

    # ------------------------------------------------------------------------------------- set-up
    @classmethod
    def setup(cls, config: ml_collections.ConfigDict, workdir: str) -> "Run":
        """Mesh, tokenizer and model (random tiny init or config.model.path)."""
        os.makedirs(workdir, exist_ok=True)
        mesh, rules = common.run_mesh(config)
        tokenizer_dir = common.prepare_tokenizer(config, workdir)
        tokenizer = load_tokenizer(tokenizer_dir)
        mcfg = common.model_config(config, tokenizer)
        graphdef, params, rest = common.create_model(config, mcfg, mesh, rules)
        return cls(config=config, workdir=os.path.abspath(workdir), mesh=mesh, rules=rules,
                   tokenizer_dir=tokenizer_dir, tokenizer=tokenizer, mcfg=mcfg, graphdef=graphdef,
                   params=params, rest=rest, rng=jax.random.key(config.seed))

    def init_training(self, *, total_updates: int) -> None:
        self.tx, self.schedule = common.run_optimizer(self.config, self.params, total_updates)
        self.opt_state = step_lib.init_optimizer(self.tx, self.params, self.mesh, self.rules)
        t = self.config.train
        self.checkpointer = TrainCheckpointer(self.workdir, every=t.checkpoint_every, keep=t.keep_checkpoints)

    def loader(self, split: str, *, batch_size: int, mode: str, **kw):
        loader = common.run_loader(self.config, self.workdir, split, self.tokenizer_dir, self.mcfg,
                                   batch_size=batch_size, **kw)
        if loader.mode != mode:
            raise ValueError(f"config data split {split!r} gives {loader.mode!r} examples, {mode!r} needed")
        return loader

    def model(self, params: Any, rest: Any) -> Any:
        """The module view of (params, rest), for use inside jitted functions."""
        return nnx.merge(self.graphdef, params, rest)

    def writer(self, total: int, start: int, *, key_metrics: Sequence[str], description: str
               ) -> MetricsWriter:
        return MetricsWriter(self.workdir, total_steps=total, initial_step=start, key_metrics=key_metrics,
                             progress_bar=self.config.train.progress_bar, description=description)

    # ------------------------------------------------------------------------------- checkpoints
    def _state(self) -> dict[str, Any]:
        return {"params": self.params, "opt_state": self.opt_state, "rng": common.rng_data(self.rng),
                "skipped": jnp.asarray(self.skipped, jnp.int32)}

    def restore(self, loader: Any | None) -> tuple[int, dict[str, Any]]:
        """Restores the newest checkpoint of the workdir that restores cleanly, if there is one; returns its
        step (else 0) and the JSON metadata the trainer saved with it (`maybe_save(meta=...)`).

        The checkpoint's mode and state tree are checked against this run before any array is read
        (another run's workdir stops here); damaged newer steps are skipped, one line each, and moved to
        `damaged_checkpoints/` (`TrainCheckpointer.restore_newest`)."""
        restored = self.checkpointer.restore_newest(
            self._state(), expect_meta={"mode": self.config.mode},
            is_sound=lambda state: bool(common.tree_all_finite(state["params"])))
        if restored is None:
            return 0, {}
        for bad, why, moved in restored.skipped:
            self.message(f"checkpoint step {bad} in {self.checkpointer.directory} is damaged: {why}; skipped, "
                         f"kept in {moved}")
        step, state, data_state, meta = restored.step, restored.state, restored.data_state, restored.meta
        self.params, self.opt_state = state["params"], state["opt_state"]
        self.rng = common.rng_key(state["rng"])
        self.skipped = int(state["skipped"])
        if loader is not None:
            if data_state is None:
                raise ValueError(f"checkpoint of step {step} holds no data-iterator state")
            loader.set_state(data_state)
        self.message(f"resumed from {self.checkpointer.directory} at step {step}")
        return step, meta

    def maybe_save(self, step: int, *, last: bool, data_state: Any, meta: dict[str, Any] | None = None) -> None:
        """meta: the trainer's own JSON state (e.g. the KL coefficient), returned by `restore`."""
        if not self.checkpointer.should_save(step, last=last):
            return
        if not bool(common.tree_all_finite(self.params)):
            raise NonFiniteError(f"step {step}: parameters hold NaN/inf; refusing to checkpoint them "
                                 f"(latest good checkpoint: step {self.checkpointer.latest_step()})")
        self.checkpointer.save(step, self._state(), data_state=data_state,
                               meta={"mode": self.config.mode, "preset": self.config.get("preset", ""),
                                     **(meta or {})})

    def finish_saves(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()

    # ----------------------------------------------------------------------------- non-finite
    def check_finite(self, step: int, metrics: dict[str, Any], keys: Sequence[str] = ("loss", "grad_norm")
                     ) -> bool:
        """True when the step's loss and gradient norm are finite. Otherwise the update was not
        applied (optim.skip_nonfinite inside the step) and, per train.nonfinite_policy, the step is
        counted as skipped or the run stops (no checkpoint is written for it)."""
        bad = [k for k in keys if k in metrics and not np.isfinite(np.asarray(metrics[k])).all()]
        if not bad:
            return True
        values = {k: float(np.asarray(metrics[k])) for k in bad}
        if self.config.train.nonfinite_policy == "stop":
            raise NonFiniteError(
                f"step {step}: non-finite {values}; stopping (train.nonfinite_policy='stop'). Parameters were "
                f"not updated; latest checkpoint: step {self.checkpointer.latest_step()}")
        self.skipped += 1
        self.message(f"step {step}: non-finite {values}; update skipped (train.nonfinite_policy='skip', "
                     f"{self.skipped} skipped so far)")
        return False

    # ------------------------------------------------------------------------------------ output
    def export(self, *, hf: bool = True) -> dict[str, str]:
        d = self.config.data
        return common.export_model(self.workdir, self.params, self.mcfg, self.tokenizer_dir, hf=hf,
                                   pixels=(d.min_pixels, d.max_pixels), system_prompt=d.system_prompt)

    def message(self, text: str) -> None:
        if jax.process_index() == 0:
            print(text, file=sys.stderr, flush=True)

    def print_summary(self, lines: Sequence[str]) -> None:
        if jax.process_index() == 0:
            print("\n".join(lines), flush=True)
