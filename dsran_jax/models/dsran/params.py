"""DSRAN's converter rules: the authors' checkpoints (kywen1119/DSRAN, BERT and GRU
builds) onto `models.dsran.DSRAN`.

Layouts: BERT build (`model_bert.py`) `{"model": state_dict}` with DataParallel's
`module.` prefix; GRU build (`model.py`) `{"model": [state_dict]}`. The build, K, the
widths and the BERT shape are read off the weights; the workdir uses
`model.dsran.text_padding = "reference"` so their weights give their embeddings, and their eval
batch size (it sets the GRU build's padding width).

Both builds keep their ResNet-152 (their own `resnet.py`: torchvision's network and key
names, `fc` included, no DataParallel of its own) as `img_enc.cnn.*`. It is frozen but
runs in train mode for the whole run (`train_start()` is `model.train()`), so its
BatchNorm running statistics drift from ImageNet's, and their evaluation computes the
grid with the drifted ones (`val_start()`: eval mode). The model here reads precomputed
grids, so the CNN is not among the Flax variables: `convert` hands it back whole as
`resnet152.safetensors` (`resnet.checkpoint_cnn`: every tensor under its torchvision name,
values and dtypes as stored), from which `python -m dsran_jax.extract --weights=...`
computes the grids the checkpoint was evaluated on.
"""
import json
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from dsran_jax.convert import authors_vocab
from dsran_jax.convert.engine import (DROP, ConversionError, Converted, Rule,
                                      apply_recipe_from_opt, flatten, map_state_dict, opt_of,
                                      require, safetensors_file, state_dicts, strip_prefix,
                                      to_numpy)
from dsran_jax.models.common import recipes, resnet
from dsran_jax.models.common.bert import hf_state_dict_to_params, infer_bert_config
from dsran_jax.models.dsran.model import DSRAN, DSRANConfig
from dsran_jax.models.variables import variable_shapes

BERT = "bert"  # kind of the BERT subtree, mapped by models.common.bert
CNN_PREFIX = "img_enc.cnn."  # both builds, once the BERT build's `module.` is stripped


def _gat_rules(src: str, dst: str) -> List[Rule]:
  """One authors' `GAT` (`.encoder.N.` = GATLayer N) onto our `GAT` module at `dst`."""
  layer = rf"^{src}\.encoder\.(\d+)\."
  return [
      (layer + r"mha\.(query|key|value)$", dst + r"/layer_\1/mha/\2", "linear"),
      (layer + r"(fc_in|fc_int|fc_out)$", dst + r"/layer_\1/\2", "linear"),
      (layer + r"(bn_in|bn_out)$", dst + r"/layer_\1/\2", "bn"),
  ]


def _fusion_rule(src: str, dst: str) -> Rule:
  return (rf"^{src}\.(gate0|gate1|fusion0|fusion1)$", rf"jsr/{dst}/\1", "linear")


def bert_rules() -> List[Rule]:
  """model_bert.py's DSRAN (keys without DataParallel's `module.`)."""
  return [
      (r"^img_enc\.cnn(\..*)?$", "", DROP),            # ResNet-152: its own file (convert)
      (r"^rcnn_enc\.fc$", "", DROP),                   # defined but never called
      (r"^img_enc\.fc\.0$", "grid_enc/fc", "linear"),  # Sequential(Linear, ReLU, Dropout)
      (r"^rcnn_enc\.fc_image\.0$", "region_enc/fc_image_0", "linear"),
      (r"^rcnn_enc\.fc_image\.2$", "region_enc/fc_image_1", "linear"),
      (r"^rcnn_enc\.fc_pos\.0$", "region_enc/fc_pos", "linear"),
      (r"^txt_enc\.bert(\..*)?$", "text_enc/bert", BERT),
      (r"^txt_enc\.fc\.0$", "text_enc/fc", "linear"),
      *_gat_rules("gat_1", "gat_grid"),                # gat_1 runs on the ResNet grid
      *_gat_rules("gat_2", "gat_region"),
      *_gat_rules("gat_cap", "gat_text"),
      *_gat_rules("gat_cat", "jsr/gat_0"),
      *_gat_rules("gat_cat_1", "jsr/gat_1"),
      *_gat_rules("gat_cat_2", "jsr/gat_2"),
      *_gat_rules("gat_cat_3", "jsr/gat_3"),
      _fusion_rule("fusion", "fusion"),                # K=2: the fusion; K=4: the top one
      _fusion_rule("fusion_1", "fusion_a"),            # K=4: fusion(jsr 1, jsr 2)
      _fusion_rule("fusion_2", "fusion_b"),            # K=4: fusion(jsr 3, jsr 4)
  ]


