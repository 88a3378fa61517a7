"""The synthetic world: deterministic, well-formed, captions true to the images."""
import re

import numpy as np
import pytest

from dsran_jax import default_config
from dsran_jax.data import synthetic

IMG_DIM = 32
NUM_REGIONS = 8


def _config(seed=0, train=40, dev=12, test=12, img_dim=IMG_DIM):
  c = default_config.get_base_config()
  c.data.format = "synthetic"
  c.data.img_dim = img_dim
  c.data.synthetic.seed = seed
  c.data.synthetic.num_train_images = train
  c.data.synthetic.num_dev_images = dev
  c.data.synthetic.num_test_images = test
  c.data.synthetic.num_regions = NUM_REGIONS
  return c


def test_deterministic_from_seed():
  a = synthetic.read_raw_split(_config(), "dev")
  synthetic.get_world.cache_clear()  # rebuild the world's directions from the seed
  b = synthetic.read_raw_split(_config(), "dev")
  assert a.texts == b.texts and a.image_ids == b.image_ids
  idx = np.arange(12)
  xa, xb = a.read_images(idx), b.read_images(idx)
  for k in xa:
    np.testing.assert_array_equal(xa[k], xb[k], err_msg=k)


def test_features_do_not_depend_on_batching_and_splits_are_prefixes():
  small = synthetic.read_raw_split(_config(train=20), "train")
  big = synthetic.read_raw_split(_config(train=40), "train")
  assert big.texts[:100] == small.texts
  batch = big.read_images(np.arange(20))
  for i in (0, 7, 19):
    one = small.read_images(np.array([i]))
    for k in batch:
      np.testing.assert_array_equal(one[k][0], batch[k][i], err_msg=f"{k} of image {i}")


def test_shapes_and_dtypes():
  raw = synthetic.read_raw_split(_config(), "train")
  assert raw.captions_per_image == 5
  assert len(raw.texts) == 5 * len(raw.image_ids) == 200
  x = raw.read_images(np.array([3, 0, 3, 39]))
  assert x["grid"].shape == (4, 49, IMG_DIM) and x["grid"].dtype == np.float32
  assert x["regions"].shape == (4, NUM_REGIONS, IMG_DIM) and x["regions"].dtype == np.float32
  assert x["region_pos"].shape == (4, NUM_REGIONS, 1607)
  assert x["region_pos"].dtype == np.float32
  assert x["region_mask"].shape == (4, NUM_REGIONS) and x["region_mask"].dtype == bool
  np.testing.assert_array_equal(x["grid"][0], x["grid"][2])
  for k in ("grid", "regions", "region_pos"):
    assert np.all(np.isfinite(x[k])), k
  mask = x["region_mask"]
  assert np.all(mask.sum(1) >= 2)
  # Real regions first (detector order), padding is zero.
  assert np.all(np.diff(mask.astype(int), axis=1) <= 0)
  assert not np.any(x["regions"][~mask]) and not np.any(x["region_pos"][~mask])
  assert np.all(np.abs(x["regions"][mask]).sum(-1) > 0)
  with pytest.raises(IndexError, match="train"):
    raw.read_images(np.array([40]))


def test_different_seeds_and_splits_differ():
  a = synthetic.read_raw_split(_config(seed=0), "dev")
  b = synthetic.read_raw_split(_config(seed=1), "dev")
  c = synthetic.read_raw_split(_config(seed=0), "test")
  assert a.texts != b.texts and a.texts != c.texts
  idx = np.arange(4)
  assert not np.allclose(a.read_images(idx)["grid"], b.read_images(idx)["grid"])
  assert not np.allclose(a.read_images(idx)["regions"], c.read_images(idx)["regions"])
  with pytest.raises(ValueError, match="splits"):
    synthetic.read_raw_split(_config(), "testall")


_NAME_TO_CLASS = {name: c for c, (names, _, _) in enumerate(synthetic.CLASSES)
                  for name in names}
_NP = re.compile(r"\b(?:(?:small|little|large|big) )?(?:(%s) )?(%s)\b" % (
    "|".join(synthetic.COLOURS), "|".join(sorted(_NAME_TO_CLASS, key=len, reverse=True))))
_REL = {phrase: rel for rel, phrases in enumerate(synthetic.RELATIONS) for phrase in phrases}
_REL_RE = re.compile(r"\b(%s)\b" % "|".join(
    sorted(list(_REL) + list(synthetic.NEXT_TO), key=len, reverse=True)))


