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
from typing import Any, Dict, Mapping, Optional

import numpy as np

from dsran_jax.convert.engine import (DROP, ConversionError, Converted, detected_state_dicts,
                                      state_dicts, validate_workdir_config, workdir_config)
from dsran_jax.models.chan import config as chan_config
from dsran_jax.models.common import vse_config, vse_convert
from dsran_jax.models.common.vse_convert import need

FAMILY = "chan"

RULES = [
    (r"^img_enc\.fc$", "img_enc/fc", "linear"),
    (r"^img_enc\.feedforward\.ln$", "img_enc/feedforward/ln", "bn"),  # LayerNorm: scale, bias
    (r"^img_enc\.feedforward\.attn\.out_proj$", "img_enc/feedforward/out_proj", "linear"),
    (r"^txt_enc\.linear$", "txt_enc/linear", "linear"),
    (r"^txt_enc\.rnn$", "txt_enc/gru", "gru"),
    (r"^txt_enc\.fc$", "", DROP),  # EncoderTextBigru.fc: built, never called
]
IN_PROJ = "feedforward.attn.in_proj_"
# opt keys -> model.chan options, each kept when the checkpoint's opt states it.
OPT_KEYS = ("coding_type", "pooling_type", "alpha", "belta", "no_imgnorm", "no_txtnorm")


def _states(ckpt: Mapping[str, Any], what: str):
  img, txt, sim, crit = state_dicts(ckpt, 4, what)
  if sim or crit:
    raise ConversionError(f"{what}: the sim_enc / criterion state dicts hold "
                          f"{sorted(sim)[:4] + sorted(crit)[:4]}; CHAN's have no parameters")
  return vse_convert.encoder_states(img, txt)


def detect(ckpt: Mapping[str, Any]) -> bool:
  """True for a CHAN train.py checkpoint: four state dicts, the last two empty, the
  image side `fc` without GPO, the text side BERT + `linear` or `embed` + `rnn`."""
  found = detected_state_dicts(ckpt, 4, strip=True)
  if found is None:
    return False
  img, txt, sim, crit = found
  return ("fc.weight" in img and not any(k.startswith("gpool.") for k in img)
          and vse_convert.has_text_encoder(txt) and not sim and not crit)


def model_options(opt: Mapping[str, Any], img: Mapping[str, np.ndarray],
                  txt: Mapping[str, np.ndarray], bert_path: str = "",
                  bert_heads: Optional[int] = None) -> Dict[str, Any]:
  """`config.model` values (flat: widths, `chan.<key>`, `bert`: a BertConfig) implied by
  the weights and `opt`; where `opt` states a width too, they must agree."""
  fc = need(img, "fc.weight", "img_enc")
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
  out.update(vse_convert.text_options(txt, FAMILY, bert_path, bert_heads))
  if opt.get("text_enc_type", out["chan.text_encoder"]) != out["chan.text_encoder"]:
    raise ValueError(f"opt.text_enc_type={opt['text_enc_type']!r} but txt_enc is the "
                     f"{out['chan.text_encoder']} build")
  vse_convert.check_opt_widths(opt, out, FAMILY)
  return out


def convert_state_dicts(img: Mapping[str, np.ndarray], txt: Mapping[str, np.ndarray],
                        expected: Mapping[str, Any], bert=None,
                        what: str = "CHAN checkpoint") -> dict:
  """Maps CHAN's img_enc / txt_enc state dicts (numpy, `module.` stripped) onto our
  `{"params", "batch_stats"}`; `bert`: the BertConfig of a BERT build.

  Raises:
    ConversionError naming every unexpected key, missing param and shape mismatch.
  """
  extra, txt = vse_convert.bigru_extra(txt)
  img = dict(img)
  for leaf, name, transform in (("weight", "kernel", np.transpose), ("bias", "bias", np.asarray)):
    if IN_PROJ + leaf in img:  # torch's packed q/k/v projection, not an nn.Linear
      extra[f"params/img_enc/feedforward/in_proj/{name}"] = np.ascontiguousarray(
          transform(img.pop(IN_PROJ + leaf)))
  return vse_convert.map_encoders(img, txt, RULES, expected, bert, what, "CHAN", extra)


def make_config(c, model_opts: Mapping[str, Any], opt: Mapping[str, Any], bert_path: str):
  """The workdir config: the base config `c` with model.name="chan", the model the
  weights and `opt` imply (a BERT build's shape as `bert.*` with `bert_random_init`: the
  weights come from the checkpoint, the tokenizer from `bert_path`), the recipe `opt`
  records and the precomp data layout."""
  flat = {k: v for k, v in model_opts.items() if k != "bert"}
  c = workdir_config(c, FAMILY, flat, opt, "precomp")
  s = c.model.chan
  if model_opts.get("bert") is not None:
    vse_convert.set_bert_shape(s, model_opts["bert"], bert_path)
  if "obj_drop_rate" in opt and opt["obj_drop_rate"] is not None:
    s.region_drop = float(opt["obj_drop_rate"])
  vse_config.text_encoder_adamw(c, s.text_encoder)
  c.train.max_violation = True  # their train.py turns it on after the warm-up epochs
  return validate_workdir_config(c, "a CHAN", chan_config.validate)


def _summary(config, opt):
  s = config.model.chan
  out = {"text_encoder": s.text_encoder, "precomp_enc_type": s.precomp_enc_type,
         "coding_type": s.coding_type, "pooling_type": s.pooling_type,
         "embed_size": config.model.embed_size, "img_dim": config.model.img_dim}
  notes = []
  if opt.get("criterion", "ContrastiveLoss") != "ContrastiveLoss":
    notes.append(f"trained with their {opt['criterion']}; fine-tuning here uses the "
                 f"hinge (ContrastiveLoss)")
  return out, notes


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
  return vse_convert.convert(ckpt, options, config, name="CHAN", section=FAMILY,
                             split=_states, model_options=model_options,
                             make_config=make_config, convert_state_dicts=convert_state_dicts,
                             summary=_summary)
