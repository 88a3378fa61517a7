"""COCO in VSE++ order (`data.format="coco_vsepp"`): the reader's 5K test order against the
real `coco_test_ids.npy` of the eccv-caption package, on a synthetic annotations JSON."""
import json

import ml_collections
import numpy as np
import pytest

from dsran_jax import coco_benchmarks
from dsran_jax.data import coco_vsepp, formats, raw

pytest.importorskip("eccv_caption")


def _config(root, name="coco"):
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict({"format": "coco_vsepp", "root": str(root), "name": name})
  return c


def _write(path, obj):
  path.write_text(json.dumps(obj))


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
  """annotations/: the real test ids (their images from COCO's own ground truth in the
  package), a small train / restval / dev, and both captions JSONs."""
  root = tmp_path_factory.mktemp("coco")
  ann = root / "annotations"
  ann.mkdir()
  test_ids = coco_benchmarks.package_test_ids()
  test_images = coco_benchmarks.caption_images(test_ids)
  # dev: 1001 images x 5 captions with made-up ids (VSE++ keeps the first 5000)
  dev_ids = 9_000_000 + np.arange(5005)
  dev_images = 8_000_000 + np.arange(5005) // 5
  restval_ids = 9_100_000 + np.arange(7)
  restval_images = np.array([8_100_000] * 7)     # one image with 7 captions
  train_ids = 9_200_000 + np.arange(6)
  # An id also in the val file, with another caption: train reads captions_train2014.
  train_ids[0] = restval_ids[0]
  val_anns = [{"id": int(a), "image_id": int(i), "caption": f" val caption {a} \n"}
              for a, i in zip(np.concatenate([test_ids[::-1], dev_ids, restval_ids]),
                              np.concatenate([test_images[::-1], dev_images, restval_images]))]
  val_imgs = [{"id": int(i), "file_name": f"COCO_val2014_{i:012d}.jpg"}
              for i in sorted({int(x) for x in np.concatenate(
                  [test_images, dev_images, restval_images])})]
  _write(ann / "captions_val2014.json", {"annotations": val_anns, "images": val_imgs})
  _write(ann / "captions_train2014.json", {
      "annotations": [{"id": int(a), "image_id": 8_200_000, "caption": f"train {a}"}
                      for a in train_ids],
      "images": [{"id": 8_200_000, "file_name": "COCO_train2014_000008200000.jpg"}]})
  for name, ids in (("test", test_ids), ("dev", dev_ids), ("restval", restval_ids),
                    ("train", train_ids)):
    np.save(ann / f"coco_{name}_ids.npy", ids)
  return root


def test_test_split_is_the_package_order(coco_root):
  config = _config(coco_root)
  caps, images, stems, texts, cpi = coco_vsepp.split_rows(config, "testall")
  ids = coco_benchmarks.package_test_ids()
  assert cpi == 5 and len(images) == 5000
  np.testing.assert_array_equal(caps, ids)
  # image i = the image of captions 5i..5i+4 (VSE++'s img_embs[::5])
  np.testing.assert_array_equal(images, coco_benchmarks.caption_images(ids[::5]))
  assert stems[0] == f"COCO_val2014_{images[0]:012d}"
  assert texts[:2] == [f"val caption {ids[0]}", f"val caption {ids[1]}"]
  # the ECCV evaluator's layout from the reader agrees with the package's
  reader_caps, reader_images = coco_vsepp.caption_ids(config, "test")
  layout = coco_benchmarks.layout_from_caption_ids(reader_caps, image_ids=reader_images)
  assert layout.package_order
  np.testing.assert_array_equal(layout.image_ids, coco_benchmarks.package_layout().image_ids)
  assert formats.format_module(config) is coco_vsepp


def test_train_dev_splits(coco_root):
  config = _config(coco_root)
  caps, images, stems, texts, cpi = coco_vsepp.split_rows(config, "train")
  # every annotation of train then restval, one row each (an image seen 6 + 7 times)
  assert cpi == 1 and len(caps) == len(images) == len(stems) == len(texts) == 13
  assert texts[0] == f"train {caps[0]}"          # from captions_train2014.json
  assert texts[6] == f"val caption {caps[6]}"    # restval: captions_val2014.json
  assert stems[0] == "COCO_train2014_000008200000" and stems[6].startswith("COCO_val2014")
  caps, images, _, _, cpi = coco_vsepp.split_rows(config, "dev")
  assert cpi == 5 and len(caps) == 5000 and len(images) == 1000   # the first 5000 ids