def test_captions_describe_the_image():
  world, layouts = synthetic.world_and_layouts(_config(train=60), "train")
  raw = synthetic.read_raw_split(_config(train=60), "train")
  n_rel = n_scene = 0
  for i in range(len(layouts)):
    objs = {o[0]: o for o in layouts.objects(i)}
    scene_pps, scene_nps = synthetic.SCENES[layouts.scene[i]]
    other_scenes = [p for s, (pps, nps) in enumerate(synthetic.SCENES)
                    if s != layouts.scene[i] for p in pps + nps]
    for text in raw.texts[5 * i:5 * i + 5]:
      assert text == text.lower() and len(text.replace(",", " ,").split()) <= 20, text
      mentions = [(m.group(1), _NAME_TO_CLASS[m.group(2)], m.start(), m.end())
                  for m in _NP.finditer(text)]
      assert mentions, text
      for colour, cls, _, _ in mentions:
        assert cls in objs, f"{text!r} names a {synthetic.CLASSES[cls][0][0]} not in image {i}"
        if colour:
          assert synthetic.COLOURS[objs[cls][1]] == colour, (text, world.describe(layouts, i))
      rel = _REL_RE.search(text)
      if rel:
        before = [m for m in mentions if m[3] <= rel.start()][-1]
        after = [m for m in mentions if m[2] >= rel.end()][0]
        truth = synthetic.relation(objs[before[1]], objs[after[1]])
        if rel.group(1) in synthetic.NEXT_TO:
          assert truth in (synthetic.LEFT, synthetic.RIGHT), text
        else:
          assert _REL[rel.group(1)] == truth, (text, world.describe(layouts, i))
        n_rel += 1
      if any(p in text for p in scene_pps + scene_nps):
        n_scene += 1
      assert not any(p in text for p in other_scenes), text
  assert n_rel > 60 and n_scene > 100  # of 300 captions: relations and scenes are common


def test_families_are_hard_negatives():
  world, layouts = synthetic.world_and_layouts(_config(train=40), "train")
  families = {}
  for i in range(len(layouts)):
    if layouts.family[i] >= 0:
      families.setdefault(int(layouts.family[i]), []).append(i)
  assert families
  for members in families.values():
    a = {tuple(layouts.variant[i]): i for i in members}
    base = layouts.objects(a[(0, 0)])
    for (li, si), i in a.items():
      objs = layouts.objects(i)
      assert [o[:3] for o in objs] == [o[:3] for o in base]  # same objects and attributes
      assert (layouts.scene[i] == layouts.scene[a[(0, 0)]]) == (si == 0)
      same_layout = [o[3:] for o in objs] == [o[3:] for o in base]
      assert same_layout == (li == 0)
      if li:
        rel = world._relations(layouts.row[i, :len(objs)], layouts.col[i, :len(objs)])
        assert rel != world._relations(layouts.row[a[(0, 0)], :len(objs)],
                                       layouts.col[a[(0, 0)], :len(objs)])


def _ridge_accuracy(x_train, y_train, x_test, y_test, num_classes):
  mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
  a, b = (x_train - mu) / sd, (x_test - mu) / sd
  w = np.linalg.solve(a.T @ a + 10.0 * np.eye(a.shape[1]), a.T @ np.eye(num_classes)[y_train])
  return np.mean(np.argmax(b @ w, 1) == y_test)


def test_scene_is_only_in_the_grid():
  config = _config(train=320, img_dim=48)
  world, layouts = synthetic.world_and_layouts(config, "train")
  x = world.read_images(layouts, np.arange(320))
  mask = x["region_mask"][..., None]
  region_view = np.concatenate([
      (x["regions"] * mask).sum(1) / mask.sum(1),
      (x["region_pos"][..., :6] * mask).sum(1) / mask.sum(1)], 1)
  grid_view = x["grid"].mean(1)
  y = layouts.scene
  tr, te = slice(0, 240), slice(240, 320)
  n = world.d.num_scenes
  acc_regions = _ridge_accuracy(region_view[tr], y[tr], region_view[te], y[te], n)
  acc_grid = _ridge_accuracy(grid_view[tr], y[tr], grid_view[te], y[te], n)
  assert acc_grid > 0.9, acc_grid
  assert acc_regions < 0.35, acc_regions  # chance is 1/8


def test_difficulty_knobs():
  easy = synthetic.Difficulty(family_fraction=0.0, p_caption_relation=0.0)
  world, layouts = synthetic.world_and_layouts(_config(), "train", easy)
  assert np.all(layouts.family == -1)
  raw = synthetic.read_raw_split(_config(), "train", easy)
  assert not any(_REL_RE.search(t) for t in raw.texts)
  with pytest.raises(ValueError, match="max_objects"):
    synthetic.read_raw_split(_config(), "train", synthetic.Difficulty(max_objects=12))
  # Knobs from an optional config entry (not in default_config).
  config = _config()
  config.data.synthetic.difficulty = {"family_fraction": 0.0, "p_caption_relation": 0.0}
  assert synthetic.difficulty_from_config(config) == easy
  config.data.synthetic.difficulty = {"family_size": 3}
  with pytest.raises(ValueError, match="family_size"):
    synthetic.read_raw_split(config, "train")
