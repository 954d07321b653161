"""Data features measured in their numbers: colour jitter through the config, the MoCo v2
view's blur and jitter probabilities, and sampling-rate subsets nested across rates on
a tfds dataset (`bitune-eval --kshot` on the command line: tests/test_cli_eval.py).

Complements test_views_*.py (the view functions against PIL/NumPy/scipy, grayscale
frequency) and test_pipeline.py (per-class counts, resumable streams): here each feature
is reached the way a run reaches it (config -> `input_lib.load` -> stream -> the views
the train step makes, `Input.views`, or the view the config names) and checked against
what it must do to the pixels.

Tolerances:
* Colours: a constant-colour PNG stays constant through decode, crop, flip and resize
  up to float32 rounding; 1e-5 on un-normalised values in [0, 1] (2e-5 on a factor read
  as a ratio of them).
* Frequencies: binomial, 4 standard deviations (fixed seeds: no flakiness; a wrong
  probability such as 0, 1 or a swapped 0.2/0.5/0.8 lies many deviations out).
"""

import math
import os
import sys

import jax
import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
import tensorflow as tf
from PIL import Image

from bitune_jax import methods
from bitune_jax.data import decode
from bitune_jax.data import input as input_lib
from bitune_jax.data.spec import Needs
from bitune_jax.data.views import batch as views_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import bituning as bituning_config  # noqa: E402  pylint: disable=g-import-not-at-top
import fakes  # noqa: E402  pylint: disable=g-import-not-at-top

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
LUMA = np.array([0.299, 0.587, 0.114])
SIZE = 16
COLOUR_TOL = 1e-5
NUM_CLASSES = 37  # the mock stands for oxford_iiit_pet ("pets")


def _unnormalise(x):
  return np.asarray(x, np.float64) * STD + MEAN


def _binomial_band(p_low, p_high, n, sigmas=4.0):
  """[p_low - sigmas * sd, p_high + sigmas * sd] for a frequency over n draws."""
  sd = max(math.sqrt(p * (1 - p) / n) for p in (p_low, p_high))
  return p_low - sigmas * sd, p_high + sigmas * sd


# ---------------------------------------------------------------- mocked tfds (pets)
def train_count(c):
  """Training examples of class c in the mock: 4..20, uneven across classes."""
  return 4 + (7 * c) % 17


def class_colour(c):
  """A colourful constant colour per class, channels in [60, 170] (uint8): no clipping
  under a factor in [0.6, 1.4], far enough from grey for saturation to show."""
  return np.array([60 + (29 * c) % 111, 60 + (53 * c + 40) % 111,
                   60 + (71 * c + 80) % 111], np.uint8)


def mock_split(split):
  """`(encoded PNGs, labels)`: constant class colours; every image a distinct size, so
  every example's bytes are unique (its identity in the subset tests)."""
  counts = ([train_count(c) for c in range(NUM_CLASSES)] if split == "train"
            else [1] * NUM_CLASSES)
  labels = np.repeat(np.arange(NUM_CLASSES), counts)
  np.random.default_rng(len(split)).shuffle(labels)
  encoded = []
  for i, label in enumerate(labels):
    h, w = 12 + i % 28, 12 + i // 28
    image = np.broadcast_to(class_colour(label), (h, w, 3)).astype(np.uint8)
    encoded.append(tf.io.encode_png(image).numpy())
  assert len(set(encoded)) == len(encoded)
  return encoded, labels


def fake_as_dataset(self, split, **kwargs):
  del kwargs
  assert self.info.features["label"].num_classes == NUM_CLASSES
  encoded, labels = mock_split(str(split))
  return tf.data.Dataset.from_tensor_slices({"image": encoded,
                                             "label": labels.astype(np.int64)})


@pytest.fixture
def mocked(monkeypatch):
  with fakes.mocked_tfds(monkeypatch, fake_as_dataset):
    yield


def _pets_config(rate=100, seed=0, **data):
  config = bituning_config.get_config(f"pets,resnet18,{rate}")
  config.image_size, config.batch_size, config.eval_batch_size = SIZE, 16, 16
  config.seed = seed
  config.data.data_dir = "/tmp/non-existing/tfds"
  for key, value in data.items():
    config.data[key] = value
  return config


