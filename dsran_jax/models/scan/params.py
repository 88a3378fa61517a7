"""SCAN's PyTorch checkpoint rules (kuanghuei/SCAN train.py layout) for `tools.convert_torch`.

Their `model_best.pth.tar` is
`{"model": [img_enc.state_dict(), txt_enc.state_dict()], "opt": argparse.Namespace,
"epoch", "best_rsum", "Eiters"}`:

    img_enc: fc.weight (E, img_dim), fc.bias          (--precomp_enc_type=basic)
             fc.weight_g (), fc.weight_v, fc.bias       (--precomp_enc_type=weight_norm)
    txt_enc: embed.weight (V, word_dim)
             rnn.{weight_ih,weight_hh,bias_ih,bias_hh}_l{n}[_reverse]   (nn.GRU, r|z|n gates)

`opt` holds every train.py option; the ones that change the model become
`config.model.scan.*` (and the widths `model.embed_size`, `word_dim`, `img_dim`,
`vocab_size`), checked against the weights' shapes. Their vocabulary file
`vocab/{f30k,coco}_precomp_vocab.json` (`{"word2idx", "idx2word", "idx"}`) is read by
`convert.authors_vocab` into our `Vocabulary` with the ids unchanged.
"""
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from dsran_jax import models
from dsran_jax.convert import authors_vocab
from dsran_jax.convert.engine import (ConversionError, Converted, detected_state_dicts,
                                      map_state_dict_reporting, opt_of, state_dicts, to_numpy,
                                      validate_workdir_config, workdir_config)
from dsran_jax.models.scan import config as scan_config
from dsran_jax.models.variables import variable_shapes

FAMILY = "scan"
# train.py flags that change the model; same names under config.model.scan.
SCAN_OPTS = ("cross_attn", "agg_func", "lambda_softmax", "lambda_lse", "raw_feature_norm",
             "bi_gru", "num_layers", "no_imgnorm", "no_txtnorm", "precomp_enc_type")
# Keys only SCAN's train.py writes together (DSRAN/SGRAF/MLASM opts lack some of them).
_SIGNATURE = ("cross_attn", "agg_func", "lambda_softmax", "raw_feature_norm")

# The engine's table covers the Linear, the embedding and the GRU's first layer (both
# directions); weight_norm's (g, v) and GRU layers > 0 are mapped here (`_extra`).
RULES = [
    (r"^img_enc\.fc$", "img_enc/fc", "linear"),
    (r"^txt_enc\.embed$", "txt_enc/embed", "embed"),
    (r"^txt_enc\.rnn$", "txt_enc/gru", "gru"),
]
_GRU_LEAF = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)(_reverse)?$")
_GRU_NAMES = {"weight_ih": ("w_ih", True), "weight_hh": ("w_hh", True),
              "bias_ih": ("b_ih", False), "bias_hh": ("b_hh", False)}


def _encoder_states(ckpt: Mapping[str, Any], what: str) -> Tuple[Dict[str, np.ndarray],
                                                                 Dict[str, np.ndarray]]:
  img, txt = state_dicts(ckpt, 2, what)
  return ({k: to_numpy(v) for k, v in img.items()}, {k: to_numpy(v) for k, v in txt.items()})


def detect(ckpt: Mapping[str, Any]) -> bool:
  """True for a SCAN train.py checkpoint: its `model` is the two state dicts
  [img_enc (fc.*), txt_enc (embed.*, rnn.*)] and its `opt`, when present, has SCAN's
  cross-attention flags."""
  found = detected_state_dicts(ckpt, 2)
  if found is None:
    return False
  img, txt = found
  layout = (bool(img) and all(k.startswith("fc.") for k in img)
            and "embed.weight" in txt and any(k.startswith("rnn.") for k in txt))
  opt = opt_of(ckpt)
  return layout and (not opt or all(k in opt for k in _SIGNATURE))


def _need(sd: Mapping[str, np.ndarray], key: str, where: str) -> np.ndarray:
  if key not in sd:
    raise ValueError(f"missing {where} param {key}; keys: {sorted(sd)[:8]}")
  return sd[key]


