"""DSRAN's converter writes the checkpoint's own ResNet-152 (`img_enc.cnn.*`, drifted
BatchNorm statistics and all) into the workdir as `resnet152.safetensors`, whole and as
stored, and grids computed from that file equal the authors' CNN.

The PyTorch side (tests/torchref/dsran.py, tv_resnet.py: their `resnet.py` network with
torchvision's key names) builds a random DSRAN whose CNN has distinct BatchNorm
statistics in every layer and saves it in the authors' layout. One ResNet-152 model for
the module; its 240 MB checkpoint is deleted once converted, and the workdir when the
module ends.
"""
import argparse
import hashlib
import os
import shutil

import jax
import numpy as np
import pytest

from dsran_jax.convert.engine import ConversionError
from dsran_jax.default_config import get_base_config
from dsran_jax.models.common import resnet
from dsran_jax.models.dsran import params as dsran_params
from dsran_jax.tools import convert_torch

E, POS = 32, 1607
RESNET152_TENSORS = 932  # 155 convs + 155 BatchNorms x 5 + fc.{weight,bias}


def _opt(**kw):
  base = {"data_name": "f30k", "batch_size": 4, "embed_size": E, "img_dim": 2048, "K": 2,
          "margin": 0.2, "learning_rate": 2e-4, "num_epochs": 16, "lr_update": 8,
          "grad_clip": 2.0}
  return argparse.Namespace(**{**base, **kw})


