"""`python -m dsran_jax.extract`: decode, features against the PyTorch reference
(tests/torchref/resnet.py, jax-free process), output layout, errors and resume."""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from _xla_flags import subprocess_env

from dsran_jax import extract
from dsran_jax.data import global_feat, grid as grid_lib, raw
from test_resnet import SMALL, assert_close, write_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHANNELS = SMALL["hidden_sizes"][-1]


# ----------------------------------------------------------------------------- decode

def torchvision_eval_transform(path: str) -> np.ndarray:
  """Resize(256) / CenterCrop(224) / ToTensor / Normalize(ImageNet), written from
  torchvision's definitions on a PIL image, independently of dsran_jax.extract;
  returns HWC."""
  img = Image.open(path).convert("RGB")
  w, h = img.size
  if w <= h:
    size = (256, int(256 * h / w))
  else:
    size = (int(256 * w / h), 256)
  img = img.resize(size, Image.BILINEAR)  # torchvision's PIL path: Image.resize
  a = np.array(img)  # (H, W, 3) uint8
  top = int(round((a.shape[0] - 224) / 2.0))
  left = int(round((a.shape[1] - 224) / 2.0))
  a = a[top:top + 224, left:left + 224]
  t = a.astype(np.float32) / np.float32(255)  # ToTensor
  mean = np.float32([0.485, 0.456, 0.406])
  std = np.float32([0.229, 0.224, 0.225])
  return (t - mean) / std  # Normalize: sub_(mean).div_(std), float32


def test_decode_equals_torchvision_transform(tmp_path):
  paths = write_images(str(tmp_path))
  for path in paths:
    got = extract.decode_image(path)
    assert got.shape == (224, 224, 3) and got.dtype == np.float32
    np.testing.assert_array_equal(got, torchvision_eval_transform(path), err_msg=path)
  # The sizes and crop offsets, by hand: truncation of the long side, and Python's
  # round-half-to-even for the crop (341 - 224 = 117 -> 58.5 -> 58; 413 - 224 -> 94.5 -> 94).
  assert extract.resized_size(320, 240) == (341, 256)
  assert extract.resized_size(241, 389) == (256, 413)
  assert extract.resized_size(180, 121) == (380, 256)
  assert extract.center_crop_box(341, 256) == (58, 16, 282, 240)
  assert extract.center_crop_box(256, 413) == (16, 94, 240, 318)
  assert extract.center_crop_box(499, 256) == (138, 16, 362, 240)


# ----------------------------------------------------------------------------- extraction

@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("imgs"))
  write_images(d)
  with open(os.path.join(d, "notes.txt"), "w", encoding="utf-8") as f:
    f.write("not an image\n")  # skipped: not an image suffix
  return d


@pytest.fixture(scope="module")
def ref(torch_ref, images_dir, tmp_path_factory):
  """A small random reference model (torchvision .safetensors/.pth, HF .safetensors)
  and its outputs on the directory's images, decoded by the extractor."""
  model_dir = str(tmp_path_factory.mktemp("extract_ref"))
  names = sorted(n for n in os.listdir(images_dir) if not n.endswith(".txt"))
  pixels = np.stack([extract.decode_image(os.path.join(images_dir, n)) for n in names])
  files = torch_ref("resnet.build", model_dir=model_dir, calib_pixels=pixels[:2],
                    write_pth=True, seed=3, **SMALL)
  out = torch_ref("resnet.forward", model_dir=model_dir, pixels_nhwc=pixels)
  return {"names": names, "grid": out["map"].reshape(len(names), 49, CHANNELS),
          "global": out["pooled"], **files}