def _views_of(config, steps):
  """`(colours [n, 3] of the un-normalised views, label [n], spread [n])` of both views
  of `steps` training batches: the mean colour of each view and its largest deviation
  from that mean (0 for a constant view)."""
  data = input_lib.load(config, methods.data_needs(config))
  views = jax.jit(data.views)
  colours, labels, spread = [], [], []
  for step, batch in zip(range(steps), data.train_batches(0)):
    batch = jax.device_get(views(batch, step))
    for name in ("image_q", "image_k"):
      x = _unnormalise(batch[name]).reshape(len(batch["label"]), -1, 3)
      mean = x.mean(1)
      colours.append(mean)
      spread.append(np.abs(x - mean[:, None]).max((1, 2)))
      labels.append(batch["label"])
  return np.concatenate(colours), np.concatenate(labels), np.concatenate(spread)


# ---------------------------------------------------------- colour jitter via config
@pytest.mark.parametrize("seed", [0])
def test_reference_view_without_jitter_keeps_each_constant_colour(mocked, seed):
  """color_jitter=False (the default): every view of a constant-colour image is that
  colour at every pixel, after crop, flip and resize."""
  config = _pets_config(seed=seed)
  assert not config.data.color_jitter
  colours, labels, spread = _views_of(config, steps=4)
  expected = np.stack([class_colour(c) for c in labels]) / 255.0
  assert spread.max() < COLOUR_TOL, seed
  np.testing.assert_allclose(colours, expected, atol=COLOUR_TOL, rtol=0,
                             err_msg=f"seed {seed}")


def _uniform_factor_checks(factors, low, high, what):
  """`factors` (one per view) distributed U[low, high]: inside it, reaching both ends,
  mean within 4 standard errors, Kolmogorov-Smirnov not rejected."""
  n, span = len(factors), high - low
  assert factors.min() >= low - 2e-5 and factors.max() <= high + 2e-5, (
      what, factors.min(), factors.max())
  # P(no draw within 2% of an end) = 0.98^n < 1e-4 for n >= 456.
  assert factors.min() < low + 0.02 * span and factors.max() > high - 0.02 * span, (
      what, factors.min(), factors.max())
  se = span / math.sqrt(12 * n)
  assert abs(factors.mean() - (low + high) / 2) < 4 * se, (what, factors.mean())
  ks = scipy.stats.kstest(factors, scipy.stats.uniform(low, span).cdf)
  assert ks.pvalue > 1e-4, (what, ks)


@pytest.mark.parametrize("strength,seed", [(0.4, 0), (0.25, 1)])
def test_config_brightness_jitter_scales_the_colour_by_a_uniform_factor(mocked, strength,
                                                                       seed):
  """data.color_jitter=True, data.jitter=(v, 0, 0, 0): each view of a constant colour c
  is f * c at every pixel (the same f for the three channels), f ~ U[1 - v, 1 + v] over
  512 views (e.g. [0.6, 1.4] at the default brightness 0.4)."""
  config = _pets_config(seed=seed, color_jitter=True, jitter=(strength, 0.0, 0.0, 0.0))
  colours, labels, spread = _views_of(config, steps=16)
  original = np.stack([class_colour(c) for c in labels]) / 255.0
  assert spread.max() < COLOUR_TOL, seed  # jitter acts on every pixel alike
  factors = (colours * original).sum(1) / (original * original).sum(1)
  np.testing.assert_allclose(colours, factors[:, None] * original, atol=COLOUR_TOL,
                             rtol=0, err_msg=f"seed {seed}")  # proportional channels
  _uniform_factor_checks(factors, 1 - strength, 1 + strength,
                         f"brightness {strength} seed {seed}")


@pytest.mark.parametrize("seed", [2])
def test_config_saturation_jitter_blends_with_the_luma(mocked, seed):
  """data.jitter=(0, 0, 0.4, 0): each view of a constant colour c is
  L + s * (c - L) (L: its ITU-R 601-2 luma), s ~ U[0.6, 1.4] over 512 views."""
  config = _pets_config(seed=seed, color_jitter=True, jitter=(0.0, 0.0, 0.4, 0.0))
  colours, labels, spread = _views_of(config, steps=16)
  original = np.stack([class_colour(c) for c in labels]) / 255.0
  luma = (original @ LUMA)[:, None]
  assert spread.max() < COLOUR_TOL, seed
  np.testing.assert_allclose(colours @ LUMA, luma[:, 0], atol=COLOUR_TOL, rtol=0,
                             err_msg=f"seed {seed}")
  chroma = original - luma
  factors = ((colours - luma) * chroma).sum(1) / (chroma * chroma).sum(1)
  np.testing.assert_allclose(colours, luma + factors[:, None] * chroma,
                             atol=COLOUR_TOL, rtol=0, err_msg=f"seed {seed}")
  _uniform_factor_checks(factors, 0.6, 1.4, f"saturation 0.4 seed {seed}")


