"""One module per method: its model, state extras, shardings and train step.

Each exposes `TWO_VIEWS`, `build_model(config, num_classes)`,
`init_state(rng, sample_images, *, model, tx, config)`,
`state_shardings(abstract_state, mesh, config)` and
`make_train_step(model, tx, config) -> train_step(state, batch) -> (state, metrics)`;
optionally `check_pretrained(pretrained, config)` (before anything compiles) and
`prepare(state, ...) -> state` (once, before training, not on resume).
"""

from bitune_jax.methods import (bituning, bss, center_loss, cotuning, delta, finetune,
                                fixmatch, gpt_star, l2sp, unsup_finetune)

METHODS = {"bituning": bituning, "bss": bss, "center_loss": center_loss,
           "cotuning": cotuning, "delta": delta, "finetune": finetune,
           "fixmatch": fixmatch, "gpt_star": gpt_star, "l2sp": l2sp,
           "unsup_finetune": unsup_finetune}


def get(name):
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
  return METHODS[name]
