"""CHAN's PyTorch checkpoint rules (ppanzx/CHAN train.py layout, also the files of their
Google Drive / Baidu release) for `tools.convert_torch`.

`model_best.pth` is `{"model": Model.state_dict(), "opt": argparse.Namespace, "epoch",
"best_rsum", "Eiters"}`, where their `Model.state_dict()` is the list `[img_enc,
txt_enc, sim_enc, criterion]` of state dicts; the last two are empty (the coding,
pooling and ContrastiveLoss have no parameters). Nothing is wrapped in nn.DataParallel
(train.py never calls make_data_parallel); a `module.` prefix is stripped all the same.

    img_enc: fc.{weight,bias} (E, img_dim)
             feedforward.ln.{weight,bias}, feedforward.attn.in_proj_{weight,bias} (3E, E),
             feedforward.attn.out_proj.{weight,bias}        (precomp_enc_type=selfattention)
    txt_enc: bert.* (BertModel) + linear.{weight,bias} (E, hidden)          (BERT)
             embed.weight (V + 1, word_dim) + rnn.*_l{n}[_reverse]
             + fc.{weight,bias} (built, never called: dropped)               (BiGRU)

The coding and pooling are in `opt` only (`coding_type`, `pooling_type`, `alpha`,
`belta`); a checkpoint without them cannot be scored and is refused. The BERT config is
in no checkpoint: its shape is read off the weights and its heads from `--bert_path`'s
config.json (else hidden / 64); `--bert_path` also gives the tokenizer. The BiGRU
vocabulary (SCAN's `vocab/{f30k,coco}_precomp_vocab.json`, `--vocab`) has one word fewer
than the embedding has rows: their train.py appends `<mask>` after it.
"""
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from dsran_jax import models
from dsran_jax.convert import authors_vocab
from dsran_jax.convert.engine import (DROP, ConversionError, Converted, flatten,
                                      map_state_dict, opt_of, state_dicts, strip_prefix,
                                      to_numpy, validate_workdir_config, workdir_config)
from dsran_jax.models.chan import config as chan_config
from dsran_jax.models.common.bert import hf_state_dict_to_params
from dsran_jax.models.dsran.params import infer_bert_config
from dsran_jax.models.variables import variable_shapes
from dsran_jax.models.vse_infty.params import GRU_LEAF, bigru_extra, heads_from_bert_dir

FAMILY = "chan"

RULES = [
    (r"^img_enc\.fc$", "img_enc/fc", "linear"),
    (r"^img_enc\.feedforward\.ln$", "img_enc/feedforward/ln", "bn"),  # LayerNorm: scale, bias
    (r"^img_enc\.feedforward\.attn\.out_proj$", "img_enc/feedforward/out_proj", "linear"),
    (r"^txt_enc\.linear$", "txt_enc/linear", "linear"),
    (r"^txt_enc\.rnn$", "txt_enc/gru", "gru"),
    (r"^txt_enc\.fc$", "", DROP),  # EncoderTextBigru.fc: built, never called
]
BERT_PREFIX = "bert."
IN_PROJ = "feedforward.attn.in_proj_"
# opt keys -> model.chan options, each kept when the checkpoint's opt states it.
OPT_KEYS = ("coding_type", "pooling_type", "alpha", "belta", "no_imgnorm", "no_txtnorm")


def _states(ckpt: Mapping[str, Any], what: str):
  img, txt, sim, crit = state_dicts(ckpt, 4, what)
  if sim or crit:
    raise ConversionError(f"{what}: the sim_enc / criterion state dicts hold "
                          f"{sorted(sim)[:4] + sorted(crit)[:4]}; CHAN's have no parameters")
  return ({k: to_numpy(v) for k, v in strip_prefix(img).items()},
          {k: to_numpy(v) for k, v in strip_prefix(txt).items()})


def detect(ckpt: Mapping[str, Any]) -> bool:
  """True for a CHAN train.py checkpoint: four state dicts, the last two empty, the
  image side `fc` without GPO, the text side BERT + `linear` or `embed` + `rnn`."""
  if not isinstance(ckpt, Mapping):
    return False
  try:
    img, txt, sim, crit = state_dicts(ckpt, 4, "checkpoint")
  except ConversionError:
    return False
  img, txt = strip_prefix(img), strip_prefix(txt)
  text = (any(k.startswith(BERT_PREFIX) for k in txt) and "linear.weight" in txt) or (
      "embed.weight" in txt and any(k.startswith("rnn.") for k in txt))
  return ("fc.weight" in img and not any(k.startswith("gpool.") for k in img)
          and text and not sim and not crit)