# ------------------------------------------------------------ MoCo v2 probabilities
N_MOCO = 800  # views per frequency
MOCO_SIZE = 8  # output side: a 3-tap blur kernel (max(3, int(0.1 * 8) // 2 * 2 + 1))


def _moco_views(image, seed):
  """`N_MOCO` un-normalised MoCo views (the views `data.views='moco'` selects, as the
  train step makes them) of a square `image`, cached at its own side (so the cache
  image is the image), rows 0..N_MOCO-1 of one batch."""
  side = image.shape[0]
  assert image.shape[1] == side
  images = np.broadcast_to(decode.resize_image(image, side), (N_MOCO, side, side, 3))
  batch = {"image_u8": images, "hw": np.full((N_MOCO, 2), side, np.int32),
           "label": np.zeros(N_MOCO, np.int32)}
  spec = views_batch.ViewSpec(kind="moco", size=MOCO_SIZE, seed=seed, two_views=False)
  out = jax.jit(views_batch.make_views(spec))(batch, 0)["image"]
  return _unnormalise(jax.device_get(out))


@pytest.mark.parametrize("seed", [11])
def test_moco_colour_jitter_probability(seed):
  """Jitter p = 0.8, from the pixels of a constant colour c (blur, crop and flip keep it
  constant): a view that is c (untouched) or luma(c) grey (grayscale alone) was not
  jittered; any other colour was. 800 views: within 4 standard deviations of 0.8 (a
  jittered colour that lands within 1e-4 of one of those two has probability < 1e-3)."""
  colour = np.array([150, 90, 120], np.uint8)
  out = _moco_views(np.tile(colour, (20, 20, 1)), seed)
  assert np.abs(out - out[:, :1, :1]).max() < COLOUR_TOL, seed  # constant views
  got = out[:, 0, 0]
  c = colour / 255.0
  untouched = np.abs(got - c).max(1) < 1e-4
  grey = np.abs(got - c @ LUMA).max(1) < 1e-4
  jittered = ~(untouched | grey)
  low, high = _binomial_band(0.8 * (1 - 1e-3), 0.8, N_MOCO)
  assert low <= jittered.mean() <= high, (seed, jittered.mean(), (low, high))


def _pil_resize(grey, height, width):
  """float64 in [0, 1] of the PIL bilinear resize (float mode) of a uint8 `[h, w]`."""
  out = Image.fromarray(grey.astype(np.float32), mode="F").resize((width, height),
                                                                  Image.BILINEAR)
  return np.asarray(out, np.float64) / 255.0


def _moco_crop_references(grey, size, scale=0.2):
  """`[N, size * size]`: the PIL resize of every crop a MoCo box can take (area >= 0.2
  of the image up to the rounding of its sides), and its mirror: every unblurred view,
  up to the colour."""
  height, width = grey.shape
  refs = []
  for h in range(1, height + 1):
    for w in range(1, width + 1):
      if (h + 0.5) * (w + 0.5) < scale * height * width:
        continue
      for y in range(height - h + 1):
        for x in range(width - w + 1):
          r = _pil_resize(grey[y:y + h, x:x + w], size, size)
          refs += [r.reshape(-1), r[:, ::-1].reshape(-1)]
  return np.stack(refs)


def _affine_residual(views_flat, refs):
  """Per view, the smallest max-abs residual of `a * ref + b` fitted by least squares
  over every reference: ~float noise when the view is an affinely recoloured reference."""
  rc = refs - refs.mean(1, keepdims=True)
  out = np.empty(len(views_flat))
  for i, v in enumerate(views_flat):
    vc = v - v.mean()
    a = rc @ vc / (rc * rc).sum(1)
    out[i] = np.abs(vc[None] - a[:, None] * rc).max(1).min()
  return out


