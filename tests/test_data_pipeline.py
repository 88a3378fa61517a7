"""tf.data pipelines: exact eval coverage, reproducible training order, host sharding, TFDS."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dsran_jax import default_config
from dsran_jax.data import base, pipeline, synthetic

L = 6  # tokens per caption in the dummy splits


def _fake_split(num_images, captions_per_image=5, regions=3, dim=4, name="train"):
  """A Split whose arrays encode their index, so every row can be traced back."""
  n_cap = num_images * captions_per_image

  def read_images(idx):
    idx = np.asarray(idx)
    f = idx.astype(np.float32)[:, None, None]
    return {
        "grid": np.broadcast_to(f, (len(idx), 49, dim)).copy(),
        "regions": np.broadcast_to(f + 0.5, (len(idx), regions, dim)).copy(),
        "region_pos": np.broadcast_to(-f, (len(idx), regions, 1607)).copy(),
        "region_mask": np.ones((len(idx), regions), bool),
    }

  ids = (np.arange(n_cap, dtype=np.int32)[:, None] * 10 + np.arange(L)).astype(np.int32)
  return base.Split(
      name=name, image_ids=[f"img{i}" for i in range(num_images)],
      texts=[f"caption {c}" for c in range(n_cap)], input_ids=ids,
      attention_mask=np.ones((n_cap, L), np.int32),
      captions_per_image=captions_per_image, read_images=read_images)


def _config(batch_size=8, seed=0, shuffle_buffer=0):
  c = default_config.get_base_config()
  c.train.batch_size = batch_size
  c.train.seed = seed
  c.data.shuffle_buffer = shuffle_buffer
  c.data.prefetch = 2
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


@pytest.mark.parametrize("num_images,batch_size", [(23, 5), (4, 8), (10, 10)])
def test_eval_image_batches_cover_every_image_once_in_order(num_images, batch_size):
  split = _fake_split(num_images)
  batches = list(pipeline.eval_image_batches(split, batch_size))
  assert len(batches) == -(-num_images // batch_size)
  for b in batches:
    assert b["regions"].shape == (batch_size, 3, 4) and b["valid"].dtype == bool
    np.testing.assert_array_equal(b["grid"][:, 0, 0], b["image_index"])
  valid = np.concatenate([b["valid"] for b in batches])
  index = np.concatenate([b["image_index"] for b in batches])
  np.testing.assert_array_equal(index[valid], np.arange(num_images))
  assert valid.sum() == num_images and not np.any(valid[num_images:])


def test_eval_caption_batches_and_image_inputs():
  split = _fake_split(7, captions_per_image=5)
  batches = list(pipeline.eval_caption_batches(split, 16))
  valid = np.concatenate([b["valid"] for b in batches])
  index = np.concatenate([b["caption_index"] for b in batches])[valid]
  np.testing.assert_array_equal(index, np.arange(35))
  ids = np.concatenate([b["input_ids"] for b in batches])[valid]
  np.testing.assert_array_equal(ids, split.input_ids)
  assert set(batches[0]) == {"input_ids", "attention_mask", "caption_index", "valid"}
  b = next(pipeline.eval_image_batches(split, 4, ("regions", "region_pos", "region_mask")))
  assert "grid" not in b and {"regions", "region_pos", "region_mask"} <= set(b)


def test_train_batches_content_and_epoch_coverage():
  split = _fake_split(10)  # 50 captions, batch 8: 6 steps per epoch, 2 dropped
  config = _config()
  assert pipeline.steps_per_epoch(split, config) == 6
  batches = _take(pipeline.train_batches(split, config, process_index=0, process_count=1), 6)
  b = batches[0]
  assert set(b) == {"grid", "regions", "region_pos", "region_mask", "input_ids",
                    "attention_mask", "image_index", "caption_index"}
  np.testing.assert_array_equal(b["image_index"], b["caption_index"] // 5)
  np.testing.assert_array_equal(b["grid"][:, 0, 0], b["image_index"])
  np.testing.assert_array_equal(b["input_ids"][:, 0], b["caption_index"] * 10)
  seen = np.concatenate([b["caption_index"] for b in batches])
  assert len(set(seen.tolist())) == 48  # one epoch: no caption twice
  config.model.dsran.image_inputs = "regions"
  b = next(pipeline.train_batches(split, config, process_index=0, process_count=1))
  assert "grid" not in b


def _order(split, config, start_step=0, steps=14, **kw):
  kw.setdefault("process_index", 0)
  kw.setdefault("process_count", 1)
  it = pipeline.train_batches(split, config, start_step=start_step, **kw)
  return np.stack([b["caption_index"] for b in _take(it, steps)])


def test_train_order_is_a_function_of_seed():
  split = _fake_split(10)
  a = _order(split, _config(seed=0))
  np.testing.assert_array_equal(a, _order(split, _config(seed=0)))
  assert not np.array_equal(a, _order(split, _config(seed=1)))
  # Epochs are reshuffled: epoch 1 is not epoch 0 again.
  assert not np.array_equal(a[:6], a[6:12])


def test_start_step_replays_the_tail():
  split = _fake_split(10)
  full = _order(split, _config(), steps=15)
  for k in (1, 5, 6, 11):  # within the first epoch, at and across epoch boundaries
    np.testing.assert_array_equal(_order(split, _config(), start_step=k, steps=15 - k),
                                  full[k:])


def test_process_sharding_partitions_the_global_batch():
  split = _fake_split(10)
  config = _config(batch_size=8)
  full = _order(split, config, steps=8)
  parts = [_order(split, config, steps=8, process_index=p, process_count=2)
           for p in range(2)]
  assert parts[0].shape == (8, 4)
  np.testing.assert_array_equal(np.concatenate(parts, axis=1), full)
  with pytest.raises(ValueError, match="divisible"):
    pipeline.train_batches(split, _config(batch_size=9), process_index=0, process_count=2)


def test_windowed_shuffle_and_errors():
  order = pipeline.epoch_order(100, seed=3, epoch=0, shuffle_buffer=10)
  np.testing.assert_array_equal(np.sort(order), np.arange(100))
  assert not np.array_equal(order, np.arange(100))
  # Each run of 10 consecutive positions holds one window of 10 consecutive captions.
  windows = order.reshape(10, 10) // 10
  assert np.all(windows == windows[:, :1])
  np.testing.assert_array_equal(order, pipeline.epoch_order(100, 3, 0, 10))
  split = _fake_split(10)
  split_order = _order(split, _config(shuffle_buffer=5), steps=6)
  assert len(set(split_order.ravel().tolist())) == 48
  with pytest.raises(ValueError, match="batch_size"):
    pipeline.steps_per_epoch(_fake_split(1), _config(batch_size=8))


def test_process_exits_with_open_iterators():
  # tf.data iterators whose map runs Python deadlock interpreter exit unless closed first.
  code = textwrap.dedent("""
      import sys, time
      sys.path.insert(0, %r)
      import test_data_pipeline as t
      from dsran_jax.data import pipeline
      split = t._fake_split(40)
      fast = split.read_images
      def slow(idx):  # reads still in flight at exit are what used to hang
        time.sleep(0.2)
        return fast(idx)
      split.read_images = slow
      train = pipeline.train_batches(split, t._config(), process_index=0, process_count=1)
      next(train)
      evals = pipeline.eval_image_batches(split, 4)
      next(evals)
      with pipeline.eval_caption_batches(split, 4) as caps:
        next(caps)
      assert next(caps, None) is None  # closed
      print("ok")
  """ % os.path.dirname(__file__))
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_tfds_builder_roundtrip(tmp_path):
  from dsran_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
  config = default_config.get_base_config()
  config.data.format = "synthetic"
  config.data.img_dim = 16
  config.data.synthetic.num_dev_images = 7
  config.data.synthetic.num_regions = 6
  raw = synthetic.read_raw_split(config, "dev")
  n = len(raw.texts)
  lengths = 2 + np.arange(n) % 5
  ids = np.where(np.arange(L) < lengths[:, None], np.arange(n)[:, None] + 100, 0)
  split = base.Split(name="dev", image_ids=raw.image_ids, texts=raw.texts,
                     input_ids=ids.astype(np.int32),
                     attention_mask=(ids > 0).astype(np.int32),
                     captions_per_image=5, read_images=raw.read_images)
  name = tfds_builder.dataset_config_name(config, "dev")
  path = tfds_builder.build_split(split, str(tmp_path), name)
  assert path.startswith(str(tmp_path))
  config.data.tfds_dir = str(tmp_path)
  config.data.max_len = L
  packed = tfds_builder.load_tfds_split(config, "dev")
  assert packed.texts == list(raw.texts) and packed.image_ids == list(raw.image_ids)
  np.testing.assert_array_equal(packed.input_ids, split.input_ids)
  np.testing.assert_array_equal(packed.attention_mask, split.attention_mask)
  idx = np.array([6, 0, 3, 3])
  want, got = raw.read_images(idx), packed.images(idx)
  assert set(got) == set(want)
  for k in want:
    assert got[k].dtype == want[k].dtype
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  adapter = tfds_builder.read_raw_split(config, "dev")
  assert adapter.texts == list(raw.texts) and adapter.captions_per_image == 5
  # Through the eval pipeline: identical batches from raw and packed splits.
  for a, b in zip(pipeline.eval_image_batches(split, 4),
                  pipeline.eval_image_batches(packed, 4)):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  with pytest.raises(FileNotFoundError, match="metadata.json"):
    tfds_builder.load_tfds_split(config, "test")


def test_tfds_builder_omits_all_zero_arrays(tmp_path):
  from dsran_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
  split = _fake_split(5, captions_per_image=1, name="test")

  def no_pos(idx):
    out = _fake_split(5).read_images(idx)
    out["region_pos"] = np.zeros_like(out["region_pos"])
    return out

  split.read_images = no_pos
  tfds_builder.build_split(split, str(tmp_path), "precomp_f30k_test")
  config = default_config.get_base_config()
  config.data.format, config.data.name = "precomp", "f30k"
  config.data.tfds_dir, config.data.max_len = str(tmp_path), L
  packed = tfds_builder.load_tfds_split(config, "test")
  got = packed.images(np.arange(5))
  np.testing.assert_array_equal(got["region_pos"], np.zeros((5, 3, 1607), np.float32))
  np.testing.assert_array_equal(got["grid"][:, 0, 0], np.arange(5))


def test_load_split_reads_the_packed_copy_when_tfds_dir_is_set(tmp_path, minilm_dir):
  from dsran_jax import data  # pylint: disable=g-import-not-at-top
  from dsran_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
  config = default_config.get_base_config()
  config.data.format = "synthetic"
  config.data.img_dim = 16
  config.data.synthetic.num_dev_images = 3
  config.data.synthetic.num_regions = 4
  config.model.dsran.bert_path = minilm_dir
  direct = data.load_split(config, "dev")
  tfds_builder.build_split(direct, str(tmp_path), tfds_builder.dataset_config_name(config, "dev"))
  config.data.tfds_dir = str(tmp_path)
  packed = data.load_split(config, "dev")
  assert packed.texts == direct.texts
  np.testing.assert_array_equal(packed.input_ids, direct.input_ids)
  for k, v in direct.images([2, 0]).items():
    np.testing.assert_array_equal(packed.images([2, 0])[k], v, err_msg=k)