def _need(sd: Mapping[str, np.ndarray], key: str, where: str) -> np.ndarray:
  if key not in sd:
    raise ValueError(f"missing {where} param {key}; keys: {sorted(sd)[:8]}")
  return sd[key]


def model_options(opt: Mapping[str, Any], img: Mapping[str, np.ndarray],
                  txt: Mapping[str, np.ndarray], bert_path: str = "",
                  bert_heads: Optional[int] = None) -> Dict[str, Any]:
  """`config.model` values (flat: widths, `chan.<key>`, `bert`: a BertConfig) implied by
  the weights and `opt`; where `opt` states a width too, they must agree."""
  fc = _need(img, "fc.weight", "img_enc")
  enc_type = "selfattention" if any(k.startswith("feedforward.") for k in img) else "basic"
  if opt.get("precomp_enc_type", enc_type) != enc_type:
    raise ValueError(f"opt.precomp_enc_type={opt['precomp_enc_type']!r} but img_enc "
                     f"{'has' if enc_type == 'selfattention' else 'lacks'} the "
                     f"feedforward.* self-attention")
  for key in ("coding_type", "pooling_type"):
    if not opt.get(key):
      raise ValueError(f"opt.{key} is not set: the checkpoint does not say how CHAN "
                       f"scores (their --{key})")
  out: Dict[str, Any] = {"embed_size": int(fc.shape[0]), "img_dim": int(fc.shape[1]),
                         "chan.precomp_enc_type": enc_type}
  for key in OPT_KEYS:
    if opt.get(key) is not None:
      out[f"chan.{key}"] = opt[key]
  if any(k.startswith(BERT_PREFIX) for k in txt):
    bert_state = {k[len(BERT_PREFIX):]: v for k, v in txt.items() if k.startswith(BERT_PREFIX)}
    hidden = int(_need(bert_state, "embeddings.word_embeddings.weight", "txt_enc.bert").shape[1])
    out["chan.text_encoder"] = "bert"
    heads = bert_heads or heads_from_bert_dir(bert_path, hidden)
    out["bert"] = infer_bert_config(bert_state, heads)
  else:
    emb = _need(txt, "embed.weight", "txt_enc")
    layers = sorted({int(m.group(2)) for k in txt for m in [GRU_LEAF.match(k)] if m})
    if not layers or layers != list(range(len(layers))):
      raise ValueError(f"txt_enc rnn.* layers {layers}: expected 0..n-1")
    if not any(k.endswith("_reverse") for k in txt):
      raise ValueError("txt_enc.rnn is not bidirectional (their BiGRU build always is)")
    out.update({"chan.text_encoder": "bigru", "chan.num_layers": len(layers),
                "vocab_size": int(emb.shape[0]) - 1, "word_dim": int(emb.shape[1])})
  if opt.get("text_enc_type", out["chan.text_encoder"]) != out["chan.text_encoder"]:
    raise ValueError(f"opt.text_enc_type={opt['text_enc_type']!r} but txt_enc is the "
                     f"{out['chan.text_encoder']} build")
  checks = {"embed_size": "embed_size", "img_dim": "img_dim", "word_dim": "word_dim",
            "num_layers": "chan.num_layers"}
  for key, ours in checks.items():
    if key in opt and ours in out and opt[key] != out[ours]:
      raise ValueError(f"opt.{key}={opt[key]!r} but the weights say {out[ours]!r}")
  if "vocab_size" in opt and "vocab_size" in out and opt["vocab_size"] != out["vocab_size"] + 1:
    raise ValueError(f"opt.vocab_size={opt['vocab_size']} but txt_enc.embed.weight has "
                     f"{out['vocab_size'] + 1} rows")
  return out


