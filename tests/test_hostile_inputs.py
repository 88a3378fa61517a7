"""Hostile and hand-made inputs end quickly, in one line naming the file, key or value
(issue 26): bounded pickle reading, image modes and sizes, hand-edited workdir files,
shortlist and search misuse, float16 sums, over-long queries."""
import os
import struct
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
from test_torch_pickle import TORCH_MAGIC, _str, tensor_pickle, write_zip

from dsran_jax.convert import torch_pickle

BIG = (1 << 31) - 1  # the largest int the hand-written pickles hold (BININT)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(module, *args, timeout=120):
  """`python -m module args` with this checkout first on the path; (rc, stdout, stderr,
  seconds)."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                        text=True, env=env, timeout=timeout, check=False)
  return proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - start


def error_lines(stderr):
  """The `error:` lines of a CLI's stderr (absl may log other lines before them)."""
  return [line for line in stderr.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------ bounded pickles


def nested_shared_list(levels, memo=1_000_000):
  """Pickle opcodes (protocol 2) pushing x, where x = [] and then `levels` times
  x = [x, x]: `levels` lists in the file, 2**(levels+1) - 1 nodes to a tree walk. Memo
  slots from `memo` on, clear of the ones torch.save's pickler uses."""
  out = b"]r" + struct.pack("<I", memo)
  for i in range(1, levels + 1):
    get = b"j" + struct.pack("<I", memo + i - 1)
    out += b"0(" + get + get + b"lr" + struct.pack("<I", memo + i)
  return out


def with_entry(src, dst, key, value_ops):
  """Copies the torch.save zip `src` to `dst` with `key` of its top-level dict set to the
  object `value_ops` push (a SETITEM appended to the dict's last SETITEMS batch: a later
  key wins in a dict, so the entry replaces the saved one)."""
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
    for info in zin.infolist():
      data = zin.read(info)
      if info.filename.endswith("/data.pkl"):
        assert data.endswith(b"u."), data[-20:]
        data = data[:-2] + _str(key) + value_ops + b"u."
      zout.writestr(info, data)


@pytest.fixture(scope="module")
def scan_checkpoint(tmp_path_factory, torch_ref):
  """A tiny valid SCAN checkpoint in the authors' layout (torch.save, zip format)."""
  path = str(tmp_path_factory.mktemp("scan") / "model_best.pth.tar")
  opt = {"embed_size": 16, "word_dim": 8, "img_dim": 12, "cross_attn": "t2i",
         "agg_func": "Mean", "bi_gru": False, "lambda_softmax": 9.0, "lambda_lse": 6.0,
         "data_name": "f30k_precomp"}
  torch_ref("scan.save_checkpoint", path=path, opt=opt, vocab_size=20, seed=0)
  return path


def test_shared_reference_epoch_is_refused_within_seconds_leaving_no_workdir(
    scan_checkpoint, tmp_path):
  """Issue 26 #3: `epoch` = 40 nested levels of x = [x, x] in an 11 KB file ran > 150 s
  and 2 GB (convert_torch's metadata walked 2**41 nodes) and left config.json behind."""
  bomb = str(tmp_path / "bomb.pth.tar")
  with_entry(scan_checkpoint, bomb, "epoch", nested_shared_list(40))
  assert os.path.getsize(bomb) < 16_000
  workdir = str(tmp_path / "workdir")
  rc, out, err, seconds = run_cli("dsran_jax.tools.convert_torch", f"--checkpoint={bomb}",
                                  f"--workdir={workdir}", timeout=120)
  lines = error_lines(err)
  assert rc == 2 and not out, (rc, out, err)
  assert len(lines) == 1 and "Traceback" not in err, err
  assert bomb in lines[0] and "shared references" in lines[0] and "['epoch']" in lines[0]
  assert seconds < 10, seconds  # the process, jax import included (under load)
  assert not os.path.exists(workdir)


def test_non_number_epoch_is_refused_before_the_workdir_is_made(scan_checkpoint, tmp_path):
  """Within the bounds (a 2**13-node list) but not a number: refused naming the key,
  nothing written."""
  odd = str(tmp_path / "odd.pth.tar")
  with_entry(scan_checkpoint, odd, "Eiters", nested_shared_list(12))
  from dsran_jax.convert.engine import ConversionError  # pylint: disable=g-import-not-at-top
  from dsran_jax.tools import convert_torch  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "workdir")
  with pytest.raises(ConversionError, match=r"odd.pth.tar: 'Eiters' is a list, expected"):
    convert_torch.convert_checkpoint(odd, workdir)
  assert not os.path.exists(workdir)