def model_options(opt: Mapping[str, Any], img: Mapping[str, np.ndarray],
                  txt: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  """`config.model` values (flat: widths, plus `scan.<key>`) implied by opt and weights.

  The widths are read off the weights; where `opt` also states one, they must agree.
  """
  enc_type = "weight_norm" if "fc.weight_v" in img else "basic"
  if opt.get("precomp_enc_type", enc_type) != enc_type:
    raise ValueError(f"opt.precomp_enc_type={opt['precomp_enc_type']!r} but img_enc holds "
                     f"{sorted(img)} ({enc_type})")
  w = _need(img, "fc.weight_v" if enc_type == "weight_norm" else "fc.weight", "img_enc")
  emb = _need(txt, "embed.weight", "txt_enc")
  layers = sorted({int(m.group(2)) for k in txt for m in [_GRU_LEAF.match(k[4:])]
                   if k.startswith("rnn.") and m})
  if layers != list(range(len(layers))) or not layers:
    raise ValueError(f"txt_enc rnn.* layers {layers}: expected 0..n-1")
  bi = any(k.endswith("_reverse") for k in txt)
  out = {"embed_size": int(w.shape[0]), "img_dim": int(w.shape[1]),
         "vocab_size": int(emb.shape[0]), "word_dim": int(emb.shape[1]),
         "scan.num_layers": len(layers), "scan.bi_gru": bi,
         "scan.precomp_enc_type": enc_type}
  checks = {"embed_size": "embed_size", "img_dim": "img_dim", "vocab_size": "vocab_size",
            "word_dim": "word_dim", "num_layers": "scan.num_layers", "bi_gru": "scan.bi_gru"}
  for key, ours in checks.items():
    if key in opt and opt[key] != out[ours]:
      raise ValueError(f"opt.{key}={opt[key]!r} but the weights say {out[ours]!r} "
                       f"({'fc' if key in ('embed_size', 'img_dim') else 'txt_enc'} shapes)")
  for key in SCAN_OPTS:
    if key in opt and f"scan.{key}" not in out:
      out[f"scan.{key}"] = opt[key]
  return out


def _extra(img: Mapping[str, np.ndarray], txt: Mapping[str, np.ndarray],
           expected: Mapping[str, Tuple[int, ...]]) -> Tuple[dict, List[str], dict]:
  """The leaves the engine's table does not cover: `(flat variables, problems, rest of
  the state for the engine)`; shapes are checked here (the engine adds extras as given)."""
  flat, problems, rest = {}, [], {}

  def put(key, path, value):
    if path not in expected:
      problems.append(f"unexpected key {key} (would be {path}, which the model does not "
                      f"have)")
    elif tuple(value.shape) != tuple(expected[path]):
      problems.append(f"shape mismatch {key} -> {path}: checkpoint {tuple(value.shape)} "
                      f"(after mapping), model expects {tuple(expected[path])}")
    else:
      flat[path] = value

  for key, value in img.items():
    if key == "fc.weight_v":
      put("img_enc.fc.weight_v", "params/img_enc/fc/v", np.ascontiguousarray(value.T))
    elif key == "fc.weight_g":
      # PyTorch 0.3 saved weight_norm(dim=None)'s g with shape (1,), current ones ().
      if value.size != 1:
        problems.append(f"shape mismatch img_enc.fc.weight_g: {tuple(value.shape)}, "
                        f"expected a scalar")
      else:
        put("img_enc.fc.weight_g", "params/img_enc/fc/g", value.reshape(()))
    else:
      rest[f"img_enc.{key}"] = value
  for key, value in txt.items():
    m = _GRU_LEAF.match(key[len("rnn."):]) if key.startswith("rnn.") else None
    if m and int(m.group(2)) > 0:
      name, transpose = _GRU_NAMES[m.group(1)]
      module = f"gru_l{m.group(2)}{m.group(3) or ''}"
      put(f"txt_enc.{key}", f"params/txt_enc/{module}/{name}",
          np.ascontiguousarray(value.T) if transpose else value)
    else:
      rest[f"txt_enc.{key}"] = value
  return flat, problems, rest


def convert_state_dicts(img: Mapping[str, np.ndarray], txt: Mapping[str, np.ndarray],
                        expected: Mapping[str, Tuple[int, ...]],
                        what: str = "SCAN checkpoint") -> dict:
  """Maps SCAN's img_enc / txt_enc state dicts (numpy) onto our `{"params", ...}`.

  Args:
    expected: `variables.variable_shapes(model)` of the model they should fill.

  Raises:
    ConversionError naming every unexpected key, missing param and shape mismatch.
  """
  flat, problems, rest = _extra(img, txt, expected)
  return map_state_dict_reporting(rest, RULES, expected, what, "SCAN", flat, problems)


def make_config(c, model_opts: Mapping[str, Any], opt: Mapping[str, Any]):
  """The workdir config: the base config `c` with model.name="scan", the model options
  the checkpoint implies (every model.scan key written out), the recipe its `opt`
  records (for fine-tuning) and the precomp data layout SCAN trains on."""
  c = workdir_config(c, FAMILY, model_opts, opt, "precomp")
  return validate_workdir_config(c, "a SCAN", scan_config.validate)


def convert(ckpt: Mapping[str, Any], options: Optional[Mapping[str, Any]] = None, *,
            config) -> Converted:
  """A loaded SCAN checkpoint (`convert.engine.load_checkpoint`) as a workdir's content.

  Args:
    ckpt: the checkpoint dict ("model": [img_enc, txt_enc], "opt", ...), numpy tensors.
    options: converter options; SCAN reads `vocab` (their `*_precomp_vocab.json` or a
      dsran_jax vocab.json) and `path` (for messages). The data layout is always
      "precomp", the features SCAN is trained on.
    config: the base config (`default_config.get_base_config()`, from the caller), filled
      in as the workdir's config.
  """
  options = dict(options or {})
  what = f"SCAN checkpoint {options['path']}" if options.get("path") else "SCAN checkpoint"
  img, txt = _encoder_states(ckpt, what)
  opt = opt_of(ckpt)
  try:
    model_opts = model_options(opt, img, txt)
  except ValueError as e:
    raise ConversionError(f"{what}: {e}") from None
  config = make_config(config, model_opts, opt)
  model = models.build_model(config.model, config.model.vocab_size)
  variables = convert_state_dicts(img, txt, variable_shapes(model), what)
  vocab = None
  if options.get("vocab"):
    vocab = authors_vocab.load_checked_vocab(options["vocab"], config.model.vocab_size,
                                             "txt_enc.embed.weight")
  s = config.model.scan
  summary = {"cross_attn": s.cross_attn, "agg_func": s.agg_func, "bi_gru": s.bi_gru,
             "raw_feature_norm": s.raw_feature_norm, "embed_size": config.model.embed_size,
             "img_dim": config.model.img_dim, "vocab_size": config.model.vocab_size}
  if vocab is None:
    summary["note"] = ("no --vocab given; encode_texts(texts=...) needs the authors' "
                       "vocab/<data_name>_vocab.json converted with --vocab=...")
  return Converted(variables, config, vocab, summary)
