"""ResNet-50/101/152 (v1.5 bottleneck, NHWC) and its weight maps from torchvision and HF.

The network is torchvision's `resnet152` (and Hugging Face's `ResNetModel`, the same
maths): a 7x7/2 stem conv + BN + ReLU + 3x3/2 max pool, then four stages of bottleneck
blocks (1x1 -> 3x3 -> 1x1 convs, each followed by BN, the stride on the 3x3 conv: "v1.5"),
with a 1x1 conv + BN shortcut on the first block of each stage. `ResNet` returns the last
stage's map (for a 224x224 input the 7x7x2048 `layer4` output, whose cells, row-major,
are DSRAN's grid: cell `7 * row + col`, see `dsran_jax/data/grid.py`) and its spatial
mean (torchvision's `avgpool` output with `fc` = identity: MLASM's `global_feat`).

Variables of `ResNet` (names follow torchvision's; conv kernels are HWIO):

  params/conv1/kernel (7, 7, 3, stem)            params/bn1/{scale,bias}
  params/layer{s}_{b}/conv{1,2,3}/kernel         params/layer{s}_{b}/bn{1,2,3}/{scale,bias}
  params/layer{s}_{b}/downsample_conv/kernel     params/layer{s}_{b}/downsample_bn/{scale,bias}
  batch_stats/<every bn above>/{mean,var}

(stages s = 1..4, blocks b = 0..depth-1, `downsample_*` on block 0 only). `WEIGHT_MAP`
maps torchvision keys (`conv1.weight`, `bn1.running_mean`, `layer1.0.conv1.weight`,
`layer1.0.downsample.0.weight`, ...) and Hugging Face `ResNetModel` keys
(`embedder.embedder.convolution.weight`, `encoder.stages.0.layers.0.layer.0.convolution
.weight`, `...shortcut.normalization.running_var`, ...) onto that tree, under any prefix
(`module.`, `cnn.module.` as in MLASM's image encoder, `resnet.` as in HF's
`ResNetForImageClassification`). `fc.*`, `classifier.*` and `num_batches_tracked` are
dropped.
"""
import dataclasses
import os
import re
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dsran_jax.convert import torch_pickle
from dsran_jax.convert.engine import ConversionError
from dsran_jax.models.common.layers import MaskedBatchNorm


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  """Shape of a bottleneck ResNet (torchvision's resnet50/101/152 differ in `depths`).

  Attributes:
    depths: blocks per stage.
    widths: bottleneck (3x3 conv) channels per stage; a stage outputs
      `width * expansion` channels.
    stem_width: channels of the 7x7 stem conv.
    expansion: output / bottleneck channels of a block.
    epsilon: BatchNorm epsilon (PyTorch's 1e-5).
    momentum: BatchNorm running-stat momentum in PyTorch's convention (new = (1 - m)
      old + m batch), used in train mode.
  """
  depths: Tuple[int, ...] = (3, 8, 36, 3)
  widths: Tuple[int, ...] = (64, 128, 256, 512)
  stem_width: int = 64
  expansion: int = 4
  epsilon: float = 1e-5
  momentum: float = 0.1

  def __post_init__(self):
    if len(self.depths) != len(self.widths) or not self.depths:
      raise ValueError(f"ResNetConfig: depths {self.depths} and widths {self.widths} must "
                       f"be non-empty and of the same length (one per stage)")
    if min(self.depths) < 1 or min(self.widths) < 1:
      raise ValueError(f"ResNetConfig: depths {self.depths} / widths {self.widths} must be "
                       f"positive")

  @property
  def out_channels(self) -> int:
    """Channels of the last stage's map (2048 for ResNet-50/101/152)."""
    return self.widths[-1] * self.expansion

  @property
  def stride(self) -> int:
    """Input pixels per output cell: 4 (stem) x 2 per stage after the first."""
    return 4 * 2 ** (len(self.depths) - 1)

  @classmethod
  def named(cls, name: str) -> "ResNetConfig":
    """"resnet50" | "resnet101" | "resnet152" (torchvision's shapes)."""
    if name not in NAMED_DEPTHS:
      raise ValueError(f"unknown ResNet {name!r}; known: {', '.join(NAMED_DEPTHS)}")
    return cls(depths=NAMED_DEPTHS[name])

  def describe(self) -> str:
    """A short name: "resnet152" for torchvision's shapes, else the full shape."""
    for name, depths in NAMED_DEPTHS.items():
      if self == ResNetConfig(depths=depths):
        return name
    return (f"ResNet(depths={self.depths}, widths={self.widths}, stem={self.stem_width}, "
            f"expansion={self.expansion})")


