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
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from dsran_jax import models
from dsran_jax.convert.engine import (DROP, ConversionError, Converted, flatten,
                                      map_state_dict, opt_of, state_dicts, strip_prefix,
                                      to_numpy, validate_workdir_config, workdir_config)
from dsran_jax.models.common.bert import hf_state_dict_to_params
from dsran_jax.models.dsran.params import infer_bert_config
from dsran_jax.models.hrem import config as hrem_config
from dsran_jax.models.variables import variable_shapes
from dsran_jax.models.vse_infty.params import heads_from_bert_dir

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
BERT_PREFIX = "bert."
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
  img, txt = state_dicts(ckpt, 2, what)
  return ({k: to_numpy(v) for k, v in strip_prefix(img).items()},
          {k: to_numpy(v) for k, v in strip_prefix(txt).items()})


def detect(ckpt: Mapping[str, Any]) -> bool:
  """True for an HREM train.py checkpoint: two state dicts whose encoders both end in
  a TransformerEncoderLayer (`aggr.layers.0.*`), the image side with `fc.fc` (FC_MLP),
  the text side BERT + `linear`."""
  if not isinstance(ckpt, Mapping):
    return False
  try:
    img, txt = state_dicts(ckpt, 2, "checkpoint")
  except ConversionError:
    return False
  img, txt = strip_prefix(img), strip_prefix(txt)
  return (_IN_PROJ in img and _IN_PROJ in txt and "fc.fc.weight" in img
          and "linear.weight" in txt and any(k.startswith(BERT_PREFIX) for k in txt))


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
  bert_state = {k[len(BERT_PREFIX):]: v for k, v in txt.items() if k.startswith(BERT_PREFIX)}
  if "embeddings.word_embeddings.weight" not in bert_state:
    raise ValueError("missing txt_enc param bert.embeddings.word_embeddings.weight")
  hidden = int(bert_state["embeddings.word_embeddings.weight"].shape[1])
  heads = bert_heads or heads_from_bert_dir(bert_path, hidden)
  out["bert"] = infer_bert_config(bert_state, heads)
  return out


def convert_state_dicts(img: Mapping[str, np.ndarray], txt: Mapping[str, np.ndarray],
                        expected: Mapping[str, Tuple[int, ...]], bert,
                        what: str = "HREM checkpoint") -> dict:
  """Maps HREM's img_enc / txt_enc state dicts (numpy, `module.` stripped) onto our
  `{"params", "batch_stats"}`; `bert`: the text encoder's BertConfig.

  Raises:
    ConversionError naming every unexpected key, missing param and shape mismatch.
  """
  problems: List[str] = []
  bert_state = {k[len(BERT_PREFIX):]: v for k, v in txt.items() if k.startswith(BERT_PREFIX)}
  txt = {k: v for k, v in txt.items() if not k.startswith(BERT_PREFIX)}
  prefix = "params/txt_enc/bert/"
  extra = {}
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
    raise ConversionError(f"{what} does not match dsran_jax's HREM:\n" + "\n".join(problems))
  return variables


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
  s = c.model.hrem
  bert = model_opts["bert"]
  s.bert_random_init = True
  for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
              "max_position", "type_vocab_size"):
    s.bert[key] = getattr(bert, key)
  s.bert_path = bert_path
  if str(opt.get("dataset", "")) == "coco":  # their opt says `dataset`, not `data_name`
    c.data.name, c.eval.protocol, c.data.test_split = "coco", "coco", "testall"
  c.train.optimizer = "adamw"
  c.train.weight_decay = hrem_config.WEIGHT_DECAY
  c.train.bert_lr_scale = hrem_config.BERT_LR_FACTOR
  schedules = opt.get("lr_schedules")
  c.train.lr_milestones = (",".join(str(int(e)) for e in schedules) if schedules
                           else hrem_config.MILESTONES)
  return validate_workdir_config(c, "an HREM", hrem_config.validate)


def convert(ckpt: Mapping[str, Any], options: Optional[Mapping[str, Any]] = None, *,
            config) -> Converted:
  """A loaded HREM checkpoint (`convert.engine.load_checkpoint`) as a workdir's content.

  Args:
    ckpt: the checkpoint dict ("model": [img_enc, txt_enc], "opt", ...), numpy tensors.
    options: `bert_path` (tokenizer and head count), `bert_heads`, `path` (messages).
    config: the base config, filled in as the workdir's.
  """
  options = dict(options or {})
  what = f"HREM checkpoint {options['path']}" if options.get("path") else "HREM checkpoint"
  img, txt = _states(ckpt, what)
  opt = opt_of(ckpt)
  bert_path = options.get("bert_path") or ""
  if options.get("vocab"):
    raise ConversionError("--vocab is for word-vocabulary models; HREM's tokenizer (BERT "
                          "WordPiece) comes from --bert_path")
  try:
    model_opts = model_options(opt, img, txt, bert_path, options.get("bert_heads"))
  except ValueError as e:
    raise ConversionError(f"{what}: {e}") from None
  config = make_config(config, model_opts, opt, bert_path)
  model = models.build_model(config.model)
  variables = convert_state_dicts(img, txt, variable_shapes(model), model_opts["bert"], what)
  bert = model_opts["bert"]
  summary = {"embed_size": config.model.embed_size, "img_dim": config.model.img_dim,
             "nhead": config.model.hrem.nhead, "bert_path": bert_path,
             "bert": {k: getattr(bert, k) for k in
                      ("hidden_size", "num_layers", "num_heads", "intermediate_size")}}
  if not bert_path:
    summary["note"] = ("no --bert_path given; encode_texts(texts=...) needs "
                       "model.hrem.bert_path (a BERT directory with vocab.txt) set in "
                       "config.json")
  return Converted(variables, config, None, summary)