def _bounded_load(tmp_path, obj_ops, name="bounded.pt", **limits):
  path = tmp_path / name
  write_zip(path, b"\x80\x02" + obj_ops + b".")
  start = time.perf_counter()
  try:
    return torch_pickle.load(path, torch_pickle.Limits(**limits))
  finally:
    assert time.perf_counter() - start < 5


def test_depth_alone_is_bounded(tmp_path):
  """100,000 nested lists, no sharing: today a RecursionError called 'corrupt'."""
  ops = b"]" * 100_000 + b"a" * 99_999
  with pytest.raises(torch_pickle.CheckpointTooLargeError,
                     match=r"bounded.pt: containers nest deeper than 100 levels .* at "
                           r"\[0\]\[0\]\[0\]\.\.\.; refusing it"):
    _bounded_load(tmp_path, ops)
  # 99 levels are fine: the bound is on depth, not on lists.
  assert _bounded_load(tmp_path, b"]" * 99 + b"a" * 98, "ok.pt") is not None


def test_object_count_is_bounded(tmp_path):
  """A flat list of 1,100,000 ints (2.2 MB of pickle): more objects than any checkpoint."""
  ops = b"](" + b"K\x07" * 1_100_000 + b"e"
  with pytest.raises(torch_pickle.CheckpointTooLargeError,
                     match=r"holds more than 1000000 objects \(the limit, max_objects"):
    _bounded_load(tmp_path, ops)
  assert len(_bounded_load(tmp_path, b"](" + b"K\x07" * 900_000 + b"e", "ok.pt")) == 900_000


def test_shared_references_are_bounded_and_cycles_refused(tmp_path):
  with pytest.raises(torch_pickle.CheckpointTooLargeError,
                     match=r"shared references expand a list to more than 1000 objects"):
    _bounded_load(tmp_path, nested_shared_list(10), max_objects=1000)
  small = _bounded_load(tmp_path, nested_shared_list(8), "ok.pt", max_objects=1000)
  assert small[0] is small[1]  # shared stays shared
  # x = [x]: a tree walk never ends
  with pytest.raises(torch_pickle.CheckpointError, match=r"a list that contains itself"):
    _bounded_load(tmp_path, b"]q\x00h\x00a", "cycle.pt")


def test_huge_declared_storage_is_refused_before_allocating(tmp_path):
  """A storage of 2**31 - 1 doubles (16 GiB) declared by a few bytes of pickle."""
  path = tmp_path / "huge.pt"
  write_zip(path, tensor_pickle(BIG, 0, [4], [1], storage="DoubleStorage"),
            {"0": b"\0" * 32})
  with pytest.raises(torch_pickle.CheckpointTooLargeError,
                     match=r"huge.pt: storage '0' declares 2147483647 x torch.DoubleStorage "
                           r"\(16.0 GiB\).*more than the limit of 8.0 GiB \(max_bytes\)"):
    torch_pickle.load(path)
  # A zip record whose header claims more bytes than the archive stores (a stored record
  # cannot): declared 1 GiB of floats, 16 bytes present.
  lying = tmp_path / "lying.pt"
  numel = 1 << 28
  write_zip(lying, tensor_pickle(numel, 0, [4], [1]), {"0": b"\0" * 16})
  data = bytearray(lying.read_bytes())
  for signature, size_at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # local, central
    at = data.find(signature)
    while at >= 0:
      name_len = struct.unpack_from("<H", data, at + (26 if size_at == 22 else 28))[0]
      name = bytes(data[at + (30 if size_at == 22 else 46):][:name_len])
      if name.endswith(b"/data/0"):
        struct.pack_into("<I", data, at + size_at, numel * 4)
      at = data.find(signature, at + 4)
  lying.write_bytes(bytes(data))
  with pytest.raises(torch_pickle.CheckpointError,
                     match=r"lying.pt: storage record archive/data/0 declares 1073741824 "
                           r"bytes but holds 16 in the archive"):
    torch_pickle.load(lying)