NAMED_DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3),
                "resnet152": (3, 8, 36, 3)}

# torchvision's and HF's init of conv weights: kaiming normal, fan_out, gain sqrt(2),
# not truncated. Only matters for random init (weights files overwrite it).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv_bn(x, features: int, kernel: int, stride: int, relu: bool, conv_name: str,
             bn_name: str, config: ResNetConfig, dtype, train: bool):
  """Conv (no bias, PyTorch's symmetric `k // 2` padding) + BatchNorm [+ ReLU].

  A function, not a module: called inside a module's compact method, its conv and BN
  become that module's children, so variable paths are `layer1_0/conv1` and
  `layer1_0/bn1` as in torchvision (one name per torch module).
  """
  p = kernel // 2
  x = nn.Conv(features, (kernel, kernel), (stride, stride), padding=((p, p), (p, p)),
              use_bias=False, dtype=dtype, kernel_init=_conv_init, name=conv_name)(x)
  b, h, w, c = x.shape
  # MaskedBatchNorm normalises (B, N, C) over B and N: BatchNorm2d over (B, H, W) once
  # the spatial axes are merged, with PyTorch's train-mode update (unbiased running var).
  y = MaskedBatchNorm(momentum=config.momentum, epsilon=config.epsilon, name=bn_name)(
      x.reshape(b, h * w, c), None, train)
  y = y.reshape(b, h, w, c)
  return nn.relu(y) if relu else y


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride here: v1.5) -> 1x1 convs with BN, plus the (projected) shortcut."""
  width: int
  stride: int
  config: ResNetConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    c, dt = self.config, self.dtype
    out = self.width * c.expansion
    h = _conv_bn(x, self.width, 1, 1, True, "conv1", "bn1", c, dt, train)
    h = _conv_bn(h, self.width, 3, self.stride, True, "conv2", "bn2", c, dt, train)
    h = _conv_bn(h, out, 1, 1, False, "conv3", "bn3", c, dt, train)
    # torchvision and HF project the shortcut exactly when the shape changes.
    if self.stride != 1 or x.shape[-1] != out:
      x = _conv_bn(x, out, 1, self.stride, False, "downsample_conv", "downsample_bn", c, dt,
                   train)
    return nn.relu(h + x)


class ResNet(nn.Module):
  """Bottleneck ResNet trunk (no classifier), NHWC.

  Attributes:
    config: the network's shape (`ResNetConfig()` is ResNet-152).
    dtype: compute dtype of the convs (params stay fp32; BN runs in fp32).
  """
  config: ResNetConfig = ResNetConfig()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    """Runs the trunk.

    Args:
      images: (B, H, W, 3) float, normalised as the weights expect (ImageNet mean/std
        for torchvision's).
      train: BatchNorm from batch statistics, updating the running stats (pass
        `mutable=["batch_stats"]`), as PyTorch's `model.train()`; MLASM's reference
        runs its frozen CNN this way. False: the running statistics (`model.eval()`).

    Returns:
      `(feature_map, pooled)`: the last stage's map (B, H/32, W/32, C) float32 (for
      224x224 inputs ResNet-152's 7x7x2048 `layer4`), and its spatial mean (B, C)
      float32 (torchvision's `avgpool` output, flattened).
    """
    c = self.config
    x = _conv_bn(images.astype(self.dtype), c.stem_width, 7, 2, True, "conv1", "bn1", c,
                 self.dtype, train)
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))  # pads with -inf
    for s, (depth, width) in enumerate(zip(c.depths, c.widths), start=1):
      for b in range(depth):
        stride = 2 if (b == 0 and s > 1) else 1
        x = Bottleneck(width, stride, c, self.dtype, name=f"layer{s}_{b}")(x, train)
    fmap = x.astype(jnp.float32)
    return fmap, jnp.mean(fmap, axis=(1, 2))


def grid_cells(feature_map):
  """(B, H, W, C) -> (B, H * W, C), cell `W * row + col` (DSRAN's grid layout)."""
  b, h, w, c = feature_map.shape
  return feature_map.reshape(b, h * w, c)


def variable_shapes(config: ResNetConfig) -> dict[str, tuple[int, ...]]:
  """Flat `{"params/conv1/kernel": shape, "batch_stats/bn1/mean": ..., ...}` (no compute)."""
  shapes = jax.eval_shape(lambda: ResNet(config).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32)))
  flat = traverse_util.flatten_dict(dict(shapes), sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


# ----------------------------------------------------------------------------- weight map

def _identity(w):
  return w


def _conv_kernel(w):
  """PyTorch OIHW conv weight -> Flax HWIO kernel."""
  return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


# PyTorch BatchNorm field -> (Flax collection, variable name).
_BN_FIELDS = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_BN = r"(?P<field>weight|bias|running_mean|running_var)"


def _conv(module: Callable[[re.Match], str]):
  return lambda m: f"params/{module(m)}/kernel"


def _bn(module: Callable[[re.Match], str]):
  def target(m):
    collection, name = _BN_FIELDS[m["field"]]
    return f"{collection}/{module(m)}/{name}"
  return target


# Flax block names from torchvision's 1-based `layer{s}` or HF's 0-based `stages.{s}`.
_TV_BLOCK = lambda m: f"layer{m['s']}_{m['b']}"
_HF_BLOCK = lambda m: f"layer{int(m['s']) + 1}_{m['b']}"
_TV = r"layer(?P<s>[1-9]\d*)\.(?P<b>\d+)\."
_HF = r"encoder\.stages\.(?P<s>\d+)\.layers\.(?P<b>\d+)\."

Rule = Tuple[str, Callable[[re.Match], str], Callable[[np.ndarray], np.ndarray]]

# Per layout: (regex on the key after its prefix, target "collection/path", transform).
WEIGHT_MAP: dict[str, Tuple[Rule, ...]] = {
    "torchvision": (
        (r"conv1\.weight", _conv(lambda m: "conv1"), _conv_kernel),
        (r"bn1\." + _BN, _bn(lambda m: "bn1"), _identity),
        (_TV + r"conv(?P<i>[123])\.weight",
         _conv(lambda m: f"{_TV_BLOCK(m)}/conv{m['i']}"), _conv_kernel),
        (_TV + r"bn(?P<i>[123])\." + _BN, _bn(lambda m: f"{_TV_BLOCK(m)}/bn{m['i']}"),
         _identity),
        (_TV + r"downsample\.0\.weight", _conv(lambda m: f"{_TV_BLOCK(m)}/downsample_conv"),
         _conv_kernel),
        (_TV + r"downsample\.1\." + _BN, _bn(lambda m: f"{_TV_BLOCK(m)}/downsample_bn"),
         _identity),
    ),
    "hf": (
        (r"embedder\.embedder\.convolution\.weight", _conv(lambda m: "conv1"), _conv_kernel),
        (r"embedder\.embedder\.normalization\." + _BN, _bn(lambda m: "bn1"), _identity),
        (_HF + r"layer\.(?P<i>[012])\.convolution\.weight",
         _conv(lambda m: f"{_HF_BLOCK(m)}/conv{int(m['i']) + 1}"), _conv_kernel),
        (_HF + r"layer\.(?P<i>[012])\.normalization\." + _BN,
         _bn(lambda m: f"{_HF_BLOCK(m)}/bn{int(m['i']) + 1}"), _identity),
        (_HF + r"shortcut\.convolution\.weight",
         _conv(lambda m: f"{_HF_BLOCK(m)}/downsample_conv"), _conv_kernel),
        (_HF + r"shortcut\.normalization\." + _BN,
         _bn(lambda m: f"{_HF_BLOCK(m)}/downsample_bn"), _identity),
    ),
}

# Keys (after the prefix) the trunk does not use: BN's step counters and the ImageNet
# classifier (torchvision's `fc`; MLASM replaces it by an identity, so it has none).
IGNORED_KEYS = {
    "torchvision": (r"(?:.*\.)?num_batches_tracked", r"fc\.(?:weight|bias)"),
    "hf": (r"(?:.*\.)?num_batches_tracked",),
}
# HF's ResNetForImageClassification keeps its head beside, not under, the `resnet.` prefix.
_HF_HEAD = re.compile(r"classifier\.\d+\.(?:weight|bias)$")

# The stem conv of each layout: its position in a key gives the prefix.
_STEM_KEYS = {"torchvision": "conv1.weight", "hf": "embedder.embedder.convolution.weight"}

_COMPILED_MAP = {layout: tuple((re.compile(p + "$"), t, f) for p, t, f in rules)
                 for layout, rules in WEIGHT_MAP.items()}
_COMPILED_IGNORED = {layout: tuple(re.compile(p + "$") for p in pats)
                     for layout, pats in IGNORED_KEYS.items()}


def torch_keys(config: ResNetConfig, layout: str) -> dict[str, tuple[int, ...]]:
  """Every key (no prefix) a `layout` state dict of `config`'s network holds, with its
  PyTorch shape, except the dropped ones (`IGNORED_KEYS`)."""
  if layout not in WEIGHT_MAP:
    raise ValueError(f"unknown layout {layout!r}; known: {', '.join(WEIGHT_MAP)}")
  tv = layout == "torchvision"
  bn_fields = tuple(_BN_FIELDS)
  keys = {}

  def conv_bn(conv: str, bn: str, out: int, inp: int, k: int):
    keys[conv + ".weight"] = (out, inp, k, k)
    for field in bn_fields:
      keys[f"{bn}.{field}"] = (out,)

  if tv:
    conv_bn("conv1", "bn1", config.stem_width, 3, 7)
  else:
    conv_bn("embedder.embedder.convolution", "embedder.embedder.normalization",
            config.stem_width, 3, 7)
  inp = config.stem_width
  for s, (depth, width) in enumerate(zip(config.depths, config.widths)):
    out = width * config.expansion
    for b in range(depth):
      block = f"layer{s + 1}.{b}." if tv else f"encoder.stages.{s}.layers.{b}."
      for i, (o, c_in, k) in enumerate(((width, inp, 1), (width, width, 3), (out, width, 1))):
        if tv:
          conv_bn(f"{block}conv{i + 1}", f"{block}bn{i + 1}", o, c_in, k)
        else:
          conv_bn(f"{block}layer.{i}.convolution", f"{block}layer.{i}.normalization",
                  o, c_in, k)
      if b == 0 and (s > 0 or inp != out):
        if tv:
          conv_bn(f"{block}downsample.0", f"{block}downsample.1", out, inp, 1)
        else:
          conv_bn(f"{block}shortcut.convolution", f"{block}shortcut.normalization",
                  out, inp, 1)
      inp = out
  return keys


def detect_layout(keys: Sequence[str]) -> Tuple[str, str]:
  """`(layout, prefix)` of a ResNet state dict, from where its stem conv key is.

  Raises:
    ValueError: no stem conv key (or several, under different prefixes).
  """
  found = set()
  for key in keys:
    for layout, stem in _STEM_KEYS.items():
      if key == stem or key.endswith("." + stem):
        prefix = key[:len(key) - len(stem)]
        # `layer1.0.conv1.weight` ends like torchvision's stem; its prefix gives it away.
        if layout == "torchvision" and re.search(r"(?:^|\.)layer\d+\.\d+\.$", prefix):
          continue
        found.add((layout, prefix))
  if len(found) != 1:
    what = ("none" if not found else
            ", ".join(f"{prefix + _STEM_KEYS[layout]} ({layout})"
                      for layout, prefix in sorted(found)))
    raise ValueError(
        f"cannot tell the ResNet layout: expected exactly one stem conv key, "
        f"torchvision's 'conv1.weight' or HF's 'embedder.embedder.convolution.weight' "
        f"(under any prefix such as 'module.' or 'cnn.module.'); found {what}")
  return found.pop()


def infer_config(state: Mapping[str, Any], layout: Optional[str] = None,
                 prefix: Optional[str] = None) -> ResNetConfig:
  """The `ResNetConfig` a torchvision or HF state dict holds (depths and widths from its
  keys and shapes).

  Raises:
    ValueError: naming the key that is missing or has an unusable shape; basic-block
      ResNets (18/34) are refused.
  """
  if layout is None or prefix is None:
    layout, prefix = detect_layout(list(state))
  tv = layout == "torchvision"
  stem_key = prefix + _STEM_KEYS[layout]
  pattern = re.compile(re.escape(prefix) + (
      r"layer(\d+)\.(\d+)\.conv1\.weight$" if tv
      else r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.0\.convolution\.weight$"))
  blocks = {}
  for key in state:
    m = pattern.match(key)
    if m:
      s = int(m.group(1)) - (1 if tv else 0)
      blocks.setdefault(s, set()).add(int(m.group(2)))
  if not blocks or sorted(blocks) != list(range(len(blocks))):
    first = "layer1" if tv else "encoder.stages.0"
    raise ValueError(
        f"ResNet state dict ({layout} layout, prefix {prefix!r}): stages "
        f"{sorted(blocks)} found, expected consecutive stages from {prefix}{first}")
  depths, widths, expansions = [], [], set()
  for s in sorted(blocks):
    depths.append(max(blocks[s]) + 1)
    first = (f"{prefix}layer{s + 1}.0." if tv else f"{prefix}encoder.stages.{s}.layers.0.")
    conv1 = first + ("conv1.weight" if tv else "layer.0.convolution.weight")
    conv3 = first + ("conv3.weight" if tv else "layer.2.convolution.weight")
    if conv3 not in state:
      raise ValueError(f"{conv3}: missing; only bottleneck ResNets (50/101/152) are "
                       f"supported, and this looks like a basic-block one (18/34)")
    w1, w3 = np.shape(state[conv1]), np.shape(state[conv3])
    if len(w1) != 4 or len(w3) != 4 or w3[0] % w1[0]:
      raise ValueError(f"{conv1} {tuple(w1)} / {conv3} {tuple(w3)}: not the shapes of a "
                       f"bottleneck block (OIHW, output a multiple of the width)")
    widths.append(int(w1[0]))
    expansions.add(int(w3[0]) // int(w1[0]))
  if len(expansions) != 1:
    raise ValueError(f"ResNet state dict (prefix {prefix!r}): stages disagree on the block "
                     f"expansion (conv3 / conv1 channels): {sorted(expansions)}")
  if stem_key not in state or len(np.shape(state[stem_key])) != 4:
    raise ValueError(f"{stem_key}: missing or not a 4-d conv weight")
  return ResNetConfig(depths=tuple(depths), widths=tuple(widths),
                      stem_width=int(np.shape(state[stem_key])[0]),
                      expansion=expansions.pop())


def state_dict_to_variables(state: Mapping[str, Any], config: Optional[ResNetConfig] = None,
                            prefix: Optional[str] = None,
                            ignore_outside_prefix: bool = False) -> dict:
  """Maps a torchvision or Hugging Face ResNet state dict onto `ResNet`'s variables.

  Args:
    state: key -> array (numpy or anything `np.asarray` accepts), in torchvision's
      (`conv1.weight`, `layer1.0.bn1.running_mean`, ...) or HF `ResNetModel`'s layout
      (`embedder.embedder.convolution.weight`, `encoder.stages.0.layers.0.shortcut...`).
    config: the network the variables are for; None infers it from the state dict.
    prefix: the prefix every key carries (`"module."`, `"cnn.module."`, ...); None
      detects it from the stem conv's key.
    ignore_outside_prefix: skip keys without the prefix, for a ResNet inside a larger
      state dict (MLASM's image encoder: `prefix="cnn.module."`, beside its `fc.*`);
      False makes them errors.

  Returns:
    `{"params": ..., "batch_stats": ...}` as nested dicts of float32 numpy arrays.

  Raises:
    ValueError: listing, by their keys in `state`, unexpected keys, missing keys,
      keys mapping onto the same variable, and shape mismatches (both shapes, in
      PyTorch's layout).
  """
  layout, detected = detect_layout([k for k in state if prefix is None or k.startswith(prefix)])
  if prefix is None:
    prefix = detected
  elif detected != prefix:
    raise ValueError(f"ResNet stem conv found under prefix {detected!r}, not {prefix!r}")
  if config is None:
    config = infer_config(state, layout, prefix)
  expected = torch_keys(config, layout)
  targets = variable_shapes(config)
  flat, source = {}, {}
  unexpected, duplicates, bad_shapes = [], [], []
  present = set()  # expected keys (no prefix) the state dict has, whatever their shape
  for key, value in state.items():
    if not key.startswith(prefix):
      if ignore_outside_prefix or (layout == "hf" and prefix == "resnet."
                                   and _HF_HEAD.match(key)):
        continue
      unexpected.append(f"{key} (outside the prefix {prefix!r})")
      continue
    local = key[len(prefix):]
    if any(p.match(local) for p in _COMPILED_IGNORED[layout]):
      continue
    for pattern, target, transform in _COMPILED_MAP[layout]:
      m = pattern.match(local)
      if m:
        break
    else:
      unexpected.append(key)
      continue
    path = target(m)
    if local not in expected or path not in targets:
      unexpected.append(f"{key} (not in {config.describe()})")
      continue
    if path in flat:
      duplicates.append(f"{source[path]} and {key} -> {path}")
      continue
    array = np.asarray(value, dtype=np.float32)
    present.add(local)
    if array.shape != expected[local]:
      bad_shapes.append(f"{key}: shape {array.shape} in the checkpoint, {config.describe()} "
                        f"expects {expected[local]}")
      continue
    flat[path], source[path] = transform(array), key
  missing = [prefix + k for k in expected if k not in present]
  problems = []
  for title, items in (("unexpected keys", unexpected), ("missing keys", missing),
                       ("keys mapping onto the same variable", duplicates),
                       ("shape mismatches", bad_shapes)):
    if items:
      problems.append(f"{len(items)} {title}:\n  " + "\n  ".join(items))
  if problems:
    raise ValueError(f"ResNet state dict ({layout} layout, prefix {prefix!r}) does not "
                     f"match {config.describe()}:\n" + "\n".join(problems))
  # Every expected key mapped, so every variable is set (tests/test_resnet.py checks the
  # two enumerations agree); guard anyway so a wrong table cannot return a partial tree.
  if set(flat) != set(targets):
    raise AssertionError(f"weight map left {sorted(set(targets) - set(flat))[:5]} unset")
  return traverse_util.unflatten_dict(flat, sep="/")


# ----------------------------------------------------------------------------- loaders

TORCH_SUFFIXES = (".pth", ".pt", ".bin")


def read_state_dict(path: Union[str, os.PathLike]) -> dict[str, np.ndarray]:
  """Reads a state dict of arrays from `.safetensors` or a PyTorch `.pth`/`.pt`/`.bin`.

  `.safetensors` is read with the safetensors package; `torch.save` files with
  `dsran_jax.convert.torch_pickle`, which never imports torch and builds nothing but
  tensors and plain containers.

  Raises:
    FileNotFoundError: no such file. ValueError: an unknown suffix, an unreadable
      file, or a file whose top level is not a flat dict of tensors (naming the key).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: ResNet weights file not found")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      return dict(load_file(path))
    except Exception as e:  # pylint: disable=broad-except  # safetensors' own error types
      raise ValueError(f"{path}: cannot read as safetensors: {e}") from e
  if not path.endswith(TORCH_SUFFIXES):
    raise ValueError(f"{path}: unknown weights format; expected .safetensors or a PyTorch "
                     f"state dict ({', '.join(TORCH_SUFFIXES)})")
  state = torch_pickle.load(path)  # its errors (ValueError subclasses) name the file
  if not isinstance(state, Mapping):
    raise ValueError(f"{path}: expected a state dict (a dict of tensors), got "
                     f"{type(state).__name__}")
  for key, value in state.items():
    if not isinstance(value, np.ndarray):
      raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                       f"expected a plain state dict (a training checkpoint must be "
                       f"unpacked first)")
  return dict(state)


def load_weights(source: Union[str, os.PathLike, Mapping[str, Any]],
                 config: Optional[ResNetConfig] = None, prefix: Optional[str] = None
                 ) -> Tuple[ResNetConfig, dict]:
  """`(config, variables)` for `ResNet` from a weights file or a state dict of arrays.

  Args:
    source: a `.safetensors` / `.pth` / `.pt` / `.bin` file, or a mapping key -> array,
      in torchvision's or HF's layout (any prefix).
    config: expected network; None infers it from the weights.
    prefix: see `state_dict_to_variables`.

  Raises:
    FileNotFoundError, ValueError: as `read_state_dict` and `state_dict_to_variables`;
      errors from a file name the file.
  """
  if isinstance(source, Mapping):
    state, where = source, None
  else:
    state, where = read_state_dict(source), os.fspath(source)
  try:
    if config is None:
      layout, found = detect_layout([k for k in state if prefix is None or k.startswith(prefix)])
      config = infer_config(state, layout, found)
    return config, state_dict_to_variables(state, config, prefix)
  except ValueError as e:
    if where is None:
      raise
    raise ValueError(f"{where}: {e}") from e


# ----------------------------------------------------------------------------- checkpoints

def weights_file_name(config: ResNetConfig) -> str:
  """The workdir file of a checkpoint's own CNN: `resnet152.safetensors` for torchvision's
  ResNet-152 (`resnet50...`, `resnet101...` likewise), `resnet.safetensors` otherwise."""
  name = config.describe()
  return f"{name}.safetensors" if name.startswith("resnet") else "resnet.safetensors"


def checkpoint_cnn(state: Mapping[str, Any], prefix: str
                   ) -> Tuple[ResNetConfig, dict[str, np.ndarray]]:
  """The torchvision ResNet a model's checkpoint holds under `prefix`, as it is stored.

  DSRAN (`img_enc.cnn.`) and MLASM (`img_enc.cnn.module.`) keep their frozen ResNet-152
  in train-mode BatchNorm, so its running statistics drift from ImageNet's, and their
  evaluation computes image features with the drifted ones: those features can only be
  reproduced from the checkpoint's own tensors.

  Args:
    state: the checkpoint's state dict (key -> array as read, any dtype).
    prefix: the ResNet's key prefix in `state`.

  Returns:
    `(config, tensors)`: the network (checked key by key and shape by shape against
    `ResNet`, as `load_weights` checks a weights file), and every tensor under `prefix`,
    prefix removed (torchvision's names), values and dtypes as stored: the unused `fc.*`
    head and every BatchNorm's `num_batches_tracked` included, so the file is the
    checkpoint's CNN, whole.

  Raises:
    ValueError: no key under `prefix`, or tensors that are not a bottleneck ResNet
      (naming the keys).
  """
  # np.asarray + a C-order copy only where needed: np.ascontiguousarray would turn the
  # 0-d step counters into shape (1,).
  tensors = {k[len(prefix):]: np.require(np.asarray(v), requirements="C")
             for k, v in state.items() if k.startswith(prefix)}
  if not tensors:
    raise ValueError(f"no {prefix}* tensors")
  config, _ = load_weights({prefix + k: v for k, v in tensors.items()}, prefix=prefix)
  return config, tensors


def converted_cnn(state: Mapping[str, Any], prefix: str, width: int, consumer: str,
                  what: str, note: str) -> Tuple[ResNetConfig, dict[str, np.ndarray]]:
  """`checkpoint_cnn(state, prefix)` for a converter: a ResNet dsran_jax cannot run, or one
  whose output is not the `width` channels that `consumer` takes, is a ConversionError
  naming the checkpoint (`what`); `note` says why the family's checkpoint holds it."""
  try:
    config, tensors = checkpoint_cnn(state, prefix)
  except ValueError as e:
    raise ConversionError(f"{what}: img_enc.cnn is not a ResNet dsran_jax runs ({e}); "
                          f"{note}") from None
  if config.out_channels != width:
    raise ConversionError(f"{what}: img_enc.cnn ({config.describe()}) outputs "
                          f"{config.out_channels} channels but {consumer} takes {width}")
  return config, tensors
