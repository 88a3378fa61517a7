"""PyTorch checkpoint conversion shared by the VSE∞ lineage (VSE∞, CHAN, HREM: models
trained from woodfrog/vse_infty's code), for their families' `params.py`.

Their train.py saves `{"model": [img_enc, txt_enc, ...] state dicts, "opt", ...}`; the
text encoder is BERT (`bert.*` + `linear`) or, in the BiGRU builds, `embed` (one row
more than the vocabulary: their `<mask>`) + a bidirectional `rnn`. A family supplies
what differs (its state-dict split, its rules, its model options and its workdir
config); `convert` runs the steps every one of them takes, in one order:

    split -> model options (from the weights and `opt`) -> workdir config -> build the
    model -> map the state dicts -> the word vocabulary (BiGRU) -> the summary.
"""
import json
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from dsran_jax import models
from dsran_jax.convert import authors_vocab
from dsran_jax.convert.engine import (ConversionError, Converted, flatten,
                                      map_state_dict_reporting, opt_of, strip_prefix,
                                      to_numpy)
from dsran_jax.models.common.bert import hf_state_dict_to_params, infer_bert_config
from dsran_jax.models.common.options import BERT_SHAPE
from dsran_jax.models.variables import variable_shapes

BERT_PREFIX = "bert."
GRU_LEAF = re.compile(r"^rnn\.(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)(_reverse)?$")
_GRU_NAMES = {"weight_ih": ("w_ih", True), "weight_hh": ("w_hh", True),
              "bias_ih": ("b_ih", False), "bias_hh": ("b_hh", False)}
BERT_SUMMARY = ("hidden_size", "num_layers", "num_heads", "intermediate_size")


def encoder_states(img: Mapping[str, Any], txt: Mapping[str, Any]):
  """The image and text encoders' state dicts as numpy, `module.` (DataParallel)
  stripped."""
  return ({k: to_numpy(v) for k, v in strip_prefix(img).items()},
          {k: to_numpy(v) for k, v in strip_prefix(txt).items()})


def has_text_encoder(txt: Mapping[str, Any]) -> bool:
  """True when `txt` (prefix-stripped) is their BERT + `linear` or `embed` + `rnn`
  text encoder."""
  bert = any(k.startswith(BERT_PREFIX) for k in txt) and "linear.weight" in txt
  return bert or ("embed.weight" in txt and any(k.startswith("rnn.") for k in txt))


def need(sd: Mapping[str, np.ndarray], key: str, where: str) -> np.ndarray:
  """`sd[key]`, else a ValueError naming `where` ("img_enc") and the first keys."""
  if key not in sd:
    raise ValueError(f"missing {where} param {key}; keys: {sorted(sd)[:8]}")
  return sd[key]


def split_bert(txt: Mapping[str, np.ndarray]) -> Tuple[dict, dict]:
  """`(bert.* without the prefix, the rest)` of a text encoder's state dict."""
  bert = {k[len(BERT_PREFIX):]: v for k, v in txt.items() if k.startswith(BERT_PREFIX)}
  return bert, {k: v for k, v in txt.items() if not k.startswith(BERT_PREFIX)}


def heads_from_bert_dir(bert_path: str, hidden: int) -> Optional[int]:
  """num_attention_heads of a local BERT directory's config.json of width `hidden`."""
  cfg = os.path.join(os.path.expanduser(bert_path), "config.json") if bert_path else ""
  if not cfg or not os.path.isfile(cfg):
    return None
  with open(cfg, encoding="utf-8") as f:
    d = json.load(f)
  return d.get("num_attention_heads") if d.get("hidden_size") == hidden else None


def bert_config(txt: Mapping[str, np.ndarray], bert_path: str = "",
                bert_heads: Optional[int] = None):
  """The BertConfig of the text encoder's `bert.*` weights; heads: `bert_heads`, else
  `bert_path`'s config.json, else hidden / 64."""
  bert_state, _ = split_bert(txt)
  hidden = int(need(bert_state, "embeddings.word_embeddings.weight", "txt_enc.bert").shape[1])
  return infer_bert_config(bert_state, bert_heads or heads_from_bert_dir(bert_path, hidden))


def text_options(txt: Mapping[str, np.ndarray], section: str, bert_path: str = "",
                 bert_heads: Optional[int] = None) -> Dict[str, Any]:
  """The `config.model` values of a BERT or BiGRU text encoder: `<section>.text_encoder`
  and `bert` (a BertConfig), or the BiGRU's layers, `vocab_size` (the embedding's rows
  less `<mask>`) and `word_dim`."""
  if any(k.startswith(BERT_PREFIX) for k in txt):
    return {f"{section}.text_encoder": "bert", "bert": bert_config(txt, bert_path, bert_heads)}
  emb = need(txt, "embed.weight", "txt_enc")
  layers = sorted({int(m.group(2)) for k in txt for m in [GRU_LEAF.match(k)] if m})
  if not layers or layers != list(range(len(layers))):
    raise ValueError(f"txt_enc rnn.* layers {layers}: expected 0..n-1")
  if not any(k.endswith("_reverse") for k in txt):
    raise ValueError("txt_enc.rnn is not bidirectional (their BiGRU build always is)")
  return {f"{section}.text_encoder": "bigru", f"{section}.num_layers": len(layers),
          "vocab_size": int(emb.shape[0]) - 1, "word_dim": int(emb.shape[1])}


