"""HREM's PyTorch checkpoint rules (CrossmodalGroup/HREM train.py layout) for
`tools.convert_torch`.

`model_best.pth` is `{"model": [img_enc.state_dict(), txt_enc.state_dict()], "opt":
argparse.Namespace, "epoch", "best_rsum", "Eiters"}`: their `VSEModel.state_dict()`
holds the two encoders only, not GraphLoss's relation module (evaluation never runs
it). With --multi_gpu the encoders are nn.DataParallel and keys carry `module.`:

    img_enc: fc.fc.{weight,bias} (E, img_dim)
             fc.mlp.layers.{0,1}.{weight,bias}, fc.mlp.bns.{0,1}.{weight,bias,running_*}
                                                  (bns.1 is never called: dropped)
             aggr.layers.0.self_attn.{in_proj_weight (3E, E), in_proj_bias,
                                      out_proj.{weight,bias}}
             aggr.layers.0.{linear1,linear2,norm1,norm2}.{weight,bias}
    txt_enc: bert.* (BertModel; `embeddings.position_ids` of transformers 4 and the
             unused pooler dropped), linear.{weight,bias} (E, 768), aggr.* as img_enc

The attention's head count is in `opt.nhead` (16 when absent); the BERT config is in
no checkpoint: its shape is read off the weights and its heads from `--bert_path`'s
config.json (else hidden / 64); `--bert_path` also gives the tokenizer (their
`opt.bert_path` names their machine).
"""
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from dsran_jax.convert.engine import (DROP, Converted, detected_state_dicts, map_state_dict,
                                      state_dicts, strip_prefix, to_numpy, validate_workdir_config,
                                      workdir_config)
from dsran_jax.models.common import vse_config, vse_convert
from dsran_jax.models.hrem import config as hrem_config

FAMILY = "hrem"
_AGGR = r"^(img_enc|txt_enc)\.aggr\.layers\.(\d+)"
_POOL = r"\1/pool/aggr/layers_\2"

RULES = [
    (r"^img_enc\.fc\.fc$", "img_enc/fc/fc", "linear"),
    (r"^img_enc\.fc\.mlp\.layers\.([01])$", r"img_enc/fc/mlp/layer_\1", "linear"),
    (r"^img_enc\.fc\.mlp\.bns\.0$", "img_enc/fc/mlp/bn_0", "bn"),
    (r"^img_enc\.fc\.mlp\.bns\.1$", "", DROP),  # built by their MLP, never called
    (_AGGR + r"\.self_attn$", _POOL + "/self_attn", "mha"),
    (_AGGR + r"\.self_attn\.out_proj$", _POOL + "/self_attn/out_proj", "linear"),
    (_AGGR + r"\.(linear1|linear2)$", _POOL + r"/\3", "linear"),
    (_AGGR + r"\.(norm1|norm2)$", _POOL + r"/\3", "layernorm"),
    (r"^txt_enc\.linear$", "txt_enc/linear", "linear"),
]
# GraphLoss's state dict (their criterion; never in model_best.pth, which holds the
# encoders only): the relation module's parameters, for a training state saved by hand.
OBJECTIVE_RULES = [
    (r"^gnn\.layers\.(\d+)\.self_attn$", r"gnn/layers_\1/self_attn", "mha"),
    (r"^gnn\.layers\.(\d+)\.self_attn\.out_proj$", r"gnn/layers_\1/self_attn/out_proj", "linear"),
    (r"^gnn\.layers\.(\d+)\.(linear1|linear2)$", r"gnn/layers_\1/\2", "linear"),
    (r"^gnn\.layers\.(\d+)\.(norm1|norm2)$", r"gnn/layers_\1/\2", "layernorm"),
    (r"^adj_model\.adj_learning\.(mlp_t2i|mlp_i2t)\.0$", r"\1/linear_0", "linear"),
    (r"^adj_model\.adj_learning\.(mlp_t2i|mlp_i2t)\.3$", r"\1/linear_1", "linear"),
]
_IN_PROJ = "aggr.layers.0.self_attn.in_proj_weight"

# Their opt keys that are `config.model.hrem` options (graph_lib.extra_parameters and
# arguments.py), with the cast each needs (their 0/1 ints are our booleans).
OPT_OPTIONS = {"nhead": int, "dropout": float, "residual_weight": float,
               "no_imgnorm": bool, "no_txtnorm": bool, "base_loss": str, "gnn_loss": str,
               "warmup": int, "num_layers_enc": int, "graph_lr_factor": float,
               "mask_weight": float, "threshold": float, "topk": int,
               "reg_loss_weight": float, "norm_input": bool, "cross_loss": bool,
               "mask_repeat": bool}


def _states(ckpt: Mapping[str, Any], what: str):
  return vse_convert.encoder_states(*state_dicts(ckpt, 2, what))


def detect(ckpt: Mapping[str, Any]) -> bool:
  """True for an HREM train.py checkpoint: two state dicts whose encoders both end in
  a TransformerEncoderLayer (`aggr.layers.0.*`), the image side with `fc.fc` (FC_MLP),
  the text side BERT + `linear`."""
  found = detected_state_dicts(ckpt, 2, strip=True)
  if found is None:
    return False
  img, txt = found
  return (_IN_PROJ in img and _IN_PROJ in txt and "fc.fc.weight" in img
          and "linear.weight" in txt and any(k.startswith(vse_convert.BERT_PREFIX) for k in txt))