def test_stride_zero_tensor_and_pickle_size_are_bounded(tmp_path):
  # 2**31 - 1 elements viewing one double (stride 0): a view costs nothing, a copy 16 GiB.
  path = tmp_path / "expanded.pt"
  write_zip(path, tensor_pickle(1, 0, [BIG], [0], storage="DoubleStorage"), {"0": b"\0" * 8})
  with pytest.raises(torch_pickle.CheckpointTooLargeError,
                     match=r"expanded.pt: a tensor of shape \(2147483647,\) \(16.0 GiB\) "
                           r"exceeds the limit .* at \['t'\]"):
    torch_pickle.load(path)
  with pytest.raises(torch_pickle.CheckpointTooLargeError,
                     match=r"big.pt: archive/data.pkl is 1.0 MiB, more than the limit of "
                           r"512.0 KiB \(max_pickle_bytes\)"):
    _bounded_load(tmp_path, _str("x" * (1 << 20)), "big.pt", max_pickle_bytes=512 << 10)


def test_legacy_format_shares_the_bounds(tmp_path):
  """The legacy (torch < 1.6) reader counts declared storages against max_bytes too."""
  import pickle  # pylint: disable=g-import-not-at-top
  path = tmp_path / "legacy.pt"
  with open(path, "wb") as f:
    for header in (TORCH_MAGIC, 1001, {"protocol_version": 1001}):
      pickle.dump(header, f, protocol=2)
    f.write(tensor_pickle(BIG, 0, [4], [1], legacy=True, storage="DoubleStorage"))
    pickle.dump(["0"], f, protocol=2)
  with pytest.raises(torch_pickle.CheckpointTooLargeError, match=r"legacy.pt: storage '0' "
                     r"declares 2147483647 x torch.DoubleStorage"):
    torch_pickle.load(path)


# ------------------------------------------------------------------------- images


def png16(path, samples):
  """A 16-bit PNG (gray (H, W) or RGB (H, W, 3) uint16) written by hand: PIL writes
  16-bit grayscale but not 16-bit RGB."""
  import zlib  # pylint: disable=g-import-not-at-top
  h, w = samples.shape[:2]
  color = 0 if samples.ndim == 2 else 2
  raw = b"".join(b"\0" + samples[y].astype(">u2").tobytes() for y in range(h))

  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data)))

  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color,
                                                               0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [1, 3], ids=["gray", "rgb"])
