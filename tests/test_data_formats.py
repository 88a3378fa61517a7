"""Dataset readers on tiny fixtures written in the real layouts, and the data checker.

Widths are the real ones (2048 / 1601 / 6 / 49); images are few and, for VLP, have 12
detections instead of 100 so that the fixtures stay small.
"""
import json
import os
import pickle
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from dsran_jax import data as data_lib
from dsran_jax.data import raw
from dsran_jax.data import vlp
from dsran_jax.data.region_pos import region_pos
from dsran_jax.default_config import get_base_config

DIM, NCLS, NDET = 2048, 1601, 12
F30K_BOX = "flickr30k_detection_vg_thresh0.2_feat_gvd_checkpoint_trainvaltest.h5"
COCO_BOX = "coco_detection_vg_thresh0.2_feat_gvd_checkpoint_trainvaltest.h5"
COCO_PREFIX = "feat_cls_1000/coco_detection_vg_100dets_gvd_checkpoint_trainval"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(fmt, root, name="f30k", encoder="gru", inputs="regions", **data):
  c = get_base_config()
  c.data.format, c.data.root, c.data.name = fmt, str(root), name
  c.model.dsran.text_encoder, c.model.dsran.image_inputs = encoder, inputs
  for k, v in data.items():
    setattr(c.data, k, v)
  return c


def _caps(prefix, n, k=5):
  return [f"a {prefix} photo number {i} caption {j} ." for i in range(n) for j in range(k)]


def _detections(rng, r=NDET):
  x1, y1 = rng.uniform(0, 400, r), rng.uniform(0, 300, r)
  boxes = np.stack([x1, y1, x1 + rng.uniform(1, 200, r), y1 + rng.uniform(1, 200, r),
                    rng.integers(0, NCLS, r), rng.uniform(0, 1, r)], 1).astype(np.float32)
  logits = rng.normal(size=(r, NCLS)) * 4
  cls = np.exp(logits - logits.max(1, keepdims=True))
  return (rng.normal(size=(r, DIM)).astype(np.float32), boxes,
          (cls / cls.sum(1, keepdims=True)).astype(np.float32))


# ----------------------------------------------------------------------------- precomp


@pytest.fixture
def precomp_root(tmp_path):
  rng = np.random.default_rng(0)
  for split, n in (("train", 4), ("dev", 3), ("test", 3), ("testall", 6)):
    np.save(tmp_path / f"{split}_ims.npy", rng.normal(size=(n, 36, DIM)).astype(np.float32))
    (tmp_path / f"{split}_caps.txt").write_text("\n".join(_caps(split, n)) + "\n",
                                                encoding="utf-8")
  (tmp_path / "test_ids.txt").write_text("\n".join(["11", "22", "33"]) + "\n")
  np.save(tmp_path / "test_grid.npy", rng.normal(size=(3, 49, DIM)).astype(np.float32))
  return tmp_path


