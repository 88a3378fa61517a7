"""ResNet (models/common/resnet.py) and its weight maps: parity with transformers'
PyTorch `ResNetModel` (random weights, non-trivial BatchNorm statistics), which runs in
the jax-free reference process (tests/torchref/resnet.py); torch is never imported here.

Inputs are real JPEG and PNG files decoded by the extractor's own decode path.
"""
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dsran_jax import extract
from dsran_jax.models.common import resnet

# Small widths and depths, but every kind of block: a projected shortcut without stride
# (stage 1), strided projections (stages 2-4) and identity shortcuts (stages 1 and 3).
SMALL = dict(depths=(2, 1, 2, 1), hidden_sizes=(32, 64, 128, 256), embedding_size=16)
SMALL_CONFIG = resnet.ResNetConfig(depths=(2, 1, 2, 1), widths=(8, 16, 32, 64),
                                   stem_width=16)
REL_TOL = 1e-4


def write_images(directory) -> list:
  """Smooth random pictures as real files: JPEG and PNG, non-square, several sizes and
  modes (RGB, grayscale, RGBA, palette; one smaller than the 256 resize)."""
  rng = np.random.default_rng(0)
  specs = [("a.jpg", (320, 240), "RGB"), ("b.png", (241, 389), "RGB"),
           ("c.png", (500, 257), "RGBA"), ("d.jpg", (300, 300), "L"),
           ("e.png", (180, 121), "P")]
  paths = []
  for name, size, mode in specs:
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    im = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
    noisy = np.asarray(im, np.int16) + rng.integers(-20, 21, (size[1], size[0], 3))
    im = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    if mode == "RGBA":
      im.putalpha(Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)))
    elif mode in ("L", "P"):
      im = im.convert(mode)
    path = os.path.join(directory, name)
    im.save(path, quality=92) if name.endswith(".jpg") else im.save(path)
    paths.append(path)
  return paths


def rel_err(got, want) -> float:
  """max |got - want| / max |want|."""
  return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def assert_close(got, want, what):
  err = rel_err(got, want)
  print(f"{what}: max rel err {err:.2e} (scale {np.max(np.abs(want)):.3g})")
  assert err < REL_TOL, f"{what}: relative error {err:.2e} >= {REL_TOL}"


def apply(config, variables, pixels, train=False):
  model = resnet.ResNet(config)
  fn = jax.jit(lambda v, x: model.apply(v, x, train=train,
                                        mutable=["batch_stats"] if train else False))
  return jax.device_get(fn(variables, jnp.asarray(pixels)))


@pytest.fixture(scope="module")
def pixels(tmp_path_factory):
  paths = write_images(str(tmp_path_factory.mktemp("images")))
  return np.stack([extract.decode_image(p) for p in paths])


@pytest.fixture(scope="module")
def small(torch_ref, pixels, tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("small_ref"))
  return model_dir, torch_ref("resnet.build", model_dir=model_dir, calib_pixels=pixels[:2],
                              write_pth=True, **SMALL)


def _map_keys(keys, layout):
  paths = {}
  for key in keys:
    rules = resnet._COMPILED_MAP[layout]  # pylint: disable=protected-access
    for pattern, target, transform in rules:
      m = pattern.match(key)
      if m:
        paths[key] = (target(m), transform)
        break
    else:
      raise AssertionError(f"{layout}: no rule for {key}")
  return paths


@pytest.mark.parametrize("config", [SMALL_CONFIG, resnet.ResNetConfig()],
                         ids=["small", "resnet152"])
@pytest.mark.parametrize("layout", ["torchvision", "hf"])
def test_weight_map_covers_every_variable(config, layout):
  """The expected torch keys map one-to-one onto ResNet's variables, with their shapes."""
  keys = resnet.torch_keys(config, layout)
  targets = resnet.variable_shapes(config)
  mapped = _map_keys(keys, layout)
  paths = [p for p, _ in mapped.values()]
  assert len(set(paths)) == len(paths) == len(targets)
  assert set(paths) == set(targets)
  for key, (path, transform) in mapped.items():
    assert transform(np.zeros(keys[key], np.float32)).shape == targets[path], key
  if config == resnet.ResNetConfig():
    # torchvision's resnet152 state dict: 155 convs + 155 BNs x 5 + fc.{weight,bias} = 932
    # keys; the trunk drops num_batches_tracked and fc.
    assert len(keys) + 155 + 2 == 932
    assert keys.get("layer3.35.conv2.weight" if layout == "torchvision" else
                    "encoder.stages.2.layers.35.layer.1.convolution.weight") == (256, 256, 3, 3)