def gru_rules(K: int) -> List[Rule]:
  """model.py's DSRAN. Its SSR names are swapped relative to the BERT build, and its
  fusion names depend on K."""
  if K == 4:
    fusions = [_fusion_rule("fusion", "fusion_a"), _fusion_rule("fusion2", "fusion_b"),
               _fusion_rule("fusion3", "fusion")]
  else:
    fusions = [_fusion_rule("fusion", "fusion")]
  return [
      (r"^img_enc\.cnn(\..*)?$", "", DROP),            # ResNet-152: its own file (convert)
      (r"^img_enc\.fc$", "grid_enc/fc", "linear"),
      (r"^rcnn_enc\.fc_image$", "region_enc/fc_image", "linear"),
      (r"^txt_enc\.embed$", "text_enc/embed", "embed"),
      (r"^txt_enc\.rnn$", "text_enc/gru", "gru"),
      *_gat_rules("gat_1", "gat_region"),              # gat_1 runs on the regions here
      *_gat_rules("gat_2", "gat_grid"),
      *_gat_rules("gat_cap", "gat_text"),
      *[r for k in range(4) for r in _gat_rules(f"gat_cat_{k + 1}", f"jsr/gat_{k}")],
      *fusions,
  ]


# ------------------------------------------------------------------ config inference


def detect_build(state_dict: Mapping[str, Any]) -> str:
  """"bert" or "gru", from the text encoder's keys."""
  if any(k.startswith("txt_enc.bert.") for k in state_dict):
    return "bert"
  if any(k.startswith(("txt_enc.rnn.", "txt_enc.embed.")) for k in state_dict):
    return "gru"
  raise ValueError("not a DSRAN checkpoint: no txt_enc.bert.* (BERT build) or "
                   "txt_enc.rnn.* / txt_enc.embed.* (GRU build) keys; first keys: "
                   f"{sorted(state_dict)[:8]}")


def infer_K(state_dict: Mapping[str, Any], build: str) -> int:
  """Number of JSR branches, from which `gat_cat*` modules exist."""
  present = sorted({m.group(0) for k in state_dict for m in [re.match(r"gat_cat(_\d+)?\.", k)]
                    if m})
  names = [p.rstrip(".") for p in present]
  wanted = {"bert": {1: ["gat_cat"], 2: ["gat_cat", "gat_cat_1"],
                     4: ["gat_cat", "gat_cat_1", "gat_cat_2", "gat_cat_3"]},
            "gru": {1: ["gat_cat_1"], 2: ["gat_cat_1", "gat_cat_2"],
                    4: ["gat_cat_1", "gat_cat_2", "gat_cat_3", "gat_cat_4"]}}[build]
  for k, modules in wanted.items():
    if names == modules:
      return k
  raise ValueError(f"cannot infer K from the JSR modules {names}: the {build.upper()} build "
                   f"has {wanted[1]} (K=1), {wanted[2]} (K=2) or {wanted[4]} (K=4)")


def infer_overrides(state_dict: Mapping[str, np.ndarray], build: str,
                    bert_heads: Optional[int] = None) -> Dict[str, Any]:
  """The model values the weights imply, flat (`embed_size`, `img_dim`, ... of
  `config.model`; `K`, `text_encoder`, ... of `config.model.dsran`; `bert`: a
  BertConfig)."""
  grid_fc = "img_enc.fc.0.weight" if build == "bert" else "img_enc.fc.weight"
  w = require(state_dict, grid_fc, "embed_size and img_dim")
  out = {"text_encoder": build, "embed_size": int(w.shape[0]), "img_dim": int(w.shape[1]),
         "K": infer_K(state_dict, build), "text_padding": "reference"}
  if build == "bert":
    out["pos_dim"] = int(require(state_dict, "rcnn_enc.fc_pos.0.weight", "pos_dim").shape[1])
    out["use_region_pos"] = True
    bert_state = {k[len("txt_enc.bert."):]: v for k, v in state_dict.items()
                  if k.startswith("txt_enc.bert.")}
    out["bert"] = infer_bert_config(bert_state, bert_heads)
  else:
    emb = require(state_dict, "txt_enc.embed.weight", "the vocabulary size and word_dim")
    out.update(vocab_size=int(emb.shape[0]), word_dim=int(emb.shape[1]),
               use_region_pos=False)
  return out


# ----------------------------------------------------------------------- conversion