def convert_state_dicts(img: Mapping[str, np.ndarray], txt: Mapping[str, np.ndarray],
                        expected: Mapping[str, Any], bert=None,
                        what: str = "CHAN checkpoint") -> dict:
  """Maps CHAN's img_enc / txt_enc state dicts (numpy, `module.` stripped) onto our
  `{"params", "batch_stats"}`; `bert`: the BertConfig of a BERT build.

  Raises:
    ConversionError naming every unexpected key, missing param and shape mismatch.
  """
  extra, txt = bigru_extra(txt)
  img = dict(img)
  for leaf, name, transform in (("weight", "kernel", np.transpose), ("bias", "bias", np.asarray)):
    if IN_PROJ + leaf in img:  # torch's packed q/k/v projection, not an nn.Linear
      extra[f"params/img_enc/feedforward/in_proj/{name}"] = np.ascontiguousarray(
          transform(img.pop(IN_PROJ + leaf)))
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
    raise ConversionError(f"{what} does not match dsran_jax's CHAN:\n" + "\n".join(problems))
  return variables


def make_config(c, model_opts: Mapping[str, Any], opt: Mapping[str, Any], bert_path: str):
  """The workdir config: the base config `c` with model.name="chan", the model the
  weights and `opt` imply (a BERT build's shape as `bert.*` with `bert_random_init`: the
  weights come from the checkpoint, the tokenizer from `bert_path`), the recipe `opt`
  records and the precomp data layout."""
  flat = {k: v for k, v in model_opts.items() if k != "bert"}
  c = workdir_config(c, FAMILY, flat, opt, "precomp")
  s = c.model.chan
  bert = model_opts.get("bert")
  if bert is not None:
    s.bert_random_init = True
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                "max_position", "type_vocab_size"):
      s.bert[key] = getattr(bert, key)
    s.bert_path = bert_path
  if "obj_drop_rate" in opt and opt["obj_drop_rate"] is not None:
    s.region_drop = float(opt["obj_drop_rate"])
  c.train.optimizer = "adamw"
  c.train.weight_decay = chan_config.WEIGHT_DECAY[s.text_encoder]
  c.train.bert_lr_scale = chan_config.BERT_LR_FACTOR[s.text_encoder]
  c.train.max_violation = True  # their train.py turns it on after the warm-up epochs
  return validate_workdir_config(c, "a CHAN", chan_config.validate)


def convert(ckpt: Mapping[str, Any], options: Optional[Mapping[str, Any]] = None, *,
            config) -> Converted:
  """A loaded CHAN checkpoint (`convert.engine.load_checkpoint`) as a workdir's content.

  Args:
    ckpt: the checkpoint dict ("model": [img_enc, txt_enc, sim_enc, criterion], "opt",
      ...), numpy tensors.
    options: `bert_path` (BERT build: tokenizer and head count), `bert_heads`, `vocab`
      (BiGRU build: their `*_precomp_vocab.json`), `path` (for messages).
    config: the base config, filled in as the workdir's.
  """
  options = dict(options or {})
  what = f"CHAN checkpoint {options['path']}" if options.get("path") else "CHAN checkpoint"
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
  s = config.model.chan
  vocab = None
  if options.get("vocab"):
    if s.text_encoder != "bigru":
      raise ConversionError("--vocab is for CHAN's BiGRU build; the BERT build's tokenizer "
                            "comes from --bert_path")
    vocab = authors_vocab.load_checked_vocab(
        options["vocab"], config.model.vocab_size,
        "txt_enc.embed.weight (less the <mask> row their train.py appends)")
  summary = {"text_encoder": s.text_encoder, "precomp_enc_type": s.precomp_enc_type,
             "coding_type": s.coding_type, "pooling_type": s.pooling_type,
             "embed_size": config.model.embed_size, "img_dim": config.model.img_dim}
  notes = []
  if opt.get("criterion", "ContrastiveLoss") != "ContrastiveLoss":
    notes.append(f"trained with their {opt['criterion']}; fine-tuning here uses the "
                 f"hinge (ContrastiveLoss)")
  if s.text_encoder == "bert":
    bert = model_opts["bert"]
    summary["bert"] = {k: getattr(bert, k) for k in
                       ("hidden_size", "num_layers", "num_heads", "intermediate_size")}
    summary["bert_path"] = bert_path
    if not bert_path:
      notes.append("no --bert_path given; encode_texts(texts=...) needs "
                   "model.chan.bert_path (a BERT directory with vocab.txt) set in "
                   "config.json")
  else:
    summary["vocab_size"] = config.model.vocab_size
    if vocab is None:
      notes.append("no --vocab given; encode_texts(texts=...) needs their "
                   "vocab/<data_name>_precomp_vocab.json converted with --vocab=...")
  if notes:
    summary["note"] = "; ".join(notes)
  return Converted(variables, config, vocab, summary)
