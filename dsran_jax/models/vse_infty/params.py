"""VSE∞'s PyTorch checkpoint rules (woodfrog/vse_infty train.py layout, also the files of
their Hugging Face release `cccjc/vse-infty`) for `tools.convert_torch`.

`model_best.pth` is `{"model": [img_enc.state_dict(), txt_enc.state_dict()], "opt":
argparse.Namespace, "epoch", "best_rsum", "Eiters"}`. The BERT build (`master`) wraps
both encoders in nn.DataParallel before saving, so every key carries `module.`; the
BiGRU branch saves them bare:

    img_enc: fc.{weight,bias} (E, img_dim)
             mlp.layers.{0,1}.{weight,bias}, mlp.bns.{0,1}.{weight,bias,running_*}
                                                         (precomp_enc_type=basic; bns.1
                                                          is never called: dropped)
             gpool.gru.*_l0[_reverse] (32 -> 32), gpool.linear.weight (1, 32)
    txt_enc: bert.* (BertModel) + linear.{weight,bias} (E, hidden)          (BERT)
             embed.weight (V + 1, word_dim) + rnn.*_l{n}[_reverse]          (BiGRU)
             gpool.* as img_enc

The BERT config is in no checkpoint: its shape is read off the weights and its heads from
`--bert_path`'s config.json (else hidden / 64); `--bert_path` also gives the tokenizer.
The BiGRU vocabulary (SCAN's `vocab/{f30k,coco}_precomp_vocab.json`, `--vocab`) has one
word fewer than the embedding has rows: their train.py appends `<mask>` after it.
"""
import json
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from dsran_jax import models
from dsran_jax.convert import authors_vocab
from dsran_jax.convert.engine import (DROP, ConversionError, Converted, flatten,
                                      map_state_dict, opt_of, state_dicts, strip_prefix,
                                      to_numpy, validate_workdir_config, workdir_config)
from dsran_jax.models.common.bert import hf_state_dict_to_params
from dsran_jax.models.dsran.params import infer_bert_config
from dsran_jax.models.variables import variable_shapes
from dsran_jax.models.vse_infty import config as vse_config

FAMILY = "vse_infty"

RULES = [
    (r"^img_enc\.fc$", "img_enc/fc", "linear"),
    (r"^img_enc\.mlp\.layers\.([01])$", r"img_enc/mlp/layer_\1", "linear"),
    (r"^img_enc\.mlp\.bns\.0$", "img_enc/mlp/bn_0", "bn"),
    (r"^img_enc\.mlp\.bns\.1$", "", DROP),  # built by their MLP, never called
    (r"^(img_enc|txt_enc)\.gpool\.gru$", r"\1/gpool/gru", "gru"),
    (r"^(img_enc|txt_enc)\.gpool\.linear$", r"\1/gpool/linear", "linear"),
    (r"^txt_enc\.linear$", "txt_enc/linear", "linear"),
    (r"^txt_enc\.rnn$", "txt_enc/gru", "gru"),
]
GRU_LEAF = re.compile(r"^rnn\.(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)(_reverse)?$")
_GRU_NAMES = {"weight_ih": ("w_ih", True), "weight_hh": ("w_hh", True),
              "bias_ih": ("b_ih", False), "bias_hh": ("b_hh", False)}
BERT_PREFIX = "bert."


def _states(ckpt: Mapping[str, Any], what: str):
  img, txt = state_dicts(ckpt, 2, what)
  return ({k: to_numpy(v) for k, v in strip_prefix(img).items()},
          {k: to_numpy(v) for k, v in strip_prefix(txt).items()})


def detect(ckpt: Mapping[str, Any]) -> bool:
  """True for a VSE∞ train.py checkpoint: two state dicts whose encoders both end in
  GPO (`gpool.*`), the image side with `fc`, the text side BERT + `linear` or
  `embed` + `rnn`."""
  if not isinstance(ckpt, Mapping):
    return False
  try:
    img, txt = state_dicts(ckpt, 2, "checkpoint")
  except ConversionError:
    return False
  img, txt = strip_prefix(img), strip_prefix(txt)
  gpo = "gpool.gru.weight_ih_l0"
  text = (any(k.startswith(BERT_PREFIX) for k in txt) and "linear.weight" in txt) or (
      "embed.weight" in txt and any(k.startswith("rnn.") for k in txt))
  return gpo in img and gpo in txt and "fc.weight" in img and text


def _need(sd: Mapping[str, np.ndarray], key: str, where: str) -> np.ndarray:
  if key not in sd:
    raise ValueError(f"missing {where} param {key}; keys: {sorted(sd)[:8]}")
  return sd[key]


def heads_from_bert_dir(bert_path: str, hidden: int) -> Optional[int]:
  """num_attention_heads of a local BERT directory's config.json of width `hidden`."""
  cfg = os.path.join(os.path.expanduser(bert_path), "config.json") if bert_path else ""
  if not cfg or not os.path.isfile(cfg):
    return None
  with open(cfg, encoding="utf-8") as f:
    d = json.load(f)
  return d.get("num_attention_heads") if d.get("hidden_size") == hidden else None


