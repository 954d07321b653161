"""Figures of a sweep (PNG, matplotlib): accuracy against the sampling rate (or k) and
each run's training curves, read from what the runs wrote.

Each function returns the data it drew (so tests check numbers, not pixels) and writes
one PNG.
"""

import collections
import os

from bitune_jax.training import events

_TEST_PREFIX = "test_"


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # files only, no display
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def accuracy_vs_rate(points, path, *, title, metric,
                     xlabel="sampling rate of the training set (%)", log2_x=False):
  """One panel per dataset: each row's mean ± std against the sampling rate (or k),
  and the paper's number beside it (hollow markers, dashed) where known.

  Args:
    points: iterable of `(dataset, row, x, mean, std, paper_mean, paper_std)`; `x` the
      rate in % (or k); `mean` / `paper_mean` None where unknown; `std` None for one
      seed.
    path: the PNG to write.
    title: the figure's title.
    metric: the y axis' label, e.g. "test top-1 (%)".
    xlabel: the x axis' label.
    log2_x: a log2 x axis, ticks at the values (a sensitivity to K or L: 8, 16, ...).

  Returns:
    `{dataset: {row: [(x, mean, std, paper_mean, paper_std), ...] sorted by x}}`.
  """
  data = collections.defaultdict(lambda: collections.defaultdict(list))
  for dataset, row, x, mean, std, paper_mean, paper_std in points:
    data[dataset][row].append((x, mean, std, paper_mean, paper_std))
  data = {d: {r: sorted(v, key=lambda p: p[0]) for r, v in rows.items()}
          for d, rows in data.items()}
  plt = _pyplot()
  count = max(len(data), 1)
  fig, axes = plt.subplots(1, count, figsize=(5 * count, 4), squeeze=False)
  colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for ax, (dataset, rows) in zip(axes[0], sorted(data.items())):
    ticks = sorted({x for values in rows.values() for x, *_ in values})
    for i, (row, values) in enumerate(rows.items()):
      colour = colours[i % len(colours)]
      shift = _dodge(i, len(rows), ticks, log2_x)  # error bars side by side, not over
      ours = [(x, m, s or 0.0) for x, m, s, _, _ in values if m is not None]
      if ours:
        xs, ms, ss = zip(*ours)
        ax.errorbar([shift(x) for x in xs], ms, yerr=ss, marker="o", capsize=3,
                    color=colour, label=row)
      paper = [(x, m, s or 0.0) for x, _, _, m, s in values if m is not None]
      if paper:
        xs, ms, ss = zip(*paper)
        ax.errorbar([shift(x) for x in xs], ms, yerr=ss, marker="o",
                    markerfacecolor="none", capsize=3, linestyle="--", color=colour,
                    label=f"{row} (paper)")
    if len(data) > 1 or dataset not in title:
      ax.set_title(dataset)
    if not log2_x:
      ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    if log2_x:
      ax.set_xscale("log", base=2)
      ticks = sorted({x for values in rows.values() for x, *_ in values})
      ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
      ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)
  return data


def _dodge(index, count, ticks, log_scale):
  """x -> x moved a little for series `index` of `count`, so that the error bars of
  series at the same x stand side by side (1.2% of the axis apart, or of a log2
  octave)."""
  if count < 2:
    return lambda x: x
  offset = (index - (count - 1) / 2) * 0.012
  if log_scale:
    return lambda x: x * 2.0 ** offset
  span = (max(ticks) - min(ticks)) if len(ticks) > 1 else 1.0
  return lambda x: x + offset * span


def training_curves(run_dir, path, *, title=""):
  """The run's loss terms (left) and test metrics (right) against the step.

  Returns:
    `{"losses": {tag: [(step, value)]}, "test": {tag: [(step, value)]}}`.
  """
  scalars = events.read_scalars(run_dir)
  skip = ("lr/", "steps_per_sec", "uptime", "train_accuracy")
  # test_score repeats the dataset's own metric (top-1 or mean per-class): not drawn;
  # nor is any other evaluation (validation) among the training terms.
  test = {k: v for k, v in scalars.items()
          if k.startswith(_TEST_PREFIX) and k != "test_score"}
  train = {k: v for k, v in scalars.items()
           if not k.startswith(skip + (_TEST_PREFIX, "val_"))}
  plt = _pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
  for tag, values in sorted(train.items()):
    steps, ys = zip(*values)
    left.plot(steps, ys, label=tag)
  if train and all(v > 0 for vs in train.values() for _, v in vs):
    spread = max(v for vs in train.values() for _, v in vs) / max(
        min(v for vs in train.values() for _, v in vs), 1e-12)
    if spread > 100:
      left.set_yscale("log")
  left.set_xlabel("step")
  left.set_ylabel("training loss terms")
  left.grid(alpha=0.3)
  left.legend(fontsize=8)
  for tag, values in sorted(test.items()):
    steps, ys = zip(*values)
    right.plot(steps, [100 * y for y in ys], marker="o", label=tag[len(_TEST_PREFIX):])
  right.set_xlabel("step")
  right.set_ylabel("test metric (%)")
  right.grid(alpha=0.3)
  right.legend(fontsize=8)
  fig.suptitle(title or os.path.basename(os.path.normpath(run_dir)))
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)
  return {"losses": train, "test": test}


def _save(fig, path):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  os.replace(tmp, path)


def tsne(features, labels, path, *, title, seed=0, class_names=None):
  """A 2-D t-SNE (scikit-learn, PCA init) of `features [N, F]`, points coloured by
  class, as Bi-tuning's Figure 4 and the unsupervised fine-tuning paper's Figure 1.

  Returns:
    `(embedding [N, 2], labels [N])`, also saved beside the PNG (`.npz`).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top
  features = np.asarray(features, np.float64)
  labels = np.asarray(labels)
  if len(features) < 5:
    raise ValueError(f"t-SNE needs at least 5 points, got {len(features)}")
  perplexity = float(min(30.0, (len(features) - 1) / 3))
  embedding = TSNE(n_components=2, init="pca", perplexity=perplexity,
                   random_state=seed).fit_transform(features)
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 6))
  classes = np.unique(labels)
  cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20"
                      if len(classes) <= 20 else "viridis")
  for i, c in enumerate(classes):
    chosen = labels == c
    colour = cmap(i % cmap.N) if len(classes) <= 20 else cmap(i / max(len(classes) - 1, 1))
    name = class_names[c] if class_names is not None else str(c)
    ax.scatter(embedding[chosen, 0], embedding[chosen, 1], s=8, color=colour,
               label=name)
  if len(classes) <= 20:
    ax.legend(title="class", fontsize=8, markerscale=2, loc="best")
  ax.set_xlabel("t-SNE 1")
  ax.set_ylabel("t-SNE 2")
  ax.set_title(title)
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)
  np.savez(os.path.splitext(path)[0] + ".npz", embedding=embedding, labels=labels)
  return embedding, labels