def model_options(opt: Mapping[str, Any], img: Mapping[str, np.ndarray],
                  txt: Mapping[str, np.ndarray], bert_path: str = "",
                  bert_heads: Optional[int] = None) -> Dict[str, Any]:
  """`config.model` values (flat: widths, `hrem.<key>`, `bert`: a BertConfig) implied by
  the weights and `opt`; where `opt` states a width too, they must agree."""
  if "fc.fc.weight" not in img:
    raise ValueError(f"missing img_enc param fc.fc.weight; keys: {sorted(img)[:8]}")
  fc = img["fc.fc.weight"]
  out: Dict[str, Any] = {"embed_size": int(fc.shape[0]), "img_dim": int(fc.shape[1])}
  for key in ("embed_size", "img_dim"):
    if key in opt and int(opt[key]) != out[key]:
      raise ValueError(f"opt.{key}={opt[key]!r} but img_enc.fc.fc.weight says {out[key]}")
  for key, cast in OPT_OPTIONS.items():
    if key in opt and opt[key] is not None:
      out[f"hrem.{key}"] = cast(opt[key])
  if "size_augment" in opt and not opt["size_augment"]:
    out["hrem.region_drop"] = 0.0
  dataset = "coco" if str(opt.get("dataset", "")) == "coco" else "f30k"
  out["hrem.nonzero_loss_cutoff"] = hrem_config.NONZERO_LOSS_CUTOFF[dataset]
  out["bert"] = vse_convert.bert_config(txt, bert_path, bert_heads)
  return out


def convert_state_dicts(img: Mapping[str, np.ndarray], txt: Mapping[str, np.ndarray],
                        expected: Mapping[str, Tuple[int, ...]], bert,
                        what: str = "HREM checkpoint") -> dict:
  """Maps HREM's img_enc / txt_enc state dicts (numpy, `module.` stripped) onto our
  `{"params", "batch_stats"}`; `bert`: the text encoder's BertConfig.

  Raises:
    ConversionError naming every unexpected key, missing param and shape mismatch.
  """
  return vse_convert.map_encoders(img, txt, RULES, expected, bert, what, "HREM")


def convert_objective(state: Mapping[str, Any], expected: Mapping[str, Tuple[int, ...]],
                      what: str = "GraphLoss state dict") -> dict:
  """Their GraphLoss `state_dict()` as the objective's `{"params": ...}` (`expected`:
  the flat shapes, `params/...`, of `GraphObjective.init`'s variables).

  Raises:
    ConversionError naming every unexpected key, missing param and shape mismatch.
  """
  state = {k: to_numpy(v) for k, v in strip_prefix(state).items()}
  variables = map_state_dict(state, OBJECTIVE_RULES, expected, what)
  variables.pop("batch_stats", None)
  return variables


def make_config(c, model_opts: Mapping[str, Any], opt: Mapping[str, Any], bert_path: str):
  """The workdir config: the base config `c` with model.name="hrem", the model the
  weights and `opt` imply (the BERT shape as `bert.*` with `bert_random_init`: the
  weights come from the checkpoint, the tokenizer from `bert_path`), their optimiser
  (AdamW, BERT at lr x 0.1, the lr milestones of opt.lr_schedules) and the precomp data
  layout of `opt.dataset`."""
  flat = {k: v for k, v in model_opts.items() if k != "bert"}
  c = workdir_config(c, FAMILY, flat, opt, "precomp")
  vse_convert.set_bert_shape(c.model.hrem, model_opts["bert"], bert_path)
  if str(opt.get("dataset", "")) == "coco":  # their opt says `dataset`, not `data_name`
    c.data.name, c.eval.protocol, c.data.test_split = "coco", "coco", "testall"
  vse_config.adamw(c, hrem_config.WEIGHT_DECAY, hrem_config.BERT_LR_FACTOR)
  schedules = opt.get("lr_schedules")
  c.train.lr_milestones = (",".join(str(int(e)) for e in schedules) if schedules
                           else hrem_config.MILESTONES)
  return validate_workdir_config(c, "an HREM", hrem_config.validate)


def _summary(config, opt):
  del opt
  return {"embed_size": config.model.embed_size, "img_dim": config.model.img_dim,
          "nhead": config.model.hrem.nhead}, []


def convert(ckpt: Mapping[str, Any], options: Optional[Mapping[str, Any]] = None, *,
            config) -> Converted:
  """A loaded HREM checkpoint (`convert.engine.load_checkpoint`) as a workdir's content.

  Args:
    ckpt: the checkpoint dict ("model": [img_enc, txt_enc], "opt", ...), numpy tensors.
    options: `bert_path` (tokenizer and head count), `bert_heads`, `path` (messages).
    config: the base config, filled in as the workdir's.
  """
  return vse_convert.convert(ckpt, options, config, name="HREM", section=FAMILY,
                             split=_states, model_options=model_options,
                             make_config=make_config, convert_state_dicts=convert_state_dicts,
                             summary=_summary, word_vocab=False)