def test_16bit_png_is_extracted_like_its_8bit_version(tmp_path, channels):
  """Issue 26 #5: convert("RGB") clipped 16-bit gray samples at 255, a white image."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from dsran_jax import extract  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  # smooth full-range content, so bilinear resizing keeps a one-level difference at one
  y, x = np.mgrid[0:260, 0:300].astype(np.float64)
  waves = [np.sin(x / rng.uniform(20, 60) + rng.uniform(0, 6))
           * np.cos(y / rng.uniform(20, 60) + rng.uniform(0, 6)) for _ in range(channels)]
  samples = np.round(32767.5 * (1 + np.stack(waves, -1))).astype(np.uint16)
  samples = samples[..., 0] if channels == 1 else samples
  png16(tmp_path / "deep.png", samples)
  Image.fromarray(np.round(samples / 257.0).astype(np.uint8)).save(tmp_path / "flat.png")
  deep = extract.decode_image(str(tmp_path / "deep.png"))
  flat = extract.decode_image(str(tmp_path / "flat.png"))
  assert np.asarray(Image.open(tmp_path / "deep.png")).dtype != np.uint8 or channels == 3
  # One 8-bit level after normalisation; PIL keeps the high byte of 16-bit RGB
  # (floor(v / 256)) where rounding gives round(v / 257), at most one level apart.
  level = 1 / 255 / extract.STD.min()
  np.testing.assert_allclose(deep, flat, rtol=0, atol=1.001 * level)
  assert np.abs(deep - flat).mean() < 0.5 * level
  assert deep.std() > 0.5  # not a white (constant) picture
  if channels == 1:
    np.testing.assert_array_equal(deep, flat)  # the same rounding


@pytest.mark.parametrize("mode", ["I", "F"])
def test_32bit_images_of_no_defined_range_are_refused_naming_file_and_mode(tmp_path, mode):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from dsran_jax import extract  # pylint: disable=g-import-not-at-top
  data = np.arange(300 * 260, dtype=np.int32 if mode == "I" else np.float32)
  Image.fromarray(data.reshape(260, 300)).save(tmp_path / "wide.tif")
  with pytest.raises(extract.ImageError, match=rf"wide.tif: TIFF image of mode {mode} .*"
                     r"has no defined range"):
    extract.decode_image(str(tmp_path / "wide.tif"))


def _png_header_only(path, width, height):
  """A PNG whose header declares width x height 8-bit gray pixels, with one row of image
  data: all that is read of a decompression bomb before it is refused."""
  import zlib  # pylint: disable=g-import-not-at-top

  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data)))

  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + chunk(b"IEND", b""))


def test_pixel_limit_refuses_from_the_header_and_the_flag_raises_it(tmp_path):
  """A 12000x12000 PNG was decoded in full with only PIL's warning."""
  from dsran_jax import extract  # pylint: disable=g-import-not-at-top
  bomb = str(tmp_path / "bomb.png")
  _png_header_only(bomb, 12000, 12000)
  start = time.perf_counter()
  with pytest.raises(extract.ImageError, match=r"bomb.png: 12000x12000 image \(144.0 "
                     r"megapixels\) is larger than the limit of 89.5 megapixels .*raise "
                     r"--max_image_pixels"):
    extract.decode_image(bomb)
  assert time.perf_counter() - start < 1
  # A real picture above a lowered limit is refused; raising the limit lets it through.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  small = str(tmp_path / "small.png")
  Image.new("RGB", (300, 260), (10, 200, 30)).save(small)
  with pytest.raises(extract.ImageError, match=r"small.png: 300x260 image \(0.1 "
                     r"megapixels\) is larger than the limit of 0.0 megapixels"):
    extract.decode_image(small, max_pixels=1000)
  assert extract.decode_image(small, max_pixels=300 * 260).shape == (224, 224, 3)