def test_extract_matches_reference_and_layout(images_dir, ref, tmp_path):
  out = str(tmp_path / "feats")
  summary = extract.run(images_dir, ref["tv"], out, split="test", batch_size=2,
                        show_progress=False)
  n = len(ref["names"])
  assert summary["num_images"] == summary["extracted"] == n and summary["resumed_from"] == 0
  with open(os.path.join(out, "test_images.txt"), encoding="utf-8") as f:
    assert f.read().splitlines() == ref["names"]  # sorted; notes.txt skipped
  grid = np.load(os.path.join(out, "test_grid.npy"))
  glob = np.load(os.path.join(out, "test_global.npy"))
  assert grid.shape == (n, 49, CHANNELS) and grid.dtype == np.float32
  assert glob.shape == (n, CHANNELS) and glob.dtype == np.float32
  assert_close(grid, ref["grid"], "extractor grid")
  assert_close(glob, ref["global"], "extractor global")
  np.testing.assert_allclose(glob, grid.mean(axis=1), rtol=1e-5, atol=1e-5)
  with open(os.path.join(out, "test_extract.json"), encoding="utf-8") as f:
    record = json.load(f)
  assert record["done"] == n and record["complete"]
  # The readers take the files as written (memmaps, shape checked).
  from ml_collections import ConfigDict  # pylint: disable=g-import-not-at-top
  config = ConfigDict({"data": {"root": out, "grid_file": "", "global_file": "",
                                "img_dim": CHANNELS}})
  g = grid_lib.open_grid(config, "test", n)
  np.testing.assert_array_equal(grid_lib.read_rows(g, np.array([3, 0])), grid[[3, 0]])
  feats = global_feat.open_global(config, "test", n, global_dim=CHANNELS)
  np.testing.assert_array_equal(global_feat.read_rows(feats, np.array([1])), glob[[1]])
  assert global_feat.open_global(config, "dev", n, CHANNELS) is None
  with pytest.raises(raw.DataError, match=r"test_global\.npy.*\(4, 256\)"):
    global_feat.open_global(config, "test", 4, global_dim=CHANNELS)
  config.data.global_file = os.path.join(out, "{split}_global.npy")
  assert global_feat.global_path(config, "test") == os.path.join(out, "test_global.npy")
  config.data.global_file = out
  assert global_feat.global_path(config, "x") == os.path.join(out, "x_global.npy")


def test_global_reader_require(tmp_path, monkeypatch):
  """`require_global`: None for a model without `global_feat` (DSRAN); for one that
  reads it, a missing file is an error naming it and the command that writes it."""
  from dsran_jax.default_config import get_base_config  # pylint: disable=g-import-not-at-top
  config = get_base_config()
  config.data.root = str(tmp_path)
  assert not global_feat.uses_global(config)
  assert global_feat.require_global(config, "test", 3) is None
  monkeypatch.setattr(global_feat, "uses_global", lambda c: True)
  with pytest.raises(raw.MissingDataError,
                     match=r"test_global\.npy: missing .*\(3, 2048\).*dsran_jax\.extract"):
    global_feat.require_global(config, "test", 3)
  np.save(tmp_path / "test_global.npy", np.ones((3, 2048), np.float32))
  np.testing.assert_array_equal(global_feat.require_global(config, "test", 3), 1.0)


def test_list_file_order_and_relative_paths(images_dir, ref, tmp_path):
  names = ref["names"]
  order = [3, 0, 4, 1]
  lst = tmp_path / "list.txt"
  lines = [os.path.relpath(os.path.join(images_dir, names[i]), tmp_path) for i in order[:3]]
  lines.append(os.path.join(images_dir, names[order[3]]))  # absolute
  lst.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
  out = str(tmp_path / "o")
  extract.run(str(lst), ref["hf"], out, split="dev", batch_size=3, show_progress=False)
  with open(os.path.join(out, "dev_images.txt"), encoding="utf-8") as f:
    assert f.read().splitlines() == lines
  assert_close(np.load(os.path.join(out, "dev_grid.npy")), ref["grid"][order], "list grid")
  assert_close(np.load(os.path.join(out, "dev_global.npy")), ref["global"][order],
               "list global")


