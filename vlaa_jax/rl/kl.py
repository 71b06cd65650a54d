"""KL to the reference policy: per-token estimators and the coefficient controllers.

Estimators follow Schulman's "Approximating KL divergence" note as used by OpenRLHF / verl, with
samples drawn from the current policy pi and log r = log pi_ref - log pi:
  k1 = log pi - log pi_ref                       (unbiased, high variance, can be negative)
  k2 = 0.5 * (log pi - log pi_ref)^2             (biased, low variance, always >= 0)
  k3 = exp(log r) - log r - 1  ("low_var_kl")    (unbiased for KL(pi||pi_ref), always >= 0)
k3 clamps log r to [-20, 20] before the exp and the result to [-10, 10], as verl's low_var_kl does,
so a token the reference finds near impossible cannot blow the loss up.

The controllers are small registered-dataclass pytrees: `update` is pure (returns a new controller),
works on Python floats, NumPy or traced JAX scalars, and the fields can be checkpointed as they are.
"""
from __future__ import annotations

import dataclasses
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = Union[jax.Array, np.ndarray, float]

KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")
_K3_LOG_RATIO_CLAMP = 20.0
_K3_VALUE_CLAMP = 10.0


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, estimator: str = "k3") -> jax.Array:
    """Per-token KL estimate between the current policy (logp) and the reference (ref_logp)."""
    logp = jnp.asarray(logp)
    ref_logp = jnp.asarray(ref_logp)
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k2":
        return 0.5 * jnp.square(logp - ref_logp)
    if estimator in ("k3", "low_var_kl"):
        log_r = jnp.clip(ref_logp - logp, -_K3_LOG_RATIO_CLAMP, _K3_LOG_RATIO_CLAMP)
        return jnp.clip(jnp.exp(log_r) - log_r - 1.0, -_K3_VALUE_CLAMP, _K3_VALUE_CLAMP)
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FixedKLController:
    """Constant KL coefficient (beta); `update` is the identity so trainers treat both kinds alike."""

    value: ArrayLike

    def update(self, current_kl: ArrayLike, n_steps: ArrayLike) -> "FixedKLController":
        del current_kl, n_steps
        return self


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdaptiveKLController:
    """OpenRLHF's / Ziegler et al.'s adaptive KL coefficient (the paper: init 1e-3, target 5e-4).

    value <- value * (1 + clip(current_kl / target - 1, -0.2, 0.2) * n_steps / horizon),
    where n_steps is the number of samples the KL was measured on (OpenRLHF passes
    rollout_batch_size * n_samples_per_prompt) and horizon is in the same unit (OpenRLHF default 10000).
    """

    value: ArrayLike
    target: ArrayLike
    horizon: ArrayLike

    def update(self, current_kl: ArrayLike, n_steps: ArrayLike) -> "AdaptiveKLController":
        xp = jnp if any(isinstance(x, jax.Array) for x in (self.value, current_kl, n_steps)) else np
        proportional_error = xp.clip(current_kl / self.target - 1.0, -0.2, 0.2)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        return dataclasses.replace(self, value=self.value * mult)


KLController = Union[FixedKLController, AdaptiveKLController]


def make_kl_controller(kind: str, init_kl_coef: float, target: float | None = None,
                       horizon: float = 10000.0) -> KLController:
    """Builds a controller from config values: kind is "fixed" or "adaptive" (needs target)."""
    if kind == "fixed":
        return FixedKLController(value=float(init_kl_coef))
    if kind == "adaptive":
        if target is None or target <= 0:
            raise ValueError(f"adaptive KL controller needs kl_target > 0, got {target!r}")
        if horizon <= 0:
            raise ValueError(f"adaptive KL controller needs kl_horizon > 0, got {horizon!r}")
        return AdaptiveKLController(value=float(init_kl_coef), target=float(target),
                                    horizon=float(horizon))
    raise ValueError(f"kl controller kind must be 'fixed' or 'adaptive', got {kind!r}")
