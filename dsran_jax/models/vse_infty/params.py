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
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from dsran_jax.convert.engine import (DROP, Converted, detected_state_dicts, state_dicts,
                                      validate_workdir_config, workdir_config)
from dsran_jax.models.common import vse_config, vse_convert
from dsran_jax.models.common.vse_convert import need
from dsran_jax.models.vse_infty import config as vse_infty_config

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


def _states(ckpt: Mapping[str, Any], what: str):
  return vse_convert.encoder_states(*state_dicts(ckpt, 2, what))


def detect(ckpt: Mapping[str, Any]) -> bool:
  """True for a VSE∞ train.py checkpoint: two state dicts whose encoders both end in
  GPO (`gpool.*`), the image side with `fc`, the text side BERT + `linear` or
  `embed` + `rnn`."""
  found = detected_state_dicts(ckpt, 2, strip=True)
  if found is None:
    return False
  img, txt = found
  gpo = "gpool.gru.weight_ih_l0"
  return (gpo in img and gpo in txt and "fc.weight" in img
          and vse_convert.has_text_encoder(txt))


def model_options(opt: Mapping[str, Any], img: Mapping[str, np.ndarray],
                  txt: Mapping[str, np.ndarray], bert_path: str = "",
                  bert_heads: Optional[int] = None) -> Dict[str, Any]:
  """`config.model` values (flat: widths, `vse_infty.<key>`, `bert`: a BertConfig)
  implied by the weights; where `opt` states one too, they must agree. BERT heads:
  `bert_heads`, else `bert_path`'s config.json, else hidden / 64."""
  fc = need(img, "fc.weight", "img_enc")
  enc_type = "basic" if any(k.startswith("mlp.") for k in img) else "backbone"
  if opt.get("precomp_enc_type", enc_type) != enc_type:
    raise ValueError(f"opt.precomp_enc_type={opt['precomp_enc_type']!r} but img_enc "
                     f"{'has' if enc_type == 'basic' else 'lacks'} the mlp.* branch")
  out: Dict[str, Any] = {"embed_size": int(fc.shape[0]), "img_dim": int(fc.shape[1]),
                         "vse_infty.precomp_enc_type": enc_type}
  out.update(vse_convert.text_options(txt, FAMILY, bert_path, bert_heads))
  vse_convert.check_opt_widths(opt, out, FAMILY)
  for key in ("no_imgnorm", "no_txtnorm"):
    if key in opt:
      out[f"vse_infty.{key}"] = bool(opt[key])
  return out


def convert_state_dicts(img: Mapping[str, np.ndarray], txt: Mapping[str, np.ndarray],
                        expected: Mapping[str, Tuple[int, ...]], bert=None,
                        what: str = "VSE∞ checkpoint") -> dict:
  """Maps VSE∞'s img_enc / txt_enc state dicts (numpy, `module.` stripped) onto our
  `{"params", "batch_stats"}`; `bert`: the BertConfig of a BERT build.

  Raises:
    ConversionError naming every unexpected key, missing param and shape mismatch.
  """
  extra, txt = vse_convert.bigru_extra(txt)
  return vse_convert.map_encoders(img, txt, RULES, expected, bert, what, "VSE∞", extra)


def make_config(c, model_opts: Mapping[str, Any], opt: Mapping[str, Any], bert_path: str):
  """The workdir config: the base config `c` with model.name="vse_infty", the model the
  weights imply (a BERT build's shape as `bert.*` with `bert_random_init`: the weights
  come from the checkpoint, the tokenizer from `bert_path`), the recipe `opt` records
  and the precomp data layout."""
  flat = {k: v for k, v in model_opts.items() if k != "bert"}
  c = workdir_config(c, FAMILY, flat, opt, "precomp")
  s = c.model.vse_infty
  if model_opts.get("bert") is not None:
    vse_convert.set_bert_shape(s, model_opts["bert"], bert_path)
  vse_config.text_encoder_adamw(c, s.text_encoder)
  c.train.max_violation = True  # their train.py turns it on after the warm-up epochs
  return validate_workdir_config(c, "a VSE∞", vse_infty_config.validate)


def _summary(config, opt):
  del opt
  s = config.model.vse_infty
  return {"text_encoder": s.text_encoder, "precomp_enc_type": s.precomp_enc_type,
          "embed_size": config.model.embed_size, "img_dim": config.model.img_dim}, []


def convert(ckpt: Mapping[str, Any], options: Optional[Mapping[str, Any]] = None, *,
            config) -> Converted:
  """A loaded VSE∞ checkpoint (`convert.engine.load_checkpoint`) as a workdir's content.

  Args:
    ckpt: the checkpoint dict ("model": [img_enc, txt_enc], "opt", ...), numpy tensors.
    options: `bert_path` (BERT build: tokenizer and head count), `bert_heads`, `vocab` (BiGRU build:
      their `*_precomp_vocab.json`), `path` (for messages).
    config: the base config, filled in as the workdir's.
  """
  return vse_convert.convert(ckpt, options, config, name="VSE∞", section=FAMILY,
                             split=_states, model_options=model_options,
                             make_config=make_config, convert_state_dicts=convert_state_dicts,
                             summary=_summary)
