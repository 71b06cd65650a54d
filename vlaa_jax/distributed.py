"""Multi-process start-up (`jax.distributed.initialize`) and process-0-only logging.

Where the settings come from, first match wins:
  1. explicit arguments / config (`distributed.coordinator_address`, `num_processes`, `process_id`,
     `local_device_ids`);
  2. environment: VLAA_COORDINATOR_ADDRESS, VLAA_NUM_PROCESSES, VLAA_PROCESS_ID (set by
     tools/launch_slurm.sh, or by hand);
  3. auto-detection: on a multi-host TPU slice (TPU_WORKER_HOSTNAMES lists several workers) or in a
     SLURM job with several tasks, `jax.distributed.initialize()` finds everything itself;
  4. otherwise: a single process, nothing to do.
Call `initialize` before anything touches a device (before `jax.devices()`).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import jax

_ENV = {"coordinator_address": "VLAA_COORDINATOR_ADDRESS", "num_processes": "VLAA_NUM_PROCESSES",
        "process_id": "VLAA_PROCESS_ID"}


def _get(config: Any, key: str) -> Any:
    if config is None:
        return None
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


def detect_cluster(env: Mapping[str, str] | None = None) -> str | None:
    """'tpu' or 'slurm' when running as one of several hosts that JAX can discover itself."""
    env = os.environ if env is None else env
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts) > 1:
        return "tpu"
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1"))) > 1:
        return "slurm"
    return None


def resolve_settings(config: Any = None, env: Mapping[str, str] | None = None,
                     **overrides: Any) -> dict[str, Any] | None:
    """The keyword arguments for `jax.distributed.initialize`, or None for a single process.

    `{}` means "let JAX auto-detect" (TPU pod / SLURM).
    """
    env = os.environ if env is None else env
    sub = _get(config, "distributed")
    sub = config if sub is None else sub
    settings: dict[str, Any] = {}
    for key, var in _ENV.items():
        value = overrides.get(key)
        if value is None:
            value = _get(sub, key)
        if value in (None, "") and env.get(var):
            value = env[var]
        if value not in (None, ""):
            settings[key] = value
    local = overrides.get("local_device_ids") or _get(sub, "local_device_ids")
    if local:
        settings["local_device_ids"] = [int(i) for i in local]
    if "num_processes" in settings:
        settings["num_processes"] = int(settings["num_processes"])
    if "process_id" in settings:
        settings["process_id"] = int(settings["process_id"])
    if settings:
        missing = [k for k in _ENV if k not in settings]
        if missing and detect_cluster(env) is None:
            raise ValueError(
                f"distributed: got {sorted(settings)} but not {missing}; set all of coordinator_address, "
                f"num_processes, process_id (config `distributed.*` or env {', '.join(_ENV.values())})")
        if settings.get("num_processes") == 1:
            return None
        return settings
    return {} if detect_cluster(env) else None


def initialize(config: Any = None, *, cpu_collectives: str = "gloo", **overrides: Any) -> bool:
    """Starts multi-process JAX when settings say so; returns True when it did.

    On CPU hosts the cross-process collectives need an implementation: gloo by default.
    """
    settings = resolve_settings(config, **overrides)
    if settings is None:
        return False
    if jax.distributed.is_initialized():
        return True
    platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
    if platforms.startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(**settings)
    main_log(f"jax.distributed: process {jax.process_index()}/{jax.process_count()}, "
             f"{jax.local_device_count()} local / {jax.device_count()} global devices")
    return True


def is_main_process() -> bool:
    """True on process 0, the only one that writes logs, metrics and checkpoints metadata."""
    return jax.process_index() == 0


_LOGGER = logging.getLogger("vlaa_jax")


def main_log(message: str, *args: Any, level: int = logging.INFO) -> None:
    """`logging` on process 0 only (other processes stay silent)."""
    if is_main_process():
        _LOGGER.log(level, message, *args)


def process_batch_slice(global_batch_size: int) -> slice:
    """Rows of the global batch this process loads (equal contiguous shares, in process order)."""
    n, i = jax.process_count(), jax.process_index()
    if global_batch_size % n:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the {n} processes")
    per = global_batch_size // n
    return slice(i * per, (i + 1) * per)