def model_options(opt: Mapping[str, Any], img: Mapping[str, np.ndarray],
                  txt: Mapping[str, np.ndarray], bert_path: str = "",
                  bert_heads: Optional[int] = None) -> Dict[str, Any]:
  """`config.model` values (flat: widths, `vse_infty.<key>`, `bert`: a BertConfig)
  implied by the weights; where `opt` states one too, they must agree. BERT heads:
  `bert_heads`, else `bert_path`'s config.json, else hidden / 64."""
  fc = _need(img, "fc.weight", "img_enc")
  enc_type = "basic" if any(k.startswith("mlp.") for k in img) else "backbone"
  if opt.get("precomp_enc_type", enc_type) != enc_type:
    raise ValueError(f"opt.precomp_enc_type={opt['precomp_enc_type']!r} but img_enc "
                     f"{'has' if enc_type == 'basic' else 'lacks'} the mlp.* branch")
  out: Dict[str, Any] = {"embed_size": int(fc.shape[0]), "img_dim": int(fc.shape[1]),
                         "vse_infty.precomp_enc_type": enc_type}
  if any(k.startswith(BERT_PREFIX) for k in txt):
    bert_state = {k[len(BERT_PREFIX):]: v for k, v in txt.items() if k.startswith(BERT_PREFIX)}
    hidden = int(_need(bert_state, "embeddings.word_embeddings.weight", "txt_enc.bert").shape[1])
    out["vse_infty.text_encoder"] = "bert"
    heads = bert_heads or heads_from_bert_dir(bert_path, hidden)
    out["bert"] = infer_bert_config(bert_state, heads)
  else:
    emb = _need(txt, "embed.weight", "txt_enc")
    layers = sorted({int(m.group(2)) for k in txt for m in [GRU_LEAF.match(k)] if m})
    if not layers or layers != list(range(len(layers))):
      raise ValueError(f"txt_enc rnn.* layers {layers}: expected 0..n-1")
    if not any(k.endswith("_reverse") for k in txt):
      raise ValueError("txt_enc.rnn is not bidirectional (their BiGRU build always is)")
    out.update({"vse_infty.text_encoder": "bigru", "vse_infty.num_layers": len(layers),
                "vocab_size": int(emb.shape[0]) - 1, "word_dim": int(emb.shape[1])})
  checks = {"embed_size": "embed_size", "img_dim": "img_dim", "word_dim": "word_dim",
            "num_layers": "vse_infty.num_layers"}
  for key, ours in checks.items():
    if key in opt and ours in out and opt[key] != out[ours]:
      raise ValueError(f"opt.{key}={opt[key]!r} but the weights say {out[ours]!r}")
  if "vocab_size" in opt and "vocab_size" in out and opt["vocab_size"] != out["vocab_size"] + 1:
    raise ValueError(f"opt.vocab_size={opt['vocab_size']} but txt_enc.embed.weight has "
                     f"{out['vocab_size'] + 1} rows")
  for key in ("no_imgnorm", "no_txtnorm"):
    if key in opt:
      out[f"vse_infty.{key}"] = bool(opt[key])
  return out


def bigru_extra(txt: Mapping[str, np.ndarray]) -> Tuple[dict, dict]:
  """What the rule table does not map, `(flat variables, rest)`: BiGRU layers > 0 (the
  engine's "gru" kind maps layer 0), and `embed.weight` split into the words' rows and
  the last row, their `<mask>`."""
  flat, rest = {}, {}
  for key, value in txt.items():
    m = GRU_LEAF.match(key)
    if key == "embed.weight":
      flat["params/txt_enc/embed/embedding"] = value[:-1]
      flat["params/txt_enc/embed/mask"] = value[-1:]
    elif m and int(m.group(2)) > 0:
      name, transpose = _GRU_NAMES[m.group(1)]
      flat[f"params/txt_enc/gru_l{m.group(2)}{m.group(3) or ''}/{name}"] = (
          np.ascontiguousarray(value.T) if transpose else value)
    else:
      rest[key] = value
  return flat, rest