def test_resume_after_a_corrupt_image(images_dir, ref, tmp_path, monkeypatch):
  """A corrupt image stops the run naming it; the rows before its batch stay; the
  re-run decodes only the rest and refuses other images or weights."""
  d = tmp_path / "imgs"
  shutil.copytree(images_dir, d)
  good = (d / "c.png").read_bytes()
  (d / "c.png").write_bytes(good[:len(good) // 3])  # truncated PNG: row 2
  out = str(tmp_path / "o")
  with pytest.raises(extract.ImageError, match=r"c\.png: cannot decode image"):
    extract.run(str(d), ref["tv"], out, batch_size=2, show_progress=False)
  with open(os.path.join(out, "test_extract.json"), encoding="utf-8") as f:
    assert json.load(f)["done"] == 2  # the batch of rows 0-1
  first_rows = np.load(os.path.join(out, "test_grid.npy"))[:2].copy()

  (d / "c.png").write_bytes(good)
  decoded = []
  real_decode = extract.decode_image
  monkeypatch.setattr(extract, "decode_image",
                      lambda p, **kw: decoded.append(os.path.basename(p)) or real_decode(p, **kw))
  summary = extract.run(str(d), ref["tv"], out, batch_size=2, show_progress=False)
  assert sorted(decoded) == ref["names"][2:]  # rows 0-1 were not decoded again
  assert summary["resumed_from"] == 2 and summary["extracted"] == len(ref["names"]) - 2
  grid = np.load(os.path.join(out, "test_grid.npy"))
  np.testing.assert_array_equal(grid[:2], first_rows)
  assert_close(grid, ref["grid"], "resumed grid")
  assert_close(np.load(os.path.join(out, "test_global.npy")), ref["global"], "resumed global")
  decoded.clear()
  assert extract.run(str(d), ref["tv"], out, show_progress=False)["extracted"] == 0
  assert not decoded

  (d / "f.jpg").write_bytes((d / "a.jpg").read_bytes())
  with pytest.raises(extract.ResumeError, match=r"different image list \(5 images.*6 now"):
    extract.run(str(d), ref["tv"], out, show_progress=False)
  os.remove(d / "f.jpg")
  with pytest.raises(extract.ResumeError, match=r"other weights .*tv\.safetensors"):
    extract.run(str(d), ref["hf"], out, show_progress=False)
  os.remove(os.path.join(out, "test_extract.json"))
  with pytest.raises(extract.ResumeError, match=r"test_grid\.npy.*without the progress record"):
    extract.run(str(d), ref["tv"], out, show_progress=False)


def test_errors_name_the_file_or_key(images_dir, ref, tmp_path):
  lst = tmp_path / "list.txt"
  lst.write_text(f"{os.path.join(images_dir, 'a.jpg')}\nmissing.jpg\n", encoding="utf-8")
  out = tmp_path / "o"
  with pytest.raises(FileNotFoundError, match=r"missing\.jpg \(line 2 of .*list\.txt\)"):
    extract.run(str(lst), ref["tv"], str(out), show_progress=False)
  assert not out.exists()  # checked before anything is written
  with pytest.raises(FileNotFoundError, match=r"nowhere: no such image directory"):
    extract.run(str(tmp_path / "nowhere"), ref["tv"], str(out), show_progress=False)
  with pytest.raises(FileNotFoundError, match=r"nope\.pth: ResNet weights file not found"):
    extract.run(images_dir, str(tmp_path / "nope.pth"), str(out), show_progress=False)
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  state = load_file(ref["tv"])
  del state["layer3.1.bn2.weight"]
  bad = str(tmp_path / "bad.safetensors")
  save_file(state, bad)
  with pytest.raises(ValueError, match=r"(?s)bad\.safetensors: .*missing keys:\n  "
                     r"layer3\.1\.bn2\.weight"):
    extract.run(images_dir, bad, str(out), show_progress=False)


def _python(args, timeout=300):
  return subprocess.run([sys.executable] + args, capture_output=True, text=True,
                        env=subprocess_env(), cwd=ROOT, timeout=timeout, check=False)


def test_cli_help_and_pth_weights(images_dir, ref, tmp_path):
  """`--help` lists the flags without importing torch; a torchvision `.pth` gives the
  same features, read without torch (the CLI process never imports it)."""
  t = time.time()
  # -X importtime lists every module the process imports (on stderr).
  r = _python(["-X", "importtime", "-m", "dsran_jax.extract", "--help"])
  assert r.returncode in (0, 1), r.stderr[-3000:]  # absl exits 1 after --help
  assert "--images" in r.stdout and "--batch_size" in r.stdout
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines()
              if line.startswith("import time:")}
  assert "dsran_jax.extract" in imported or "absl.flags" in imported
  assert not any(m.split(".")[0] == "torch" for m in imported)
  print(f"--help: {time.time() - t:.1f} s, {len(imported)} modules")
  out = str(tmp_path / "cli")
  r = _python(["-X", "importtime", "-m", "dsran_jax.extract", f"--images={images_dir}",
               f"--weights={ref['tv_pth']}", f"--out={out}", "--split=train",
               "--batch_size=4"])
  assert r.returncode == 0, r.stderr[-3000:]
  imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines()
              if line.startswith("import time:")}
  assert "jax" in imported and "dsran_jax.convert.torch_pickle" in imported
  assert not any(m.split(".")[0] == "torch" for m in imported)
  summary = json.loads(r.stdout.strip().splitlines()[-1])
  assert summary["num_images"] == len(ref["names"]) and summary["network"].startswith("ResNet(")
  assert_close(np.load(os.path.join(out, "train_grid.npy")), ref["grid"], "cli .pth grid")
  assert_close(np.load(os.path.join(out, "train_global.npy")), ref["global"], "cli .pth global")
  r = _python(["-m", "dsran_jax.extract", f"--images={images_dir}", f"--weights={ref['hf']}",
               f"--out={out}", "--split=train"])
  # A user error: one `error:` line naming what is wrong, exit 2, no traceback.
  assert r.returncode == 2 and "error: " in r.stderr and "other weights" in r.stderr
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
