"""One module per method: its model, state extras, shardings and train step.

Each exposes `TWO_VIEWS`, `build_model(config, num_classes)`,
`init_state(rng, sample_images, *, model, tx, config)`,
`state_shardings(abstract_state, mesh, config)` and
`make_train_step(model, tx, config) -> train_step(state, batch) -> (state, metrics)`;
optionally `check_pretrained(pretrained, config)` (before anything compiles) and
`prepare(state, ...) -> state` (once, before training, not on resume). `data_needs`
says what each asks of the data.
"""

from bitune_jax.data.spec import Needs
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


def data_needs(config) -> Needs:
  """What `config.method` asks of the data (the only place that maps a method's name
  to its `Needs`): FixMatch, weak and strong views and `fixmatch.mu` unlabelled images
  per labelled one; unsupervised fine-tuning, its replayed share of the source; a
  method with `TWO_VIEWS`, two views."""
  if config.method == "fixmatch":
    return Needs(views="weak_strong", unlabelled=int(config.fixmatch.mu))
  replay = config.unsup.replay_fraction if config.method == "unsup_finetune" else 0.0
  return Needs(views="two" if get(config.method).TWO_VIEWS else "one",
               replay_fraction=float(replay))
