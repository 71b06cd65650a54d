"""Config files for `python -m vlaa_jax.main --config configs/<file>.py:<preset>` (big_vision style)."""
