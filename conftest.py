"""Test-session setup shared by tests/ and the doctests in ema_momentum/ and experiments/.

Eight simulated CPU devices let CI exercise sharding and data parallelism on
one machine. XLA reads the flag once, when jax initializes its backends, so it
is set here, before anything imports jax.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

try:
    import hypothesis
except ImportError:  # the doctests run without the dev extra too
    pass
else:
    # Property tests draw the same examples on every run and machine (and keep no example
    # database between runs), so the suite's result does not depend on when it runs.
    hypothesis.settings.register_profile("deterministic", derandomize=True, database=None)
    hypothesis.settings.load_profile("deterministic")