def test_torchvision_layout_and_config_inference(small):
  """The reference's torchvision-named state dict holds exactly the keys the map
  expects (plus the dropped ones), and both layouts give the same config."""
  _, ref = small
  tv_keys = set(ref["tv_keys"])
  expected = set(resnet.torch_keys(SMALL_CONFIG, "torchvision"))
  dropped = {k for k in tv_keys if k.endswith("num_batches_tracked")} | {"fc.weight",
                                                                         "fc.bias"}
  assert tv_keys - dropped == expected
  assert len(dropped) == 2 + sum(k.endswith(".running_mean") for k in expected)
  for name in ("conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight",
               "layer1.0.downsample.1.running_mean", "layer4.0.conv3.weight"):
    assert name in tv_keys
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  for path in (ref["tv"], ref["hf"]):
    assert resnet.infer_config(load_file(path)) == SMALL_CONFIG


def test_eval_parity_small(small, pixels, torch_ref):
  """Eval-mode map and pool equal the reference, from either layout's file."""
  model_dir, ref = small
  config, v_tv = resnet.load_weights(ref["tv"])
  config_hf, v_hf = resnet.load_weights(ref["hf"])
  config_pth, v_pth = resnet.load_weights(ref["tv_pth"])  # torch.save'd; read without torch
  assert config == config_hf == config_pth == SMALL_CONFIG
  jax.tree.map(np.testing.assert_array_equal, v_tv, v_hf)
  jax.tree.map(np.testing.assert_array_equal, v_tv, v_pth)
  want = torch_ref("resnet.forward", model_dir=model_dir, pixels_nhwc=pixels)
  fmap, pooled = apply(config, v_tv, pixels)
  assert fmap.shape == (len(pixels), 7, 7, 256) == want["map"].shape
  assert_close(fmap, want["map"], "small eval map")
  assert_close(pooled, want["pooled"], "small eval pooled")
  grid = resnet.grid_cells(fmap)
  np.testing.assert_array_equal(grid[:, 7 * 3 + 5], fmap[:, 3, 5])  # cell 7*row+col
  # bf16 convs (fp32 params and BN): bf16's 8-bit mantissa compounds through the random
  # net to a few % (measured 5e-2), far from garbage (~1) and not fp32 (~1e-6).
  model = resnet.ResNet(config, dtype=jnp.bfloat16)
  fmap16, _ = jax.device_get(jax.jit(model.apply)(v_tv, jnp.asarray(pixels[:2])))
  err = float(np.linalg.norm(fmap16 - want["map"][:2]) / np.linalg.norm(want["map"][:2]))
  print(f"small eval map, bf16: relative L2 error {err:.2e}")
  assert fmap16.dtype == np.float32 and 1e-4 < err < 0.15


def test_train_mode_batchnorm_parity(small, pixels, torch_ref):
  """train=True normalises with batch statistics and updates the running stats as
  PyTorch's BatchNorm2d in train mode (momentum 0.1, unbiased running variance)."""
  model_dir, ref = small
  x = pixels[:3, 16:112, 40:120]  # 96x80: non-square, and small enough for 1 core
  want = torch_ref("resnet.forward", model_dir=model_dir, pixels_nhwc=x, train=True)
  _, variables = resnet.load_weights(ref["hf"])
  (fmap, pooled), updated = apply(SMALL_CONFIG, variables, x, train=True)
  assert_close(fmap, want["map"], "train-mode map")
  assert_close(pooled, want["pooled"], "train-mode pooled")
  want_stats = resnet.state_dict_to_variables(want["state"], SMALL_CONFIG)["batch_stats"]
  changed = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                         variables["batch_stats"], updated["batch_stats"])
  assert min(jax.tree.leaves(changed)) > 0  # every running stat moved
  errs = jax.tree.map(rel_err, updated["batch_stats"], want_stats)
  print(f"train-mode running stats: max rel err {max(jax.tree.leaves(errs)):.2e}")
  assert max(jax.tree.leaves(errs)) < REL_TOL


def test_prefixes_and_embedded_state_dicts(small):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  _, ref = small
  tv, hf = load_file(ref["tv"]), load_file(ref["hf"])
  base = resnet.state_dict_to_variables(tv)
  for prefix in ("module.", "cnn.module."):
    v = resnet.state_dict_to_variables({prefix + k: a for k, a in tv.items()})
    jax.tree.map(np.testing.assert_array_equal, v, base)
  # HF ResNetForImageClassification: trunk under `resnet.`, its head beside it.
  head = {"resnet." + k: a for k, a in hf.items()}
  head["classifier.1.weight"] = np.zeros((1000, 256), np.float32)
  head["classifier.1.bias"] = np.zeros((1000,), np.float32)
  jax.tree.map(np.testing.assert_array_equal, resnet.state_dict_to_variables(head), base)
  # MLASM's image encoder: the CNN under `cnn.module.` beside trained layers.
  img_enc = {"cnn.module." + k: a for k, a in tv.items() if not k.startswith("fc.")}
  img_enc.update({"fc.weight": np.zeros((1024, 256)), "fc_attn_i.weight": np.zeros((4, 4))})
  v = resnet.state_dict_to_variables(img_enc, prefix="cnn.module.", ignore_outside_prefix=True)
  jax.tree.map(np.testing.assert_array_equal, v, base)
  with pytest.raises(ValueError, match=r"fc_attn_i\.weight \(outside the prefix"):
    resnet.state_dict_to_variables(img_enc)