def test_refusals(coco_root, tmp_path):
  with pytest.raises(ValueError, match="set data.name='coco'"):
    coco_vsepp.read_raw_split(_config(coco_root, "f30k"), "test")
  with pytest.raises(raw.MissingDataError, match="coco_test_ids.npy: missing"):
    coco_vsepp.split_rows(_config(tmp_path), "test")
  bad = tmp_path / "bad"
  (bad / "annotations").mkdir(parents=True)
  for f in ("captions_val2014.json", "captions_train2014.json"):
    (bad / "annotations" / f).write_bytes((coco_root / "annotations" / f).read_bytes())
  ids = coco_benchmarks.package_test_ids().copy()
  ids[[4, 5]] = ids[[5, 4]]
  np.save(bad / "annotations" / "coco_test_ids.npy", ids)
  with pytest.raises(raw.DataError, match=rf"caption {ids[4]} \(position 4\) is of image "):
    coco_vsepp.split_rows(_config(bad), "test")
  ids[4] = 123
  np.save(bad / "annotations" / "coco_test_ids.npy", ids)
  with pytest.raises(raw.DataError, match=r"1 annotation ids are not in .*captions_val2014"
                                          r".json: 123"):
    coco_vsepp.split_rows(_config(bad), "test")


def test_load_split_reads_vlp_features_in_vsepp_order(tmp_path):
  """A tiny COCO in VSE++ order through `data.load_split`: captions in the ids' order,
  features of each row's image from the VLP shards (by file stem)."""
  h5py = pytest.importorskip("h5py")
  from dsran_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from dsran_jax.default_config import get_base_config  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  ann = tmp_path / "annotations"
  ann.mkdir()
  images = [8_000_002, 8_000_001]                     # dev order: not sorted
  dev_ids = np.array([7_000_000 + 10 * i + k for i in range(2) for k in range(5)])
  anns = [{"id": int(a), "image_id": images[j // 5], "caption": f"Dev Caption {a}"}
          for j, a in enumerate(dev_ids)][::-1]      # the JSON's order does not matter
  _write(ann / "captions_val2014.json", {"annotations": anns, "images": [
      {"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in images]})
  _write(ann / "captions_train2014.json", {"annotations": [], "images": []})
  for name in ("train", "restval", "test"):
    np.save(ann / f"coco_{name}_ids.npy", np.zeros(0, np.int64))
  np.save(ann / "coco_dev_ids.npy", dev_ids)
  feats = {}
  with h5py.File(tmp_path / "bbox.h5", "w") as boxes:
    for i in images:
      stem = f"COCO_val2014_{i:012d}"
      feats[stem] = rng.normal(size=(4, 2048)).astype(np.float32)
      x = rng.uniform(0, 100, (4, 2))
      boxes[stem] = np.concatenate([x, x + 10, np.zeros((4, 1)), np.ones((4, 1))],
                                   1).astype(np.float32)
      for kind, value in (("feat", feats[stem]),
                          ("cls", np.full((4, 1601), 1 / 1601, np.float32))):
        with h5py.File(tmp_path / f"coco_vg_{kind}{stem[-3:]}.h5", "a") as f:
          f[stem] = value
  c = get_base_config()
  c.data.format, c.data.root, c.data.name, c.data.num_regions = ("coco_vsepp", str(tmp_path),
                                                                 "coco", 6)
  c.model.dsran.text_encoder, c.model.dsran.image_inputs = "gru", "regions"
  split = data_lib.load_split(c, "dev", str(tmp_path / "work"))
  assert split.captions_per_image == 5 and split.num_images == 2
  assert list(split.image_ids) == [f"COCO_val2014_{i:012d}" for i in images]
  assert split.texts[5] == f"Dev Caption {dev_ids[5]}"
  batch = split.images([1])
  np.testing.assert_array_equal(batch["regions"][0, :4], feats[split.image_ids[1]])
  assert batch["region_mask"][0].tolist() == [True] * 4 + [False] * 2