def convert_state_dicts(img: Mapping[str, np.ndarray], txt: Mapping[str, np.ndarray],
                        expected: Mapping[str, Tuple[int, ...]], bert=None,
                        what: str = "VSE∞ checkpoint") -> dict:
  """Maps VSE∞'s img_enc / txt_enc state dicts (numpy, `module.` stripped) onto our
  `{"params", "batch_stats"}`; `bert`: the BertConfig of a BERT build.

  Raises:
    ConversionError naming every unexpected key, missing param and shape mismatch.
  """
  extra, txt = bigru_extra(txt)
  problems: List[str] = []
  if bert is not None:
    bert_state = {k[len(BERT_PREFIX):]: v for k, v in txt.items() if k.startswith(BERT_PREFIX)}
    txt = {k: v for k, v in txt.items() if not k.startswith(BERT_PREFIX)}
    prefix = "params/txt_enc/bert/"
    try:
      extra.update({prefix + k: v for k, v in
                    flatten(hf_state_dict_to_params(bert_state, bert)).items()})
    except ValueError as e:
      problems.append(f"in txt_enc.bert.* (inferred {bert}): {e}")
      extra.update({k: np.zeros(s, np.float32) for k, s in expected.items()
                    if k.startswith(prefix)})
  state = {**{f"img_enc.{k}": v for k, v in img.items()},
           **{f"txt_enc.{k}": v for k, v in txt.items()}}
  try:
    variables = map_state_dict(state, RULES, expected, what, extra=extra)
  except ConversionError as e:
    problems.append(str(e))
  if problems:
    raise ConversionError(f"{what} does not match dsran_jax's VSE∞:\n" + "\n".join(problems))
  return variables


def make_config(c, model_opts: Mapping[str, Any], opt: Mapping[str, Any], bert_path: str):
  """The workdir config: the base config `c` with model.name="vse_infty", the model the
  weights imply (a BERT build's shape as `bert.*` with `bert_random_init`: the weights
  come from the checkpoint, the tokenizer from `bert_path`), the recipe `opt` records
  and the precomp data layout."""
  flat = {k: v for k, v in model_opts.items() if k != "bert"}
  c = workdir_config(c, FAMILY, flat, opt, "precomp")
  s = c.model.vse_infty
  bert = model_opts.get("bert")
  text_encoder = s.text_encoder
  if bert is not None:
    s.bert_random_init = True
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                "max_position", "type_vocab_size"):
      s.bert[key] = getattr(bert, key)
    s.bert_path = bert_path
  c.train.optimizer = "adamw"
  c.train.weight_decay = vse_config.WEIGHT_DECAY[text_encoder]
  c.train.bert_lr_scale = vse_config.BERT_LR_FACTOR[text_encoder]
  c.train.max_violation = True  # their train.py turns it on after the warm-up epochs
  return validate_workdir_config(c, "a VSE∞", vse_config.validate)


def convert(ckpt: Mapping[str, Any], options: Optional[Mapping[str, Any]] = None, *,
            config) -> Converted:
  """A loaded VSE∞ checkpoint (`convert.engine.load_checkpoint`) as a workdir's content.

  Args:
    ckpt: the checkpoint dict ("model": [img_enc, txt_enc], "opt", ...), numpy tensors.
    options: `bert_path` (BERT build: tokenizer and head count), `bert_heads`, `vocab` (BiGRU build:
      their `*_precomp_vocab.json`), `path` (for messages).
    config: the base config, filled in as the workdir's.
  """
  options = dict(options or {})
  what = f"VSE∞ checkpoint {options['path']}" if options.get("path") else "VSE∞ checkpoint"
  img, txt = _states(ckpt, what)
  opt = opt_of(ckpt)
  bert_path = options.get("bert_path") or ""
  try:
    model_opts = model_options(opt, img, txt, bert_path, options.get("bert_heads"))
  except ValueError as e:
    raise ConversionError(f"{what}: {e}") from None
  config = make_config(config, model_opts, opt, bert_path)
  model = models.build_model(config.model, config.model.vocab_size or None)
  variables = convert_state_dicts(img, txt, variable_shapes(model), model_opts.get("bert"),
                                  what)
  s = config.model.vse_infty
  vocab = None
  if options.get("vocab"):
    if s.text_encoder != "bigru":
      raise ConversionError("--vocab is for VSE∞'s BiGRU build; the BERT build's tokenizer "
                            "comes from --bert_path")
    vocab = authors_vocab.load_checked_vocab(
        options["vocab"], config.model.vocab_size,
        "txt_enc.embed.weight (less the <mask> row their train.py appends)")
  summary = {"text_encoder": s.text_encoder, "precomp_enc_type": s.precomp_enc_type,
             "embed_size": config.model.embed_size, "img_dim": config.model.img_dim}
  if s.text_encoder == "bert":
    bert = model_opts["bert"]
    summary["bert"] = {k: getattr(bert, k) for k in
                       ("hidden_size", "num_layers", "num_heads", "intermediate_size")}
    summary["bert_path"] = bert_path
    if not bert_path:
      summary["note"] = ("no --bert_path given; encode_texts(texts=...) needs "
                         "model.vse_infty.bert_path (a BERT directory with vocab.txt) set "
                         "in config.json")
  else:
    summary["vocab_size"] = config.model.vocab_size
    if vocab is None:
      summary["note"] = ("no --vocab given; encode_texts(texts=...) needs their "
                         "vocab/<data_name>_precomp_vocab.json converted with --vocab=...")
  return Converted(variables, config, vocab, summary)