@pytest.mark.parametrize("seed", [12])
def test_moco_blur_probability(seed):
  """Blur p = 0.5, from the pixels of a sharp grey noise pattern. On a grey image colour
  jitter is an affine map of the grey level (brightness and contrast; saturation and hue
  do nothing; from levels in [0.3, 0.55] nothing clips, 1.4 * (1.4 * 0.55 - 0.4 * 0.3)
  < 1 and 0.6 * (1.4 * 0.3 - 0.4 * 0.55) > 0) and grayscale is the identity, so an
  unblurred view is `a * crop + b` for one of the crops a MoCo box can take (mirrored or
  not): a residual at float noise. A blur (sigma ~ U[0.1, 2], 3 taps at side 8) leaves
  no such crop once sigma >= 0.3 (checked below on blurred references); below ~0.2 its
  side weight exp(-0.5 / sigma^2) is float noise. So the detected frequency lies in
  [0.5 * P(sigma >= 0.3), 0.5] = [0.447, 0.5], tested within 4 standard deviations."""
  rng = np.random.default_rng(seed)
  grey = rng.integers(77, 141, (10, 10)).astype(np.uint8)  # levels in [0.3, 0.55]
  refs = _moco_crop_references(grey, MOCO_SIZE)
  out = _moco_views(np.repeat(grey[..., None], 3, -1), seed)
  assert np.abs(out - out.mean(-1, keepdims=True)).max() < COLOUR_TOL, seed  # stays grey
  residual = _affine_residual(out[..., 0].reshape(N_MOCO, -1), refs)
  threshold = 1e-5
  blurred = residual > threshold
  # The detector: a sigma = 0.3 blur (scipy, 3 taps, mirrored borders) of 40 random
  # references matches no unblurred reference; the unblurred views sit at float noise.
  pick = np.random.default_rng(seed + 1).choice(len(refs), 40, replace=False)
  kernel = np.exp(-0.5 * (np.arange(-1, 2) / 0.3) ** 2)
  kernel /= kernel.sum()
  smoothed = [scipy.ndimage.correlate1d(scipy.ndimage.correlate1d(
      refs[k].reshape(MOCO_SIZE, MOCO_SIZE), kernel, axis=0, mode="mirror"),
      kernel, axis=1, mode="mirror").reshape(-1) for k in pick]
  assert _affine_residual(np.stack(smoothed), refs).min() > 10 * threshold, seed
  p_detectable = (2.0 - 0.3) / (2.0 - 0.1)
  low, high = _binomial_band(0.5 * p_detectable, 0.5, N_MOCO)
  assert low <= blurred.mean() <= high, (seed, blurred.mean(), (low, high))
  assert np.median(residual[~blurred]) < 1e-6, seed  # float noise, far below threshold
  # Blurred views carry less high-frequency energy than unblurred ones.
  energy = lambda x: (np.diff(x, axis=1) ** 2).mean((1, 2, 3)) / x.var((1, 2, 3))
  assert np.median(energy(out[blurred])) < 0.7 * np.median(energy(out[~blurred])), seed


# ---------------------------------------------------- sampling rates, nested subsets
@pytest.mark.parametrize("seed", [0, 3])
def test_sampling_rate_subsets_are_nested_with_exact_counts(mocked, seed):
  """Through `input_lib.load` on the mocked tfds pets (4..20 training images per class):
  class c keeps max(1, round_half_up(rate * n_c / 100)) examples at each rate, and the
  examples kept at 15% are among those at 30%, those at 50% and those at 75%, class by
  class; the subset depends on the seed."""
  _, labels = mock_split("train")
  # Example i of the mock is (12 + i % 28) x (12 + i // 28) pixels: its original size,
  # which the cache keeps, names it.
  index = {(12 + i % 28, 12 + i // 28): i for i in range(len(labels))}
  chosen = {}
  for rate in (15, 30, 50, 75, 100):
    data = input_lib.load(_pets_config(rate, seed=seed), Needs())
    ids = np.array([index[tuple(hw)] for hw in data.train.hw.tolist()])
    np.testing.assert_array_equal(labels[ids], data.train.labels)  # labels travel along
    assert len(set(ids)) == len(ids), (seed, rate)
    counts = np.bincount(data.train.labels, minlength=NUM_CLASSES)
    expected = [max(1, (2 * rate * train_count(c) + 100) // 200)
                for c in range(NUM_CLASSES)]  # round half up, in integers
    np.testing.assert_array_equal(counts, expected, err_msg=f"seed {seed} rate {rate}")
    chosen[rate] = set(ids.tolist())
  assert len(chosen[100]) == len(labels)
  for low, high in ((15, 30), (30, 50), (50, 75), (75, 100)):
    missing = sorted(chosen[low] - chosen[high])
    assert not missing, (seed, low, high, missing)
  assert chosen[15] < chosen[30] < chosen[50] < chosen[75]  # strictly larger counts here
  other = input_lib.load(_pets_config(50, seed=seed + 1), Needs())
  assert {index[tuple(hw)] for hw in other.train.hw.tolist()} != chosen[50], seed