def test_weight_errors_name_the_torch_key(small, tmp_path):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  _, ref = small
  tv = load_file(ref["tv"])

  def fails(state, *patterns, **kw):
    with pytest.raises(ValueError) as e:
      resnet.state_dict_to_variables(state, **kw)
    for p in patterns:
      assert p in str(e.value), (p, str(e.value))
    return str(e.value)

  missing = {k: v for k, v in tv.items() if k != "layer2.0.bn2.running_var"}
  fails(missing, "1 missing keys", "layer2.0.bn2.running_var")
  fails({"module." + k: v for k, v in missing.items()}, "module.layer2.0.bn2.running_var")
  fails({**tv, "layer1.0.conv4.weight": tv["layer1.0.conv3.weight"]},
        "1 unexpected keys", "layer1.0.conv4.weight")
  extra_block = {**tv, "layer3.2.conv1.weight": tv["layer3.1.conv1.weight"]}
  fails(extra_block, "layer3.2.conv1.weight (not in", config=SMALL_CONFIG)
  # Inferred from the keys, the third block exists and the rest of it is missing.
  fails(extra_block, "depths=(2, 1, 3, 1)", "missing keys", "layer3.2.bn3.running_var")
  bad = dict(tv)
  bad["layer1.1.conv2.weight"] = np.ascontiguousarray(tv["layer1.1.conv2.weight"][:, :4])
  fails(bad, "layer1.1.conv2.weight: shape (8, 4, 3, 3) in the checkpoint", "expects (8, 8, 3, 3)")
  # A ResNet-152-shaped expectation against the small weights: every key is off.
  text = fails(tv, "conv1.weight: shape (16, 3, 7, 7)", "expects (64, 3, 7, 7)",
               config=resnet.ResNetConfig())
  assert "missing keys" in text and "layer3.35.conv3.weight" in text
  basic = {k: v for k, v in tv.items() if ".conv3." not in k and ".bn3." not in k}
  with pytest.raises(ValueError, match=r"layer1\.0\.conv3\.weight: missing.*basic-block"):
    resnet.infer_config(basic)
  fails({k: v for k, v in tv.items() if k != "conv1.weight"}, "cannot tell the ResNet layout")
  # Through a file: the error names the file and the key.
  path = str(tmp_path / "missing.safetensors")
  save_file(missing, path)
  with pytest.raises(ValueError, match=r"(?s)missing\.safetensors: .*layer2\.0\.bn2\.running_var"):
    resnet.load_weights(path)
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    resnet.load_weights(str(tmp_path / "nope.pth"))
  truncated = tmp_path / "truncated.pth"
  with open(ref["tv_pth"], "rb") as f:
    truncated.write_bytes(f.read()[:5000])
  with pytest.raises(ValueError, match=r"truncated\.pth"):
    resnet.load_weights(str(truncated))
  with pytest.raises(ValueError, match=r"weights\.npz: unknown weights format"):
    (tmp_path / "weights.npz").write_bytes(b"x")
    resnet.load_weights(str(tmp_path / "weights.npz"))


def test_resnet152_real_depth_parity(torch_ref, pixels, tmp_path):
  """Full ResNet-152 (depths 3/8/36/3, 2048 channels) in torchvision's layout."""
  t0 = time.time()
  model_dir = str(tmp_path / "r152")
  ref = torch_ref("resnet.build", model_dir=model_dir, depths=(3, 8, 36, 3),
                  hidden_sizes=(256, 512, 1024, 2048), embedding_size=64,
                  calib_pixels=pixels[2:4])
  x = pixels[:2]
  want = torch_ref("resnet.forward", model_dir=model_dir, pixels_nhwc=x)
  t_ref = time.time() - t0
  config, variables = resnet.load_weights(ref["tv"])
  assert config == resnet.ResNetConfig() and config.describe() == "resnet152"
  fmap, pooled = apply(config, variables, x)
  assert fmap.shape == (2, 7, 7, 2048) and pooled.shape == (2, 2048)
  assert_close(fmap, want["map"], "resnet152 map")
  assert_close(pooled, want["pooled"], "resnet152 pooled")
  print(f"resnet152: reference {t_ref:.1f} s, jax {time.time() - t0 - t_ref:.1f} s")
