"""BERT text encoder (last hidden layer, no pooler) and its weight map from HF checkpoints.

Params tree of `BertEncoder` (the `params` collection; Flax Dense kernels are the
transposed PyTorch Linear weights):

  embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding
  embeddings/LayerNorm/{scale,bias}
  layer_{i}/attention/{query,key,value,output}/{kernel,bias}   (kernel (H, H))
  layer_{i}/attention/LayerNorm/{scale,bias}
  layer_{i}/intermediate/{kernel,bias}                          (kernel (H, I))
  layer_{i}/output/{kernel,bias}                                (kernel (I, H))
  layer_{i}/output_LayerNorm/{scale,bias}

`WEIGHT_MAP` maps Hugging Face `BertModel` keys (with or without a `bert.` prefix,
LayerNorm `weight|gamma` / `bias|beta`) onto that tree; `pooler.*`, `cls.*` and
`embeddings.position_ids` are ignored.
"""
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dsran_jax import hub
from dsran_jax.convert import torch_pickle
from dsran_jax.convert.engine import layer_count, require
from dsran_jax.models.common.layers import Dropout, Linear


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Shape and regularisation of a BERT encoder (absolute positions, exact GELU)."""
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  dropout: float = 0.1  # hidden states and attention probabilities
  # Some checkpoints use a different rate on attention probabilities; None: `dropout`.
  attention_dropout: Optional[float] = None

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def from_hf_json(cls, path_or_dict: Union[str, os.PathLike, Mapping[str, Any]]) -> "BertConfig":
    """Reads a Hugging Face BERT `config.json` (a file, its directory, or the parsed dict)."""
    if isinstance(path_or_dict, Mapping):
      d, where = path_or_dict, "config"
    else:
      p = Path(path_or_dict)
      if p.is_dir():
        p = p / "config.json"
      d, where = json.loads(p.read_text(encoding="utf-8")), str(p)
    # HF "gelu" is the exact erf GELU; the tanh variants would silently change outputs.
    act = d.get("hidden_act", "gelu")
    if act != "gelu":
      raise ValueError(f"{where}: hidden_act={act!r} is not supported (only exact 'gelu')")
    pos = d.get("position_embedding_type", "absolute")
    if pos != "absolute":
      raise ValueError(
          f"{where}: position_embedding_type={pos!r} is not supported (only 'absolute')")
    hidden_dropout = d.get("hidden_dropout_prob", 0.1)
    attn_dropout = d.get("attention_probs_dropout_prob", hidden_dropout)
    return cls(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        intermediate_size=d["intermediate_size"],
        max_position=d["max_position_embeddings"],
        type_vocab_size=d.get("type_vocab_size", 2),
        layer_norm_eps=d.get("layer_norm_eps", 1e-12),
        dropout=hidden_dropout,
        attention_dropout=None if attn_dropout == hidden_dropout else attn_dropout)


# BERT's initializer_range; only matters for random init (checkpoints overwrite it).
_init = nn.initializers.normal(stddev=0.02)


def _layer_norm(config: BertConfig, dtype, name: str) -> nn.LayerNorm:
  # Two-pass variance as PyTorch computes it: E[x^2]-E[x]^2 loses digits at eps=1e-12.
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, use_fast_variance=False,
                      name=name)


def _dense(features: int, dtype, name: str) -> Linear:
  # layers.Linear rather than nn.Dense: one 2-D matmul over (B*L) rows, and bf16 kept on
  # XLA:CPU's fast matmul path in the backward pass too (see layers.dense).
  return Linear(features, init="bert", dtype=dtype, name=name)


class _Embeddings(nn.Module):
  config: BertConfig
  dtype: Any

  @nn.compact
  def __call__(self, input_ids, token_type_ids, train: bool):
    c = self.config
    length = input_ids.shape[-1]
    if length > c.max_position:
      raise ValueError(f"sequence length {length} exceeds max_position {c.max_position}")
    embed = lambda n, name: nn.Embed(n, c.hidden_size, dtype=self.dtype, embedding_init=_init,
                                     name=name)
    x = (embed(c.vocab_size, "word_embeddings")(input_ids)
         + embed(c.max_position, "position_embeddings")(jnp.arange(length))
         + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids))
    x = _layer_norm(c, self.dtype, "LayerNorm")(x)
    return Dropout(c.dropout, deterministic=not train)(x)


class _SelfAttention(nn.Module):
  config: BertConfig
  dtype: Any

  @nn.compact
  def __call__(self, x, mask, train: bool):
    c = self.config
    heads = lambda y: y.reshape(y.shape[:-1] + (c.num_heads, c.head_dim))
    # Scaling q (B*L*H values) is cheaper than scaling the (B, heads, L, L) scores.
    q = heads(_dense(c.hidden_size, self.dtype, "query")(x)) * (c.head_dim ** -0.5)
    k = heads(_dense(c.hidden_size, self.dtype, "key")(x))
    v = heads(_dense(c.hidden_size, self.dtype, "value")(x))
    # Scores and softmax in fp32 even for bf16 compute: the softmax is where bf16 hurts.
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
      # HF adds finfo.min at padded keys; `where` gives the same probs without overflow.
      scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    rate = c.dropout if c.attention_dropout is None else c.attention_dropout
    probs = Dropout(rate, deterministic=not train)(probs)
    a = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape)
    a = _dense(c.hidden_size, self.dtype, "output")(a)
    a = Dropout(c.dropout, deterministic=not train)(a)
    return _layer_norm(c, self.dtype, "LayerNorm")(x + a)


class _Layer(nn.Module):
  config: BertConfig
  dtype: Any

  @nn.compact
  def __call__(self, x, mask, train: bool):
    c = self.config
    x = _SelfAttention(c, self.dtype, name="attention")(x, mask, train)
    h = _dense(c.intermediate_size, self.dtype, "intermediate")(x)
    h = jax.nn.gelu(h, approximate=False)
    h = _dense(c.hidden_size, self.dtype, "output")(h)
    h = Dropout(c.dropout, deterministic=not train)(h)
    return _layer_norm(c, self.dtype, "output_LayerNorm")(x + h)


class BertEncoder(nn.Module):
  """BERT encoder returning the last hidden layer (no pooler).

  Attributes:
    config: the encoder's shape.
    dtype: compute dtype (params stay fp32; attention softmax and LayerNorm statistics
      are computed in fp32).
  """
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, train: bool = False):
    """Encodes token ids.

    Args:
      input_ids: int (B, L).
      attention_mask: (B, L), nonzero for tokens, 0 for padding keys; None attends to
        every position (how the DSRAN authors call BERT).
      token_type_ids: int (B, L); None means all zeros.
      train: enables dropout (rng collection `dropout`).

    Returns:
      last_hidden_state (B, L, hidden_size) in `dtype`.
    """
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    mask = None if attention_mask is None else attention_mask.astype(bool)
    x = _Embeddings(self.config, self.dtype, name="embeddings")(input_ids, token_type_ids, train)
    for i in range(self.config.num_layers):
      x = _Layer(self.config, self.dtype, name=f"layer_{i}")(x, mask, train)
    return x


# ----------------------------------------------------------------------------- weight map

def _transpose(w):
  return np.ascontiguousarray(w.T)


def _identity(w):
  return w


_P = r"^(?:bert\.)?"
_L = _P + r"encoder\.layer\.(\d+)\."

# (regex on the HF key, target path template with \N backrefs, transform).
WEIGHT_MAP: tuple[tuple[str, str, Callable[[np.ndarray], np.ndarray]], ...] = (
    (_P + r"embeddings\.(word|position|token_type)_embeddings\.weight$",
     r"embeddings/\1_embeddings/embedding", _identity),
    (_P + r"embeddings\.LayerNorm\.(?:weight|gamma)$", "embeddings/LayerNorm/scale", _identity),
    (_P + r"embeddings\.LayerNorm\.(?:bias|beta)$", "embeddings/LayerNorm/bias", _identity),
    (_L + r"attention\.self\.(query|key|value)\.weight$", r"layer_\1/attention/\2/kernel",
     _transpose),
    (_L + r"attention\.self\.(query|key|value)\.bias$", r"layer_\1/attention/\2/bias", _identity),
    (_L + r"attention\.output\.dense\.weight$", r"layer_\1/attention/output/kernel", _transpose),
    (_L + r"attention\.output\.dense\.bias$", r"layer_\1/attention/output/bias", _identity),
    (_L + r"attention\.output\.LayerNorm\.(?:weight|gamma)$", r"layer_\1/attention/LayerNorm/scale",
     _identity),
    (_L + r"attention\.output\.LayerNorm\.(?:bias|beta)$", r"layer_\1/attention/LayerNorm/bias",
     _identity),
    (_L + r"intermediate\.dense\.weight$", r"layer_\1/intermediate/kernel", _transpose),
    (_L + r"intermediate\.dense\.bias$", r"layer_\1/intermediate/bias", _identity),
    (_L + r"output\.dense\.weight$", r"layer_\1/output/kernel", _transpose),
    (_L + r"output\.dense\.bias$", r"layer_\1/output/bias", _identity),
    (_L + r"output\.LayerNorm\.(?:weight|gamma)$", r"layer_\1/output_LayerNorm/scale", _identity),
    (_L + r"output\.LayerNorm\.(?:bias|beta)$", r"layer_\1/output_LayerNorm/bias", _identity),
)

# Keys that carry nothing the encoder needs: pooler, pretraining heads, buffers.
IGNORED_KEYS = (_P + r"pooler\.", r"^cls\.", _P + r"embeddings\.position_ids$")

_COMPILED_MAP = tuple((re.compile(p), t, f) for p, t, f in WEIGHT_MAP)
_COMPILED_IGNORED = tuple(re.compile(p) for p in IGNORED_KEYS)


def infer_bert_config(bert_state: Mapping[str, np.ndarray], heads: Optional[int] = None):
  """The `BertConfig` whose weights these are (keys without the `txt_enc.bert.` prefix).

  The number of attention heads leaves no trace in the weights: `heads`, else
  hidden / 64 (every released BERT's head width).
  """
  words = require(bert_state, "embeddings.word_embeddings.weight", "the BERT vocabulary/width")
  pos = require(bert_state, "embeddings.position_embeddings.weight", "BERT max positions")
  types = require(bert_state, "embeddings.token_type_embeddings.weight", "BERT token types")
  inter = require(bert_state, "encoder.layer.0.intermediate.dense.weight",
                  "the BERT intermediate width")
  hidden = int(words.shape[1])
  if heads is None:
    if hidden % 64:
      raise ValueError(f"BERT hidden size {hidden} is not a multiple of 64: give the number "
                       f"of attention heads with --bert_heads")
    heads = hidden // 64
  if heads <= 0 or hidden % heads:
    raise ValueError(f"--bert_heads={heads} does not divide the BERT hidden size {hidden}")
  return BertConfig(vocab_size=int(words.shape[0]), hidden_size=hidden,
                    num_layers=layer_count(bert_state, r"encoder\.layer\."),
                    num_heads=heads, intermediate_size=int(inter.shape[0]),
                    max_position=int(pos.shape[0]), type_vocab_size=int(types.shape[0]))


def param_shapes(config: BertConfig) -> dict[str, tuple[int, ...]]:
  """Flat `{"a/b/c": shape}` of the params `BertEncoder(config)` creates (no compute)."""
  shapes = jax.eval_shape(
      lambda: BertEncoder(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  flat = traverse_util.flatten_dict(shapes["params"], sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


def hf_state_dict_to_params(state: Mapping[str, np.ndarray], config: BertConfig) -> dict:
  """Maps a Hugging Face BERT state dict onto the `BertEncoder` params tree.

  Args:
    state: HF key -> array (numpy or anything `np.asarray` accepts).
    config: the encoder the params are for; shapes are checked against it.

  Returns:
    The `params` collection as nested dicts of float32 numpy arrays.

  Raises:
    ValueError: listing unexpected keys (matching no rule and not ignored, or beyond the
      config's layers), missing params, keys mapping onto the same param, and shape
      mismatches (naming the tensor and both shapes).
  """
  expected = param_shapes(config)
  flat, source = {}, {}
  unexpected, duplicates, bad_shapes = [], [], []
  for key, value in state.items():
    if any(p.search(key) for p in _COMPILED_IGNORED):
      continue
    for pattern, template, transform in _COMPILED_MAP:
      m = pattern.match(key)
      if m:
        break
    else:
      unexpected.append(key)
      continue
    path = m.expand(template)
    if path not in expected:
      unexpected.append(key)
      continue
    if path in flat:
      duplicates.append(f"{source[path]} and {key} -> {path}")
      continue
    value = transform(np.asarray(value, dtype=np.float32))
    if value.shape != expected[path]:
      bad_shapes.append(f"{key} -> {path}: checkpoint shape {value.shape} after mapping, "
                        f"config expects {expected[path]}")
    flat[path], source[path] = value, key
  missing = sorted(set(expected) - set(flat))
  problems = []
  for title, items in (("unexpected keys", unexpected), ("missing params", missing),
                       ("keys mapping onto the same param", duplicates),
                       ("shape mismatches", bad_shapes)):
    if items:
      problems.append(f"{len(items)} {title}:\n  " + "\n  ".join(items))
  if problems:
    raise ValueError("BERT checkpoint does not match BertEncoder:\n" + "\n".join(problems))
  return traverse_util.unflatten_dict(flat, sep="/")


def load_hf_state_dict(directory: Union[str, os.PathLike]) -> dict[str, np.ndarray]:
  """Reads `model.safetensors` (preferred) or `pytorch_model.bin` from a HF model directory."""
  directory = Path(directory)
  st, pt = directory / "model.safetensors", directory / "pytorch_model.bin"
  if st.is_file():
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return dict(load_file(str(st)))
  if pt.is_file():
      # Read without torch; bfloat16 comes back as float32, what the params end up in.
    return dict(torch_pickle.load(pt))
  raise FileNotFoundError(
      f"no BERT weights in {directory}: looked for {st.name} and {pt.name}")


def load_hf_bert(path_or_name: Union[str, os.PathLike]) -> tuple[BertConfig, dict]:
  """Loads a HF BERT directory or hub name into `(BertConfig, params)` for `BertEncoder`."""
  directory = hub.resolve_pretrained_dir(str(path_or_name))
  config = BertConfig.from_hf_json(directory / "config.json")
  return config, hf_state_dict_to_params(load_hf_state_dict(directory), config)


def bert_config_of(section, name: str) -> BertConfig:
  """The BertConfig a family's section (`config.model.<name>`, with `bert_options`) asks
  for: its `bert.*` shape when `bert_random_init`, else `bert_path`'s config.json."""
  if section.bert_random_init:
    b = section.bert
    return BertConfig(vocab_size=b.vocab_size, hidden_size=b.hidden_size,
                      num_layers=b.num_layers, num_heads=b.num_heads,
                      intermediate_size=b.intermediate_size, max_position=b.max_position,
                      type_vocab_size=b.type_vocab_size)
  if not section.bert_path:
    raise ValueError(f"config.model.{name}.bert_path='': the BERT build needs a BERT "
                     f"directory or hub name (or model.{name}.bert_random_init=True)")
  return BertConfig.from_hf_json(hub.resolve_pretrained_dir(section.bert_path) / "config.json")


def with_pretrained_bert(variables: dict, path: str, text_module: str) -> dict:
  """`variables` with `params/<text_module>/bert` replaced by the pretrained BERT at
  `path` (a HF directory or hub name); a shape mismatch is an error showing both."""
  _, bert_params = load_hf_bert(path)
  params = dict(variables["params"])
  text = dict(params[text_module])
  expected = jax.tree_util.tree_map(jnp.shape, text["bert"])
  got = jax.tree_util.tree_map(np.shape, bert_params)
  if expected != got:
    raise ValueError(f"pretrained BERT at {path!r} does not match the model's BERT "
                     f"shapes:\nexpected {json.dumps(expected, default=str)[:500]}\n"
                     f"got {json.dumps(got, default=str)[:500]}")
  text["bert"] = jax.tree_util.tree_map(jnp.asarray, bert_params)
  params[text_module] = text
  return {**variables, "params": params}
