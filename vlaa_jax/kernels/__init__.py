"""Accelerator-specific kernels behind the model's `attention_impl` switch (`vlaa_jax.nn`).

splash_attention.py   Pallas splash (block-sparse flash) attention for TPU, from
                      `jax.experimental.pallas.ops.tpu.splash_attention`.
"""