def convert_state_dict(state_dict: Mapping[str, Any], build: Optional[str] = None,
                       bert_heads: Optional[int] = None) -> Tuple[dict, dict]:
  """Maps an authors' DSRAN state dict onto our Flax variables.

  Args:
    state_dict: key -> tensor (torch or numpy), with or without DataParallel's `module.`.
    build: "bert" or "gru"; None detects it from the keys.
    bert_heads: BERT attention heads (default hidden / 64).

  Returns:
    `(variables, model_overrides)`: `{"params", "batch_stats"}` as nested dicts of float32
    numpy arrays, and the `config.model` values the weights imply (`bert` is a
    `models.common.bert.BertConfig`).

  Raises:
    ConversionError: naming every unexpected key, every missing param (with its torch
      key), and every shape that does not match the inferred config.
  """
  state = {k: to_numpy(v) for k, v in strip_prefix(state_dict).items()}
  build = build or detect_build(state)
  if build not in ("bert", "gru"):
    raise ValueError(f"build={build!r}: expected 'bert' or 'gru'")
  overrides = infer_overrides(state, build, bert_heads)
  rules = bert_rules() if build == "bert" else gru_rules(overrides["K"])
  expected = variable_shapes(DSRAN(_dsran_config(overrides)))
  what = (f"{build.upper()}-build checkpoint (K={overrides['K']}, "
          f"embed_size={overrides['embed_size']})")
  extra, problems = {}, []
  bert_prefix = "params/text_enc/bert/"
  if build == "bert":
    bert_state = {k[len("txt_enc.bert."):]: v for k, v in state.items()
                  if k.startswith("txt_enc.bert.")}
    state = {k: v for k, v in state.items() if not k.startswith("txt_enc.bert.")}
    try:
      bert = hf_state_dict_to_params(bert_state, overrides["bert"])
      extra = {bert_prefix + sub: v
               for sub, v in flatten(bert).items()}
    except ValueError as e:
      problems.append(f"{what}: in txt_enc.bert.* (inferred {overrides['bert']}): {e}")
      # Keep the missing-param report from repeating every BERT param.
      extra = {k: np.zeros(s, np.float32) for k, s in expected.items()
               if k.startswith(bert_prefix)}
  try:
    variables = map_state_dict(state, rules, expected, what, extra=extra)
  except ConversionError as e:
    problems.append(str(e))
  if problems:
    raise ConversionError("\n".join(problems))
  return variables, overrides


def cnn_state(state_dict: Mapping[str, Any], img_dim: int, what: str):
  """`(resnet_config, tensors)` of the checkpoint's ResNet (`img_enc.cnn.*`, BERT build
  `module.img_enc.cnn.*`): `resnet.checkpoint_cnn`, every tensor under its torchvision
  name, values and dtypes as stored; its `layer4` map must be `img_dim` wide, the width
  the grid branch's `img_enc.fc` takes."""
  state = {k: to_numpy(v, keep_dtype=True) for k, v in strip_prefix(state_dict).items()
           if k.startswith(CNN_PREFIX)}
  return resnet.converted_cnn(
      state, CNN_PREFIX, img_dim, "the grid branch's img_enc.fc", what,
      "DSRAN's checkpoints hold their ResNet-152, whose drifted BatchNorm statistics the "
      "grid features must be extracted with")


# ----------------------------------------------------------------------------- workdir

_BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_layers=12)


def _dsran_config(overrides: Mapping[str, Any]):
  keys = ("embed_size", "K", "text_encoder", "img_dim", "pos_dim", "use_region_pos",
          "text_padding", "bert", "vocab_size", "word_dim")
  return DSRANConfig(**{k: overrides[k] for k in keys if k in overrides})


def make_config(c, overrides: Mapping[str, Any], opt: Mapping[str, Any], bert_path: str = "",
                data_format: str = "vlp"):
  """The workdir config: the base config `c` (from the caller) + the inferred model +
  what `opt` tells us."""
  m = c.model
  d = m.dsran
  m.name = "dsran"
  for key in ("embed_size", "img_dim"):
    m[key] = overrides[key]
  for key in ("text_encoder", "K", "use_region_pos", "text_padding"):
    d[key] = overrides[key]
  c.data.img_dim = overrides["img_dim"]
  c.data.format = data_format
  if overrides["text_encoder"] == "bert":
    b = overrides["bert"]
    d.pos_dim = overrides["pos_dim"]
    d.bert_random_init = True  # shape from model.dsran.bert.*, weights from the checkpoint
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                "max_position", "type_vocab_size"):
      d.bert[key] = getattr(b, key)
    if not bert_path and all(getattr(b, k) == v for k, v in _BERT_BASE.items()):
      bert_path = "bert-base-uncased"  # the authors' uncased_L-12_H-768_A-12
    d.bert_path = bert_path
    c.data.max_len = 32  # their ids are cut / zero-padded to 32
    c.train.optimizer = "bertadam"
  else:
    m.vocab_size, m.word_dim = overrides["vocab_size"], overrides["word_dim"]
    c.train.optimizer = "adam"
    c.train.warmup = 0.0
  apply_recipe_from_opt(c, opt)
  c.eval.max_dev_images = recipes.vsepp_dev_images(c.data.name)  # VSE++'s loaders
  return c