def _digests(path):
  """What `torchref.dsran.cnn_digests` gives, read back from a safetensors file."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  return {k: (str(v.dtype), tuple(v.shape), hashlib.sha256(v.tobytes()).hexdigest())
          for k, v in load_file(path).items()}


@pytest.fixture(scope="module")
def r152(torch_ref, tmp_path_factory):
  """A GRU-build DSRAN checkpoint with a full ResNet-152, converted: (workdir, summary,
  checkpoint path naming the reference model)."""
  root = tmp_path_factory.mktemp("dsran_r152")
  ckpt = str(root / "model_best.pth.tar")
  torch_ref("dsran.make_gru", ckpt_path=ckpt, K=2, vocab=30, word_dim=8,
            dims={"embed": E, "img": 2048, "pos": POS, "cnn": {}}, torch_seed=3,
            init_seed=4, opt=_opt())
  workdir = str(root / "workdir")
  try:
    summary = convert_torch.convert_checkpoint(ckpt, workdir, data_format="precomp")
  finally:
    os.remove(ckpt)
  yield workdir, summary, ckpt
  torch_ref("dsran.forget", ckpt_path=ckpt)
  shutil.rmtree(root, ignore_errors=True)


def test_the_workdir_holds_every_cnn_tensor_as_stored(r152, torch_ref):
  workdir, summary, ckpt = r152
  path = os.path.join(workdir, "resnet152.safetensors")
  assert summary["files"] == [path]
  assert summary["cnn"] == "resnet152" and summary["cnn_weights"] == "resnet152.safetensors"
  assert summary["cnn_tensors"] == RESNET152_TENSORS
  assert "--weights=<workdir>/resnet152.safetensors" in summary["note"]
  got, want = _digests(path), torch_ref("dsran.cnn_digests", ckpt_path=ckpt)
  assert len(want) == RESNET152_TENSORS
  assert got == want  # every key, dtype, shape and byte
  # The unused head and the step counters travel too, as stored (int64, distinct).
  assert got["fc.weight"][:2] == ("float32", (1000, 2048))
  assert got["layer4.2.bn3.num_batches_tracked"][:2] == ("int64", ())


def test_grids_from_the_file_equal_the_authors_cnn(r152, torch_ref):
  """The file through the extractor's network (`resnet.load_weights`, `ResNet`,
  `grid_cells`) gives the grid their EncoderImageFull computes in evaluation, with the
  checkpoint's drifted BatchNorm statistics (64x64 inputs: a 2x2 grid)."""
  workdir, _, ckpt = r152
  pixels = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
  config, variables = resnet.load_weights(os.path.join(workdir, "resnet152.safetensors"))
  assert config == resnet.ResNetConfig()
  fmap, _ = jax.jit(lambda v, x: resnet.ResNet(config).apply(v, x, train=False))(
      variables, pixels)
  got = np.asarray(resnet.grid_cells(fmap))
  want = torch_ref("dsran.cnn_grid", ckpt_path=ckpt,
                   pixels_nchw=np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
  assert got.shape == want.shape == (2, 4, 2048)
  rel = float(np.abs(got - want).max() / np.abs(want).max())
  print(f"ResNet-152 grid: max|diff| / max|ref| = {rel:.2e}")
  assert rel < 1e-4, rel


def test_bert_build_layout_exports_its_cnn(torch_ref, tmp_path):
  """The BERT build's `module.img_enc.cnn.*` (DataParallel) lands under the same
  torchvision names; a network other than ResNet-50/101/152 is `resnet.safetensors`."""
  ckpt = str(tmp_path / "model_best.pth.tar")
  bert = {"vocab_size": 60, "hidden_size": 32, "num_hidden_layers": 1,
          "num_attention_heads": 2, "intermediate_size": 72, "max_position_embeddings": 40,
          "type_vocab_size": 2}
  torch_ref("dsran.make_bert", ckpt_path=ckpt, K=2, bert=bert,
            dims={"embed": E, "img": 40, "pos": POS}, torch_seed=5, init_seed=6,
            opt=_opt(img_dim=40, learning_rate=2e-5, bert_path="uncased_L-1_H-32_A-2/"))
  try:
    summary = convert_torch.convert_checkpoint(ckpt, str(tmp_path / "wd"))
    path = str(tmp_path / "wd" / "resnet.safetensors")
    assert summary["build"] == "bert" and summary["files"] == [path]
    want = torch_ref("dsran.cnn_digests", ckpt_path=ckpt)
    assert _digests(path) == want and summary["cnn_tensors"] == len(want)
    assert {"fc.bias", "bn1.num_batches_tracked"} <= set(want)
  finally:
    torch_ref("dsran.forget", ckpt_path=ckpt)


@pytest.fixture(scope="module")
def small_gru_state(torch_ref):
  """A K=2 GRU-build state dict with a small ResNet whose layer4 is 40 wide."""
  return torch_ref("dsran.gru_state_dict", K=2, vocab=30, word_dim=8,
                   dims={"embed": E, "img": 40, "pos": POS}, torch_seed=0, init_seed=0)


def _convert(state):
  return dsran_params.convert({"model": [state]}, {"path": "ckpt.pth.tar"},
                              config=get_base_config())


def test_a_checkpoint_without_its_cnn_is_refused(small_gru_state):
  state = {k: v for k, v in small_gru_state.items() if not k.startswith("img_enc.cnn.")}
  with pytest.raises(ConversionError, match=r"ckpt\.pth\.tar: img_enc\.cnn .*drifted"):
    _convert(state)


def test_a_missing_cnn_tensor_is_named(small_gru_state):
  state = dict(small_gru_state)
  del state["img_enc.cnn.layer2.0.conv2.weight"]
  with pytest.raises(ConversionError, match=r"img_enc\.cnn\.layer2\.0\.conv2\.weight"):
    _convert(state)


def test_a_cnn_of_another_width_than_the_grid_branch_is_refused(small_gru_state):
  state = dict(small_gru_state)
  # img_dim 48 for the grid and the regions (one width in the GRU build); the CNN gives 40.
  state["img_enc.fc.weight"] = np.zeros((E, 48), np.float32)
  state["rcnn_enc.fc_image.weight"] = np.zeros((E, 48), np.float32)
  with pytest.raises(ConversionError, match=r"outputs 40 channels .* takes 48"):
    _convert(state)


def test_mlasm_exports_its_cnn_as_stored_too(torch_ref, tmp_path):
  """The shared export (`resnet.checkpoint_cnn`): MLASM's file keeps the step counters
  and dtypes its checkpoint stores."""
  ckpt = torch_ref("mlasm.save_checkpoint", path=str(tmp_path / "checkpoint.pth.tar"),
                   opt={"embed_size": E, "word_dim": 16, "img_dim": 20, "data_name": "f30k"},
                   vocab_size=30, cnn_dir=str(tmp_path / "cnn"))
  summary = convert_torch.convert_checkpoint(ckpt["path"], str(tmp_path / "wd"))
  got = _digests(summary["files"][0])
  stored = {k[len("cnn.module."):] for k in ckpt["keys"]["img_enc"] if k.startswith("cnn.")}
  assert set(got) == stored
  assert got["layer1.0.bn1.num_batches_tracked"][:2] == ("int64", ())


@pytest.mark.parametrize("data_name,dev", [("f30k", 0), ("coco", 1000)])
def test_converted_workdir_selects_on_vsepp_dev(small_gru_state, data_name, dev):
  """A converted DSRAN workdir fine-tunes with the authors' dev: every Flickr30K val image,
  COCO's first 1000."""
  converted = dsran_params.convert({"model": [small_gru_state], "opt": {"data_name": data_name}},
                                   {"path": "ckpt.pth.tar"}, config=get_base_config())
  assert converted.config.eval.max_dev_images == dev