def test_symlink_loop_named_jpg_is_reported_not_skipped(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from dsran_jax import extract  # pylint: disable=g-import-not-at-top
  images = tmp_path / "images"
  images.mkdir()
  Image.new("RGB", (300, 300)).save(images / "a.png")
  os.symlink("loop.jpg", images / "loop.jpg")
  os.symlink("gone.png", images / "broken.jpg")
  (images / "dir.jpg").mkdir()  # a directory: no image, skipped and counted
  with pytest.raises(FileNotFoundError, match=r"(?s)2 image file\(s\) of .*images cannot be "
                     r"opened:\n  .*broken.jpg: a broken symlink to gone.png: .*\n  "
                     r".*loop.jpg: a symlink loop: Too many levels of symbolic links"):
    extract.list_images(str(images))
  listing = tmp_path / "list.txt"
  listing.write_text("images/a.png\nimages/loop.jpg\n")
  with pytest.raises(FileNotFoundError, match=r"loop.jpg \(line 2 of .*list.txt\): a "
                     r"symlink loop"):
    extract.list_images(str(listing))
  os.remove(images / "loop.jpg")
  os.remove(images / "broken.jpg")
  assert extract.list_images(str(images))[0] == ["a.png"]


# ------------------------------------------------------------ hand-edited config.json


def _scan_workdir(path, edit=None):
  """A workdir holding only the config.json of a SCAN model, edited by `edit(dict)`."""
  import json  # pylint: disable=g-import-not-at-top

  from dsran_jax.default_config import get_base_config  # pylint: disable=g-import-not-at-top
  from dsran_jax.workdir import Workdir  # pylint: disable=g-import-not-at-top
  config = get_base_config()
  config.model.name = "scan"
  wd = Workdir(path)
  wd.save_config(config)
  if edit is not None:
    with open(wd.config_file) as f:
      saved = json.load(f)
    edit(saved)
    with open(wd.config_file, "w") as f:
      json.dump(saved, f)
  return wd


@pytest.mark.parametrize("case", ["lambda_str", "negative_dim", "float_int", "half"])
def test_hand_edited_config_json_is_checked_by_the_command_line_rules(tmp_path, case):
  """`lambda_softmax="abc"` was an ml_collections TypeError, `img_dim=-12` "negative
  dimensions are not allowed" at the first matmul."""
  from dsran_jax.workdir import ConfigFileError  # pylint: disable=g-import-not-at-top
  edits = {
      "lambda_str": (lambda c: c["model"]["scan"].update(lambda_softmax="abc"),
                     (r"config.model.scan.lambda_softmax='abc': expected a float, like its "
                      r"default 9.0")),
      "negative_dim": (lambda c: c["model"].update(img_dim=-12),
                       r"config.model.img_dim=-12: must be >= 1"),
      "float_int": (lambda c: c["eval"].update(batch_size=12.5),
                    r"config.eval.batch_size=12.5: expected an int"),
      "half": (None, (r"not a JSON config \(cut short by a crash or a hand edit\?\): "
                      r".*line \d+ column \d+")),
  }
  edit, expected = edits[case]
  wd = _scan_workdir(tmp_path / "wd", edit)
  if case == "half":
    with open(wd.config_file) as f:
      text = f.read()
    with open(wd.config_file, "w") as f:
      f.write(text[:len(text) // 2])
  with pytest.raises(ConfigFileError) as e:
    wd.load_config()
  assert len(e.value.problems) == 1, e.value.problems
  line = e.value.one_line()
  assert line.startswith(f"{wd.config_file}: ") and re_search(expected, line), line


def re_search(pattern, text):
  import re  # pylint: disable=g-import-not-at-top
  return re.search(pattern, text) is not None


def test_config_problems_name_their_source_and_all_are_listed(tmp_path):
  from dsran_jax.workdir import ConfigFileError  # pylint: disable=g-import-not-at-top

  def edit(c):
    c["model"]["scan"]["lambda_softmax"] = "abc"
    c["model"]["img_dim"] = -12

  wd = _scan_workdir(tmp_path / "wd", edit)
  with pytest.raises(ConfigFileError) as e:
    wd.load_config({"eval.batch_size": 0})
  assert e.value.problems == [
      (f"{wd.config_file}: config.model.scan.lambda_softmax='abc': expected a float, like "
       "its default 9.0"),
      "the command line: config.eval.batch_size=0: must be an integer >= 1",
      f"{wd.config_file}: config.model.img_dim=-12: must be >= 1"]
  assert _scan_workdir(tmp_path / "good").load_config().model.name == "scan"


def test_main_eval_on_a_hand_edited_workdir_is_one_line(tmp_path):
  wd = _scan_workdir(tmp_path / "wd", lambda c: c["model"]["scan"].update(
      lambda_softmax="abc"))
  rc, out, err, _ = run_cli("dsran_jax.main", "--mode=eval", f"--workdir={wd.path}")
  lines = [line for line in err.splitlines() if line.strip()]
  assert rc == 2 and not out and "Traceback" not in err, err[-2000:]
  assert lines == [(f"error: {wd.config_file}: config.model.scan.lambda_softmax='abc': "
                    "expected a float, like its default 9.0")], lines


# ------------------------------------------------- shortlists, search, rank, queries


def test_two_stage_report_caps_k_at_the_gallery():
  """K above the gallery was reported as "4000 of 2000 pairs re-scored (200%)"."""
  from test_two_stage import DotScorer

  from dsran_jax.evaluation import two_stage  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  n = 25  # the COCO protocol: 5 folds of 5 images, and all 25
  batch_i = {"a": rng.normal(size=(n, 4)).astype(np.float32), "valid": np.ones(n, bool)}
  batch_t = {"a": rng.normal(size=(5 * n, 4)).astype(np.float32),
             "valid": np.ones(5 * n, bool)}
  scorer = DotScorer("a", "a")
  _, report = two_stage.evaluate(scorer, scorer, [batch_i], [batch_t], [batch_i], [batch_t],
                                 k=4000, protocol="coco")
  text = two_stage.format_report({"shortlist_model": "dsran", "shortlist_workdir": "DIR",
                                  **report})
  lines = text.splitlines()
  assert lines[0] == "two-stage: K=4000, fusion 0.0, first stage dsran (DIR)"
  by_target = {line.split(":")[0].strip(): line for line in lines[1:3]}
  # Each fold of coco1k is a gallery of 5 images and 25 captions; coco5k is all of them.
  for name, (captions, images, pairs) in {"coco1k": (25, 5, 5 * 5 * 25),
                                          "coco5k": (125, 25, 25 * 125)}.items():
    assert by_target[name] == (
        f"  {name}: K=4000 is capped at the gallery: {captions} captions per image, "
        f"{images} images per caption; shortlist recall i2t 100.0% t2i 100.0%; of the "
        f"{pairs} image-caption pairs, {pairs} re-scored i2t (100.00%) and {pairs} t2i "
        "(100.00%)"), by_target[name]
  # K inside the gallery: no cap named.
  _, report = two_stage.evaluate(scorer, scorer, [batch_i], [batch_t], [batch_i], [batch_t],
                                 k=3, protocol="coco")
  text = two_stage.format_report({"shortlist_model": "dsran", "shortlist_workdir": "DIR",
                                  **report})
  assert "capped" not in text and "of the 3125 image-caption pairs, 75 re-scored i2t " \
      "(2.40%) and 375 t2i (12.00%)" in text, text


def test_float16_sims_are_summed_in_float32(tmp_path):
  """Two float16 files of scores near 40000 summed to +Inf, "from NaN/Inf embeddings"."""
  from dsran_jax import ranking  # pylint: disable=g-import-not-at-top
  from dsran_jax.tools import rank  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  a = (40000 + 64 * rng.standard_normal((10, 50))).astype(np.float16)
  b = (40000 + 64 * rng.standard_normal((10, 50))).astype(np.float16)
  np.save(tmp_path / "a.npy", a)
  np.save(tmp_path / "b.npy", b)
  got = rank.rank_files([str(tmp_path / "a.npy"), str(tmp_path / "b.npy")])
  want = ranking.evaluate_sims(a.astype(np.float32) + b.astype(np.float32), cpi=5)
  assert got == want
  assert ranking.sum_sims([a, b]).dtype == np.float32
  assert ranking.sum_sims([a.astype(np.float64), b]).dtype == np.float64


@pytest.fixture(scope="module")
def search_workdirs(minilm_dir, tmp_path_factory):
  """{name: workdir} on one synthetic split (10 test images, 50 captions), with random
  weights (nothing trained): "dsran" (BERT: the first stage), "scan" (word vocabulary),
  "dsran_dev" (its config names another test split), "nockpt" (a config, no checkpoint
  yet), "novocab" (SCAN without its vocab.json)."""
  import shutil  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  from conftest import tiny_train_config

  from dsran_jax import checkpointing, data, models  # pylint: disable=g-import-not-at-top
  from dsran_jax.models.variables import init_variables  # pylint: disable=g-import-not-at-top
  from dsran_jax.workdir import Workdir  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("search")
  dirs = {name: str(root / name) for name in ("dsran", "scan", "dsran_dev", "nockpt",
                                              "novocab")}
  c = tiny_train_config(minilm_dir)
  for name, seed in (("dsran", 0), ("scan", 1)):
    if name == "scan":
      c.model.name = "scan"
      c.model.embed_size, c.model.word_dim = 32, 16
    os.makedirs(dirs[name])
    model = models.build_model(c.model, vocab_size=data.vocab_size(c, dirs[name]))
    Workdir(dirs[name]).save_config(c)
    checkpointing.save(dirs[name], checkpointing.BEST, 1,
                       init_variables(model, jax.random.PRNGKey(seed)), {"step": 1})
  shutil.copytree(dirs["dsran"], dirs["dsran_dev"])
  dev = Workdir(dirs["dsran_dev"]).load_config()
  dev.data.test_split = "dev"
  Workdir(dirs["dsran_dev"]).save_config(dev)
  os.makedirs(dirs["nockpt"])
  shutil.copy(os.path.join(dirs["scan"], "config.json"), dirs["nockpt"])
  shutil.copytree(dirs["scan"], dirs["novocab"])
  os.remove(os.path.join(dirs["novocab"], "vocab.json"))
  return dirs


def test_search_refusals_are_one_line(search_workdirs):
  """Each was a traceback, or came after the gallery had been encoded."""
  w = search_workdirs
  cases = [
      ([f"--workdir={w['scan']}", f"--shortlist_workdir={w['dsran_dev']}"],
       (f"eval.shortlist_workdir={w['dsran_dev']!r} is for another dataset or split: its "
        "data.test_split='dev', this evaluation's data.test_split='test'")),
      ([f"--workdir={w['nockpt']}"],
       (f"{w['nockpt']} has no checkpoint yet (nothing under "
        f"{os.path.join(w['nockpt'], 'checkpoints')}): train until its first checkpoint")),
      ([f"--workdir={w['novocab']}"],
       (f"{w['novocab']} has checkpoints but no word vocabulary at "
        f"{os.path.join(w['novocab'], 'vocab.json')}")),
  ]
  for args, expected in cases:
    rc, out, err, _ = run_cli("dsran_jax.search", "--query=a dog", *args)
    lines = error_lines(err)
    assert rc in (1, 2) and not out and "Traceback" not in err, (args, err[-3000:])
    assert len(lines) == 1 and expected in lines[0], (args, expected, err[-3000:])
    assert "gallery test:" not in err, err  # refused before any gallery was encoded


@pytest.fixture(scope="module")
def dsran_gallery(search_workdirs):
  from dsran_jax import search  # pylint: disable=g-import-not-at-top
  return search.Gallery.load(search_workdirs["dsran"], use_cache=False)


def test_shortlist_k_above_the_gallery_is_reported_capped(dsran_gallery):
  from dsran_jax import search  # pylint: disable=g-import-not-at-top
  first = search.Shortlist(dsran_gallery, k=4000)
  hits = search.search_text(dsran_gallery, "a dog", top_k=3, shortlist=first)
  assert [h["stage"] for h in hits] == [2, 2, 2]
  assert search._k_note(first, dsran_gallery, True) == (  # pylint: disable=protected-access
      "K=4000 capped at the 10 images of the gallery")
  assert search._k_note(first, dsran_gallery, False) == (  # pylint: disable=protected-access
      "K=4000 capped at the 50 captions of the gallery")
  assert search._k_note(search.Shortlist(dsran_gallery, k=10), dsran_gallery,  # pylint: disable=protected-access
                        True) == "K=10"


def test_overlong_query_is_reported_not_cut_silently(search_workdirs, dsran_gallery, caplog):
  import logging  # pylint: disable=g-import-not-at-top

  from dsran_jax import inference, search  # pylint: disable=g-import-not-at-top
  matcher = dsran_gallery.encoder  # inference.load(the dsran workdir)
  long_query = " ".join(["dog"] * 10000)
  assert matcher.overlong(["a dog", long_query]) == [(1, 10002)]  # [CLS] + [SEP]
  note = ("the text has 10002 tokens; this model (dsran) reads at most 16 (data.max_len, "
          "special tokens included): the rest is cut")
  assert matcher.cut_note([long_query]) == note and matcher.cut_note(["a dog"]) is None
  assert matcher.cut_note(["a dog", long_query, long_query + " cat"]) == (
      "2 of 3 texts are longer (text 2: 10003 tokens); this model (dsran) reads at most 16 "
      "(data.max_len, special tokens included): the rest is cut")
  gallery = dsran_gallery
  with caplog.at_level(logging.WARNING):
    hits = search.search_text(gallery, long_query, top_k=2)
  assert len(hits) == 2
  assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [note]
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    search.search_text(gallery, "a dog", top_k=2)
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
  # SCAN's authors never cut a caption: with their rule (data.max_len=-1) nothing is cut
  # and nothing reported; the fixture's explicit cap of 16 is reported like DSRAN's.
  scan = inference.load(search_workdirs["scan"])
  assert scan.overlong([long_query]) == [(0, 10002)]
  scan.tokenizer.cap = 0
  assert scan.overlong([long_query]) == [] and scan.cut_note([long_query]) is None