def detect(ckpt: Mapping[str, Any]) -> bool:
  """Whether `ckpt` is an authors' DSRAN checkpoint (a `txt_enc.bert.*` or
  `txt_enc.rnn.*` state dict beside `gat_cat*` modules)."""
  model = ckpt.get("model")
  model = model[0] if isinstance(model, (list, tuple)) and len(model) == 1 else model
  if not isinstance(model, Mapping):
    return False
  keys = list(strip_prefix(model))
  return (any(k.startswith(("txt_enc.bert.", "txt_enc.rnn.")) for k in keys)
          and any(k.startswith("gat_cat") for k in keys))


def convert(ckpt: Mapping[str, Any], options: Mapping[str, Any], *, config) -> Converted:
  """An authors' DSRAN checkpoint as a workdir (`options`: bert_path, bert_heads, vocab,
  data_format, path; `config`: the base config, `default_config.get_base_config()`,
  filled in as the workdir's), with its CNN as a file (`files`: `resnet152.safetensors`,
  see the module docstring)."""
  path = options.get("path", "checkpoint")
  (state_dict,) = state_dicts(ckpt, 1, path)
  opt = opt_of(ckpt)
  bert_path = options.get("bert_path") or ""
  heads = options.get("bert_heads")
  if heads is None and bert_path:
    heads = _heads_from_bert_dir(bert_path, state_dict)
  if heads is None:
    # Their --bert_path names Google's release directory, e.g. uncased_L-12_H-768_A-12.
    m = re.search(r"_A-(\d+)", str(opt.get("bert_path", "")))
    heads = int(m.group(1)) if m else None
  variables, overrides = convert_state_dict(state_dict, bert_heads=heads)
  vocab = None
  if options.get("vocab"):
    if overrides["text_encoder"] != "gru":
      raise ValueError("--vocab is for the GRU build; the BERT build's tokenizer comes from "
                       "--bert_path")
    vocab = authors_vocab.load_checked_vocab(options["vocab"], overrides["vocab_size"],
                                             "word embedding txt_enc.embed.weight")
  cnn_config, cnn = cnn_state(state_dict, overrides["img_dim"], path)
  cnn_file = resnet.weights_file_name(cnn_config)
  config = make_config(config, overrides, opt, bert_path, options.get("data_format") or "vlp")
  summary = {"build": overrides["text_encoder"], "K": overrides["K"],
             "embed_size": overrides["embed_size"], "img_dim": overrides["img_dim"],
             "cnn": cnn_config.describe(), "cnn_weights": cnn_file,
             "cnn_tensors": len(cnn)}
  notes = [(f"the grid features must come from the checkpoint's own CNN (its BatchNorm "
            f"statistics drifted in training): python -m dsran_jax.extract --images=... "
            f"--weights=<workdir>/{cnn_file} --out=<data.root> --split=test")]
  if overrides["text_encoder"] == "bert":
    summary["bert"] = {k: getattr(overrides["bert"], k) for k in
                       ("hidden_size", "num_layers", "num_heads", "intermediate_size")}
    summary["bert_path"] = config.model.dsran.bert_path
    if not config.model.dsran.bert_path:
      notes.append("no --bert_path given; encode_texts(texts=...) needs "
                   "model.dsran.bert_path (a BERT directory with vocab.txt) set in "
                   "config.json")
  else:
    summary["vocab_size"] = overrides["vocab_size"]
    if vocab is None:
      notes.append("no --vocab given; encode_texts(texts=...) will need vocab.json in "
                   "the workdir (convert with --vocab=...pkl)")
  summary["note"] = "; ".join(notes)
  return Converted(variables, config, vocab, summary,
                   files={cnn_file: safetensors_file(cnn, {"source": f"{path}: {CNN_PREFIX}*"})})


def _heads_from_bert_dir(bert_path: str, state_dict) -> Optional[int]:
  """num_attention_heads from a local BERT directory's config.json if its width matches."""
  cfg = os.path.join(os.path.expanduser(bert_path), "config.json")
  if not os.path.isfile(cfg):
    return None
  with open(cfg, encoding="utf-8") as f:
    d = json.load(f)
  words = strip_prefix(state_dict).get("txt_enc.bert.embeddings.word_embeddings.weight")
  if words is None or d.get("hidden_size") != tuple(words.shape)[1]:
    return None
  return d.get("num_attention_heads")


