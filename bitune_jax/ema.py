"""Momentum (EMA) update of a key encoder, through optax.

`key <- m * key + (1 - m) * query` (MoCo; Bi-tuning Eq. 6), applied to parameters only:
a key encoder keeps its own BatchNorm statistics. The key encoder starts as a copy of
the query encoder (`optax.ema` would start at zero and debias, which is not a target
network, so it is not used here).
"""

from typing import Any, Callable, Optional

import optax


def ema_update(key_params: Any, params: Any, *, momentum: Any) -> Any:
  """Returns `momentum * key_params + (1 - momentum) * params`, leaf by leaf.

  Args:
    key_params: pytree of the key (momentum) encoder's parameters.
    params: pytree of the query encoder's parameters, same structure.
    momentum: m in [0, 1], a Python float or a scalar array (e.g. from a schedule).
  """
  return optax.incremental_update(new_tensors=params, old_tensors=key_params,
                                  step_size=1.0 - momentum)


def momentum_schedule(base_momentum: float = 0.999, *,
                      total_steps: Optional[int] = None,
                      final_momentum: float = 1.0) -> Callable[[Any], Any]:
  """`step -> m`: constant, or a cosine ramp from `base_momentum` to `final_momentum`.

  The cosine ramp (BYOL's) is `1 - (1 - base) * (cos(pi * step / total) + 1) / 2` when
  `final_momentum` is 1; the step is clipped at `total_steps`.

  Args:
    base_momentum: m at step 0.
    total_steps: length of the ramp; None for a constant momentum.
    final_momentum: m at `total_steps` (>= base_momentum).

  Returns:
    An optax schedule (a function of the step, jit-safe).
  """
  if not 0.0 <= base_momentum <= 1.0:
    raise ValueError(f"base_momentum must be in [0, 1], got {base_momentum}")
  if total_steps is None or base_momentum == 1.0:
    return optax.constant_schedule(base_momentum)
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  if not base_momentum <= final_momentum <= 1.0:
    raise ValueError(f"final_momentum must be in [base_momentum={base_momentum}, 1], "
                     f"got {final_momentum}")
  gap = optax.cosine_decay_schedule(
      init_value=1.0 - base_momentum, decay_steps=total_steps,
      alpha=(1.0 - final_momentum) / (1.0 - base_momentum))
  return lambda step: 1.0 - gap(step)
