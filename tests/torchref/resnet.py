"""PyTorch reference for dsran_jax's ResNet: transformers' `ResNetModel` with random weights.

Runs in the jax-free reference process (see `torchref/__init__.py`). A reference model
is a directory holding `config.json` (HF `ResNetConfig`) and `hf.safetensors` (its state
dict, HF names); `build` writes it plus the same weights in torchvision's layout
(`tv.safetensors`, and `tv.pth` written with `torch.save`), and `forward` runs it.
"""
import collections
import json
import os
import re

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import ResNetConfig, ResNetModel

_MODELS = {}  # model dir -> loaded ResNetModel (the reference process is long-lived)


def _randomise_batchnorm(model: ResNetModel, generator: torch.Generator, calib: torch.Tensor):
  """Gives every BatchNorm realistic but non-trivial running stats and affine params.

  Running stats from one train-mode pass over `calib` images (momentum 1: the batch's
  own mean and unbiased variance), so eval-mode activations keep a sane scale through
  all the blocks; then scaled and shifted at random so that no layer is the identity
  normalisation, and random gamma/beta and step counters.
  """
  bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  for bn in bns:
    bn.momentum = 1.0
  model.train()
  with torch.no_grad():
    model(calib)
    for bn in bns:
      n = bn.num_features
      u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=generator)
      bn.running_var.mul_(u(0.7, 1.4))
      bn.running_mean.add_(0.2 * bn.running_var.sqrt() * torch.randn(n, generator=generator))
      bn.weight.copy_(u(0.6, 1.4))
      bn.bias.copy_(0.2 * torch.randn(n, generator=generator))
      bn.num_batches_tracked.fill_(1234)
      bn.momentum = 0.1
  model.eval()


def hf_to_torchvision(state: dict) -> "collections.OrderedDict":
  """Renames a HF `ResNetModel` state dict to torchvision's `resnet*` key names."""
  bn = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
  rules = (
      (r"embedder\.embedder\.convolution\.weight", lambda m: "conv1.weight"),
      (r"embedder\.embedder\.normalization\." + bn, lambda m: f"bn1.{m[1]}"),
      (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d)\.convolution\.weight",
       lambda m: f"layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}.weight"),
      (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d)\.normalization\." + bn,
       lambda m: f"layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}.{m[4]}"),
      (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.weight",
       lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0.weight"),
      (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\." + bn,
       lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.1.{m[3]}"),
  )
  out = collections.OrderedDict()
  for key, value in state.items():
    for pattern, name in rules:
      m = re.fullmatch(pattern, key)
      if m:
        out[name(m)] = value
        break
    else:
      raise KeyError(f"no torchvision name for HF key {key}")
  return out


def build(model_dir: str, depths, hidden_sizes, embedding_size: int, seed: int = 0,
          calib_pixels: np.ndarray = None, write_pth: bool = False) -> dict:
  """Writes a random HF ResNet (bottleneck, v1.5) in HF and torchvision layouts.

  Args:
    calib_pixels: NHWC images whose batch statistics seed the running stats (before
      the random perturbation); None: two 64x64 white-noise images.

  Returns:
    {"hf": path, "tv": path, "tv_pth": path or None, "tv_keys": [...torchvision keys]}.
  """
  os.makedirs(model_dir, exist_ok=True)
  torch.manual_seed(seed)
  config = ResNetConfig(num_channels=3, embedding_size=embedding_size,
                        hidden_sizes=list(hidden_sizes), depths=list(depths),
                        layer_type="bottleneck", hidden_act="relu",
                        downsample_in_first_stage=False, downsample_in_bottleneck=False)
  model = ResNetModel(config)
  if calib_pixels is None:
    calib = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed + 3))
  else:
    calib = torch.from_numpy(np.ascontiguousarray(np.transpose(calib_pixels, (0, 3, 1, 2))))
  _randomise_batchnorm(model, torch.Generator().manual_seed(seed + 1), calib.float())
  state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
  with open(os.path.join(model_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config.to_dict(), f)
  hf_path = os.path.join(model_dir, "hf.safetensors")
  save_file(state, hf_path)
  tv = hf_to_torchvision(state)
  # torchvision's ImageNet head, which the trunk must drop.
  g = torch.Generator().manual_seed(seed + 2)
  tv["fc.weight"] = torch.randn(1000, hidden_sizes[-1], generator=g) * 0.01
  tv["fc.bias"] = torch.zeros(1000)
  tv_path = os.path.join(model_dir, "tv.safetensors")
  save_file(dict(tv), tv_path)
  pth = None
  if write_pth:
    pth = os.path.join(model_dir, "tv.pth")
    torch.save(tv, pth)
  _MODELS[model_dir] = model
  return {"hf": hf_path, "tv": tv_path, "tv_pth": pth, "tv_keys": list(tv)}


def _model(model_dir: str) -> ResNetModel:
  if model_dir not in _MODELS:
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
      config = ResNetConfig.from_dict(json.load(f))
    model = ResNetModel(config)
    model.load_state_dict(load_file(os.path.join(model_dir, "hf.safetensors")), strict=True)
    _MODELS[model_dir] = model.eval()
  return _MODELS[model_dir]


def forward(model_dir: str, pixels_nhwc: np.ndarray, train: bool = False) -> dict:
  """Runs the reference on NHWC pixels (already normalised).

  Args:
    train: BatchNorm in train mode (batch statistics, running stats updated with
      momentum 0.1) on a copy of the model; the stored model stays as built.

  Returns:
    {"map": (N, h, w, C) last_hidden_state as NHWC, "pooled": (N, C) pooler output},
    plus {"state": HF state dict after the pass} when `train`.
  """
  model = _model(model_dir)
  x = torch.from_numpy(np.ascontiguousarray(np.transpose(pixels_nhwc, (0, 3, 1, 2))))
  if train:
    model = ResNetModel(model.config)
    model.load_state_dict(_model(model_dir).state_dict(), strict=True)
    model.train()
  with torch.no_grad():
    out = model(pixel_values=x.float())
  result = {"map": out.last_hidden_state.permute(0, 2, 3, 1).numpy().copy(),
            "pooled": out.pooler_output.flatten(1).numpy().copy()}
  if train:
    result["state"] = {k: v.numpy().copy() for k, v in model.state_dict().items()}
  return result
