import os

# Tests run on the CPU in float32 matmul precision; several tests need 8 emulated devices. The flag
# must be set before JAX initialises its backends, so here, before anything imports jax.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