def test_precomp_round_trip(precomp_root, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("work")
  c = _config("precomp", precomp_root, max_len=10)
  split = data_lib.load_split(c, "test", str(workdir))
  assert (split.num_images, split.num_captions, split.captions_per_image) == (3, 15, 5)
  assert list(split.image_ids) == ["11", "22", "33"]
  assert split.texts[5] == "a test photo number 1 caption 0 ."
  ims = np.load(precomp_root / "test_ims.npy")
  batch = split.images([2, 0])
  np.testing.assert_array_equal(batch["regions"], ims[[2, 0]])
  assert batch["region_pos"].shape == (2, 36, 1607) and not batch["region_pos"].any()
  assert batch["region_mask"].all() and batch["region_mask"].dtype == bool
  assert "grid" not in batch  # image_inputs == "regions"
  assert split.input_ids.shape == (15, 10) and split.input_ids.dtype == np.int32
  assert (workdir / "vocab.json").exists()  # GRU vocabulary built from train
  # Readers pickle without copying features (for worker processes).
  again = pickle.loads(pickle.dumps(split.read_images))
  np.testing.assert_array_equal(again([1])["regions"], ims[[1]])


def test_precomp_grid_and_one_caption_per_image(precomp_root):
  c = _config("precomp", precomp_root, inputs="grid+regions")
  raw_split = data_lib.read_raw_split(c, "test")
  np.testing.assert_array_equal(raw_split.read_images(np.array([1]))["grid"],
                                np.load(precomp_root / "test_grid.npy")[[1]])
  # No grid file for dev: the error says how to go on without one.
  with pytest.raises(raw.MissingDataError, match=r"dev_grid\.npy.*image_inputs=regions"):
    data_lib.read_raw_split(c, "dev")
  (precomp_root / "dev_caps.txt").write_text("one\ntwo\nthree\n")
  assert data_lib.read_raw_split(_config("precomp", precomp_root), "dev").captions_per_image == 1


@pytest.mark.parametrize("damage, match", [
    ("caps", r"train_caps\.txt: 19 captions for 4 images"),
    ("truncate", r"train_ims\.npy: cannot read as \.npy"),
    ("width", r"train_ims\.npy: expected .* \(\*, \*, 2048\), got \(4, 36, 1024\)"),
    ("missing", r"train_caps\.txt: missing"),
    ("grid_shape",
     r"train_grid\.npy: expected grid features .* \(4, 49, 2048\), got \(3, 49, 2048\)"),
])
def test_precomp_errors_name_the_file(precomp_root, damage, match):
  ims, caps = precomp_root / "train_ims.npy", precomp_root / "train_caps.txt"
  inputs = "regions"
  if damage == "caps":
    caps.write_text("\n".join(_caps("train", 4)[:-1]) + "\n")
  elif damage == "truncate":
    ims.write_bytes(ims.read_bytes()[:-1000])
  elif damage == "width":
    np.save(ims, np.zeros((4, 36, 1024), np.float32))
  elif damage == "missing":
    caps.unlink()
  elif damage == "grid_shape":
    inputs = "grid+regions"
    np.save(precomp_root / "train_grid.npy", np.zeros((3, 49, DIM), np.float32))
  with pytest.raises(raw.DataError, match=match):
    data_lib.read_raw_split(_config("precomp", precomp_root, inputs=inputs), "train")


# ------------------------------------------------------------------------------ VLP


def _write_vlp(root, name, splits, seed=0):
  """Karpathy JSON + features + box file; returns {stem: (feats, boxes, cls)}."""
  rng = np.random.default_rng(seed)
  images, truth = [], {}
  for split, n in splits:
    for i in range(n):
      stem = (f"{1000 + len(images)}" if name == "f30k" else
              f"COCO_{'val' if split != 'train' else 'train'}2014_{len(images) * 37:012d}")
      sents = [{"raw": f"The {split} Picture {i}, sentence {j}!"} for j in range(5)]
      if name == "coco" and i == 0:
        sents.append({"raw": "a sixth sentence is dropped"})
      images.append({"filename": stem + ".jpg", "split": split, "sentences": sents})
      truth[stem] = _detections(rng)
  fname = "dataset_flickr30k.json" if name == "f30k" else "dataset_coco.json"
  (root / fname).write_text(json.dumps({"images": images}))
  with h5py.File(root / (F30K_BOX if name == "f30k" else COCO_BOX), "w") as f:
    for stem, (_, boxes, _) in truth.items():
      f[stem] = boxes
  if name == "f30k":
    (root / "trainval").mkdir()
    for stem, (feats, _, cls) in truth.items():
      np.save(root / "trainval" / f"{stem}.npy", feats)
      np.save(root / "trainval" / f"{stem}_cls_prob.npy", cls)
  else:
    (root / "feat_cls_1000").mkdir()
    for stem, (feats, _, cls) in truth.items():
      with h5py.File(root / f"{COCO_PREFIX}_feat{stem[-3:]}.h5", "a") as f:
        f[stem] = feats
      with h5py.File(root / f"{COCO_PREFIX}_cls{stem[-3:]}.h5", "a") as f:
        f[stem] = cls
  return truth


@pytest.fixture
def f30k_root(tmp_path):
  truth = _write_vlp(tmp_path, "f30k", [("train", 3), ("val", 2), ("test", 2)])
  return tmp_path, truth


def test_vlp_f30k_round_trip(f30k_root):
  root, truth = f30k_root
  c = _config("vlp", root, encoder="gru", num_regions=16, max_len=12)
  split = data_lib.load_split(c, "dev", str(root / "work"))
  assert list(split.image_ids) == ["1003", "1004"]
  assert split.texts[6] == "The val Picture 1, sentence 1!"
  # As wide as the longest caption, cut at data.max_len=12.
  assert split.input_ids.shape == (10, min(12, int(split.token_counts.max())))
  batch = split.images([1, 0])
  for row, stem in enumerate(["1004", "1003"]):
    feats, boxes, cls = truth[stem]
    np.testing.assert_array_equal(batch["regions"][row, :NDET], feats)
    assert not batch["regions"][row, NDET:].any()  # padded to 16
    np.testing.assert_array_equal(batch["region_pos"][row, :NDET], region_pos(boxes, cls))
    np.testing.assert_array_equal(batch["region_mask"][row], np.arange(16) < NDET)
  # Cut to fewer regions; region_pos still normalised over all of the image's boxes.
  cut = vlp.read_raw_split(_config("vlp", root, num_regions=5), "test").read_images([0])
  feats, boxes, cls = truth["1005"]
  np.testing.assert_array_equal(cut["regions"][0], feats[:5])
  np.testing.assert_array_equal(cut["region_pos"][0], region_pos(boxes, cls)[:5])
  assert cut["region_mask"].all()
  assert pickle.loads(pickle.dumps(split.read_images))([0])["regions"].shape == (1, 16, DIM)


def test_vlp_coco_round_trip(tmp_path):
  truth = _write_vlp(tmp_path, "coco", [("train", 2), ("restval", 2), ("val", 1),
                                        ("test", 3)])
  c = _config("vlp", tmp_path, name="coco", num_regions=NDET)
  train = data_lib.read_raw_split(c, "train")
  stems = list(truth)
  assert list(train.image_ids) == stems[:4]  # train + restval
  assert len(train.texts) == 20 and "sixth" not in " ".join(train.texts)
  test, testall = (data_lib.read_raw_split(c, s) for s in ("test", "testall"))
  assert list(test.image_ids) == list(testall.image_ids) == stems[5:]
  batch = test.read_images(np.array([2]))
  feats, boxes, cls = truth[stems[7]]
  np.testing.assert_array_equal(batch["regions"][0], feats)
  np.testing.assert_array_equal(batch["region_pos"][0], region_pos(boxes, cls))


@pytest.mark.parametrize("damage, match", [
    ("no_cls", r"trainval/1001_cls_prob\.npy: missing"),
    ("truncate", r"trainval/1001\.npy: cannot read as \.npy"),
    ("width", r"trainval/1001\.npy: expected region features of image 1001 of shape "
              r"\(\*, 2048\), got \(12, 1000\)"),
    ("cls_rows", r"1001_cls_prob\.npy: expected class probabilities of image 1001 of shape "
                 r"\(12, 1601\), got \(10, 1601\)"),
    ("no_key", F30K_BOX.replace(".", r"\.") + r": no key '1001'"),
    ("box_width", F30K_BOX.replace(".", r"\.") + r": key '1001': expected boxes .*"
                  r"\(12, 6\), got \(12, 5\)"),
])
def test_vlp_errors_name_file_and_key(f30k_root, damage, match):
  root, _ = f30k_root
  feat = root / "trainval" / "1001.npy"
  if damage == "no_cls":
    (root / "trainval" / "1001_cls_prob.npy").unlink()
  elif damage == "truncate":
    feat.write_bytes(feat.read_bytes()[:5000])
  elif damage == "width":
    np.save(feat, np.zeros((NDET, 1000), np.float32))
  elif damage == "cls_rows":
    np.save(root / "trainval" / "1001_cls_prob.npy", np.zeros((10, NCLS), np.float32))
  elif damage in ("no_key", "box_width"):
    with h5py.File(root / F30K_BOX, "a") as f:
      del f["1001"]
      if damage == "box_width":
        f["1001"] = np.zeros((NDET, 5), np.float32)
  c = _config("vlp", root)
  split = vlp.read_raw_split(c, "train", check_files=False)
  split.read_images(np.array([0]))  # image 1000 is intact
  with pytest.raises(raw.DataError, match=match):
    split.read_images(np.array([0, 1, 2]))
  if damage in ("no_cls", "no_key"):  # the default up-front check catches holes early
    with pytest.raises(raw.MissingDataError, match=r"1 VLP feature files/keys missing"):
      data_lib.read_raw_split(c, "train")


def test_vlp_layout_errors(f30k_root):
  root, _ = f30k_root
  c = _config("vlp", root)
  with pytest.raises(raw.MissingDataError, match=r"test_grid\.npy: missing.*image_inputs=regions"):
    data_lib.read_raw_split(_config("vlp", root, inputs="grid+regions"), "test")
  with pytest.raises(ValueError, match="expected one of"):
    data_lib.read_raw_split(c, "restval")
  (root / "other_detection_boxes.h5").write_bytes((root / F30K_BOX).read_bytes())
  with pytest.raises(raw.DataError, match=r"2 candidate box files"):
    data_lib.read_raw_split(c, "test")
  (root / "other_detection_boxes.h5").rename(root / "bbox.h5")  # bbox.h5 wins
  assert data_lib.read_raw_split(c, "test").read_images([0])["regions"].shape[0] == 1
  (root / "bbox.h5").unlink()
  (root / F30K_BOX).unlink()
  with pytest.raises(raw.MissingDataError, match=r"bbox\.h5: missing"):
    data_lib.read_raw_split(c, "test")


# ------------------------------------------------------------------------ dispatch


def test_unknown_format_lists_valid_ones(tmp_path):
  with pytest.raises(ValueError, match="synthetic, precomp, vlp"):
    data_lib.load_split(_config("lmdb", tmp_path), "train")


def test_synthetic_dispatch_tokenises_centrally(monkeypatch, tmp_path):
  calls = []

  def fake_reader(config, split_name):
    calls.append(split_name)
    return raw.RawSplit(image_ids=["a", "b"], texts=["x y", "y z"] if split_name == "dev"
                        else ["x x x x", "y y y y"], captions_per_image=1,
                        read_images=lambda idx: {})

  import dsran_jax.data.synthetic as synthetic  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(synthetic, "read_raw_split", fake_reader)
  split = data_lib.load_split(_config("synthetic", tmp_path, max_len=5), "dev",
                              str(tmp_path))
  assert calls == ["dev", "train"]  # train captions read once, for the vocabulary
  assert split.input_ids.tolist() == [[1, 4, 5, 2], [1, 5, 3, 2]]  # z is <unk>


# ------------------------------------------------------------------------ region_pos


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_region_pos_matches_torch(dtype, torch_ref):
  rng = np.random.default_rng(1)
  for _ in range(5):
    _, boxes, cls = _detections(rng, 100)
    boxes[:3, 2] = boxes[:3, 0] - 5  # degenerate boxes: negative area clamps to 0
    boxes, cls = boxes.astype(dtype), cls.astype(dtype)
    ours = region_pos(boxes, cls, dtype=dtype)
    # The authors' get_rcnn on arrays, in the reference process (tests/torchref/layers.py).
    ref = torch_ref("layers.region_pos", boxes=boxes, cls=cls)
    assert ours.shape == (100, 1607) and ref.dtype == dtype
    if dtype == np.float64:
      np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    else:
      # float32 class-prob layer norms reach |40| (a peaked distribution): torch's
      # float32 moments and ours differ by a few ulp there, so the bound is relative.
      assert np.max(np.abs(ours - ref) / np.maximum(1.0, np.abs(ref))) <= 1e-6
      np.testing.assert_allclose(ours[:, :6], ref[:, :6], rtol=0, atol=1e-6)
    assert region_pos(boxes, cls).dtype == np.float32


# ----------------------------------------------------------------------------- check


def _run_check(config_file, root, *extra):
  return subprocess.run(
      [sys.executable, "-m", "dsran_jax.data.check", f"--config={config_file}",
       f"--config.data.root={root}", *extra],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def test_check_cli(f30k_root, tmp_path_factory):
  root, _ = f30k_root
  cfg = tmp_path_factory.mktemp("cfg") / "vlp_f30k.py"
  cfg.write_text(textwrap.dedent("""
      from dsran_jax.default_config import get_base_config

      def get_config():
        c = get_base_config()
        c.data.format = "vlp"
        c.data.name = "f30k"
        c.data.max_len = 8
        c.model.dsran.text_encoder = "gru"
        c.model.dsran.image_inputs = "regions"
        return c
  """))
  good = _run_check(cfg, root)
  assert good.returncode == 0, good.stdout + good.stderr
  assert "OK" in good.stdout
  assert "train" in good.stdout and " 15 " in good.stdout  # 3 images, 15 captions
  (root / "trainval" / "1001_cls_prob.npy").unlink()
  np.save(root / "trainval" / "1006.npy", np.full((NDET, DIM), np.nan, np.float32))
  bad = _run_check(cfg, root)
  assert bad.returncode == 1, bad.stdout + bad.stderr
  assert "1001_cls_prob.npy: missing" in bad.stdout
  assert "image 1006: NaN/inf in 'regions'" in bad.stdout
  assert "FAILED" in bad.stdout and "train" in bad.stdout.split("FAILED")[1]
