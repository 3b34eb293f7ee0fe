"""ema_momentum: momentum gradient descent in its EMA form, as an Optax transform.

The whole public API::

    ema_momentum(beta, *, nesterov, nu, debias, accumulator_dtype, rounding, seed)
        -> optax.GradientTransformation   # v = beta*v + (1-beta)*g; update = v
    ema_sgd(learning_rate, beta, ...)
        -> optax.GradientTransformation   # chain(ema_momentum(...), scale_by_learning_rate)
    EmaMomentumState                      # (count, weight_sum, velocity)
"""

from ema_momentum._transform import EmaMomentumState, ema_momentum, ema_sgd

__version__ = "0.1.0"

__all__ = ["EmaMomentumState", "ema_momentum", "ema_sgd"]
