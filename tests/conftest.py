"""Shared test set-up: fixture modules under tests/fixtures/ are loaded as pytest plugins."""
import os

# Tests run on the CPU with 8 simulated devices so sharding tests work in the same session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

pytest_plugins = [
    f"tests.fixtures.{name[:-3]}"
    for name in sorted(os.listdir(os.path.join(os.path.dirname(__file__), "fixtures")))
    if name.endswith(".py") and not name.startswith("_")
]