def check_opt_widths(opt: Mapping[str, Any], out: Mapping[str, Any], section: str) -> None:
  """Raises ValueError where `opt` states a width (or BiGRU layer count, or vocabulary
  size with their `<mask>`) other than the weights' (`out`, the model options)."""
  checks = {"embed_size": "embed_size", "img_dim": "img_dim", "word_dim": "word_dim",
            "num_layers": f"{section}.num_layers"}
  for key, ours in checks.items():
    if key in opt and ours in out and opt[key] != out[ours]:
      raise ValueError(f"opt.{key}={opt[key]!r} but the weights say {out[ours]!r}")
  if "vocab_size" in opt and "vocab_size" in out and opt["vocab_size"] != out["vocab_size"] + 1:
    raise ValueError(f"opt.vocab_size={opt['vocab_size']} but txt_enc.embed.weight has "
                     f"{out['vocab_size'] + 1} rows")


def bigru_extra(txt: Mapping[str, np.ndarray]) -> Tuple[dict, dict]:
  """What a rule table does not map, `(flat variables, rest)`: BiGRU layers > 0 (the
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


def map_encoders(img: Mapping[str, np.ndarray], txt: Mapping[str, np.ndarray], rules,
                 expected: Mapping[str, Tuple[int, ...]], bert, what: str, model: str,
                 extra: Optional[Mapping[str, np.ndarray]] = None) -> dict:
  """Maps img_enc / txt_enc state dicts (numpy, `module.` stripped) onto `{"params",
  "batch_stats"}` with the family's `rules`; `bert`: the BertConfig of a BERT text
  encoder (its `bert.*` go through `common.bert`), None for none; `extra`: flat
  variables the family mapped itself; `model` names dsran_jax's model in messages.

  Raises:
    ConversionError naming every unexpected key, missing param and shape mismatch.
  """
  extra = dict(extra or {})
  problems: List[str] = []
  if bert is not None:
    bert_state, txt = split_bert(txt)
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
  return map_state_dict_reporting(state, rules, expected, what, model, extra, problems)


def set_bert_shape(section, bert, bert_path: str) -> None:
  """Writes a converted BERT's shape into `config.model.<section>` (`bert.*` with
  `bert_random_init`: the weights come from the checkpoint) and `bert_path` (the
  tokenizer)."""
  section.bert_random_init = True
  for key, _, _ in BERT_SHAPE:
    section.bert[key] = getattr(bert, key)
  section.bert_path = bert_path


def convert(ckpt: Mapping[str, Any], options: Optional[Mapping[str, Any]], config, *,
            name: str, section: str,
            split: Callable[[Mapping[str, Any], str], Tuple[dict, dict]],
            model_options: Callable[..., Dict[str, Any]],
            make_config: Callable[..., Any],
            convert_state_dicts: Callable[..., dict],
            summary: Callable[[Any, Mapping[str, Any]], Tuple[dict, List[str]]],
            word_vocab: bool = True) -> Converted:
  """A loaded checkpoint of a VSE∞-lineage family as a workdir's content.

  Args:
    ckpt: the checkpoint dict (`convert.engine.load_checkpoint`), numpy tensors.
    options: `bert_path` (BERT build: tokenizer and head count), `bert_heads`, `vocab`
      (BiGRU build: their `*_precomp_vocab.json`), `path` (for messages).
    config: the base config, filled in as the workdir's.
    name: the family in messages ("VSE∞"); section: its `config.model` key.
    split: `(ckpt, what) -> (img, txt)` numpy state dicts.
    model_options: `(opt, img, txt, bert_path, bert_heads) -> dict`, ValueError on a
      mismatch.
    make_config: `(config, model_options, opt, bert_path) -> config`.
    convert_state_dicts: `(img, txt, expected, bert, what) -> variables`.
    summary: `(config, opt) -> (the family's summary fields, notes)`.
    word_vocab: False for a family without a word-vocabulary build (`--vocab` refused).
  """
  options = dict(options or {})
  what = f"{name} checkpoint {options['path']}" if options.get("path") else f"{name} checkpoint"
  img, txt = split(ckpt, what)
  opt = opt_of(ckpt)
  bert_path = options.get("bert_path") or ""
  if options.get("vocab") and not word_vocab:
    raise ConversionError(f"--vocab is for word-vocabulary models; {name}'s tokenizer (BERT "
                          f"WordPiece) comes from --bert_path")
  try:
    model_opts = model_options(opt, img, txt, bert_path, options.get("bert_heads"))
  except ValueError as e:
    raise ConversionError(f"{what}: {e}") from None
  config = make_config(config, model_opts, opt, bert_path)
  model = models.build_model(config.model, config.model.vocab_size or None)
  variables = convert_state_dicts(img, txt, variable_shapes(model), model_opts.get("bert"),
                                  what)
  text_encoder = config.model[section].get("text_encoder", "bert")
  vocab = None
  if options.get("vocab"):
    if text_encoder != "bigru":
      raise ConversionError(f"--vocab is for {name}'s BiGRU build; the BERT build's "
                            f"tokenizer comes from --bert_path")
    vocab = authors_vocab.load_checked_vocab(
        options["vocab"], config.model.vocab_size,
        "txt_enc.embed.weight (less the <mask> row their train.py appends)")
  out, notes = summary(config, opt)
  if text_encoder == "bert":
    out["bert"] = {k: getattr(model_opts["bert"], k) for k in BERT_SUMMARY}
    out["bert_path"] = bert_path
    if not bert_path:
      notes.append(f"no --bert_path given; encode_texts(texts=...) needs "
                   f"model.{section}.bert_path (a BERT directory with vocab.txt) set in "
                   f"config.json")
  else:
    out["vocab_size"] = config.model.vocab_size
    if vocab is None:
      notes.append("no --vocab given; encode_texts(texts=...) needs their "
                   "vocab/<data_name>_precomp_vocab.json converted with --vocab=...")
  if notes:
    out["note"] = "; ".join(notes)
  return Converted(variables, config, vocab, out)
