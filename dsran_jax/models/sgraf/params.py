"""SGRAF's PyTorch checkpoint rules (Paranioar/SGRAF train.py layout) for
`tools.convert_torch`.

Their `model_best.pth.tar` (the released Flickr30K_SGRAF / MSCOCO_SGRAF files too) is
`{"model": [img_enc.state_dict(), txt_enc.state_dict(), sim_enc.state_dict()], "opt":
argparse.Namespace, "epoch", "best_rsum", "Eiters"}`:

    img_enc: fc.{weight (d, img_dim), bias}
    txt_enc: embed.weight (V, word_dim); cap_rnn.{weight,bias}_{ih,hh}_l0[_reverse]
    sim_enc: v_global_w.embedding_local.{0: Linear, 1: BatchNorm1d(36)}
             v_global_w.embedding_global.{0: Linear, 1: BatchNorm1d(d)}
             v_global_w.embedding_common.0, t_global_w.embedding_{local,global,common}.0
             sim_tranloc_w, sim_tranglo_w (d -> s), sim_eval_w (s -> 1)
             SGR_module.<i>.{graph_query_w, graph_key_w, sim_graph_w}     (SGR)
             SAF_module.attn_sim_w, SAF_module.bn (BatchNorm1d(1))           (SAF)

The options `opt` holds that change the model become `config.model.sgraf.*` (and the
widths `model.embed_size`, `word_dim`, `img_dim`, `vocab_size`), checked against the
weights' shapes. Their vocabulary `vocab/{f30k,coco}_precomp_vocab.json` is SCAN's
format (`{"word2idx", "idx2word", "idx"}`), read with the ids unchanged.
"""
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from dsran_jax import models
from dsran_jax.convert import authors_vocab
from dsran_jax.convert.engine import (ConversionError, Converted, detected_state_dicts,
                                      map_state_dict, opt_of, state_dicts, to_numpy,
                                      validate_workdir_config, workdir_config)
from dsran_jax.models.variables import variable_shapes

FAMILY = "sgraf"
_VSA = r"sim_enc\.v_global_w"
_TSA = r"sim_enc\.t_global_w"
RULES = [
    (r"^img_enc\.fc$", "img_enc/fc", "linear"),
    (r"^txt_enc\.embed$", "txt_enc/embed", "embed"),
    (r"^txt_enc\.cap_rnn$", "txt_enc/gru", "gru"),
    (rf"^{_VSA}\.embedding_local\.0$", "sim_enc/v_global_w/local_fc", "linear"),
    (rf"^{_VSA}\.embedding_local\.1$", "sim_enc/v_global_w/local_bn", "bn"),
    (rf"^{_VSA}\.embedding_global\.0$", "sim_enc/v_global_w/global_fc", "linear"),
    (rf"^{_VSA}\.embedding_global\.1$", "sim_enc/v_global_w/global_bn", "bn"),
    (rf"^{_VSA}\.embedding_common\.0$", "sim_enc/v_global_w/common_fc", "linear"),
    (rf"^{_TSA}\.embedding_local\.0$", "sim_enc/t_global_w/local_fc", "linear"),
    (rf"^{_TSA}\.embedding_global\.0$", "sim_enc/t_global_w/global_fc", "linear"),
    (rf"^{_TSA}\.embedding_common\.0$", "sim_enc/t_global_w/common_fc", "linear"),
    (r"^sim_enc\.(sim_tranloc_w|sim_tranglo_w|sim_eval_w)$", r"sim_enc/\1", "linear"),
    (r"^sim_enc\.SGR_module\.(\d+)\.(graph_query_w|graph_key_w|sim_graph_w)$",
     r"sim_enc/SGR_module_\1/\2", "linear"),
    (r"^sim_enc\.SAF_module\.attn_sim_w$", "sim_enc/SAF_module/attn_sim_w", "linear"),
    (r"^sim_enc\.SAF_module\.bn$", "sim_enc/SAF_module/bn", "bn"),
]
# opts.py flags that change the model; same names under config.model.sgraf
# (module_name -> module).
SGRAF_OPTS = {"module_name": "module", "sim_dim": "sim_dim", "sgr_step": "sgr_step",
              "bi_gru": "bi_gru", "num_layers": "num_layers", "no_imgnorm": "no_imgnorm",
              "no_txtnorm": "no_txtnorm"}
_SGR_KEY = re.compile(r"^SGR_module\.(\d+)\.")
_GRU_LAYER = re.compile(r"^cap_rnn\.\w+_l(\d+)(_reverse)?$")


def _states(ckpt: Mapping[str, Any], what: str) -> List[Dict[str, np.ndarray]]:
  return [{k: to_numpy(v) for k, v in sd.items()} for sd in state_dicts(ckpt, 3, what)]


def detect(ckpt: Mapping[str, Any]) -> bool:
  """True for an SGRAF train.py checkpoint: `model` is three state dicts [img_enc
  (fc.*), txt_enc (embed.*, cap_rnn.*), sim_enc (v_global_w.*, sim_eval_w.*)], and its
  `opt`, when present, has SGRAF's module_name and sim_dim."""
  found = detected_state_dicts(ckpt, 3)
  if found is None:
    return False
  img, txt, sim = found
  layout = (bool(img) and all(k.startswith("fc.") for k in img)
            and "embed.weight" in txt and any(k.startswith("cap_rnn.") for k in txt)
            and "sim_eval_w.weight" in sim and any(k.startswith("v_global_w.") for k in sim))
  opt = opt_of(ckpt)
  return layout and (not opt or ("module_name" in opt and "sim_dim" in opt))


def _need(sd: Mapping[str, np.ndarray], key: str, where: str) -> np.ndarray:
  if key not in sd:
    raise ValueError(f"missing {where} param {key}; keys: {sorted(sd)[:8]}")
  return sd[key]


def model_options(opt: Mapping[str, Any], img: Mapping[str, np.ndarray],
                  txt: Mapping[str, np.ndarray],
                  sim: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  """`config.model` values (flat: widths, plus `sgraf.<key>`) implied by opt and weights.

  The widths, the head (SGR weights or SAF weights), the number of SGR steps, the
  BiGRU and the VisualSA slot count are read off the weights; where `opt` also states
  one, they must agree.
  """
  fc = _need(img, "fc.weight", "img_enc")
  emb = _need(txt, "embed.weight", "txt_enc")
  loc = _need(sim, "sim_tranloc_w.weight", "sim_enc")
  slots = _need(sim, "v_global_w.embedding_local.1.weight", "sim_enc")
  layers = sorted({int(m.group(1)) for k in txt for m in [_GRU_LAYER.match(k)] if m})
  if layers != [0]:
    raise ValueError(f"txt_enc cap_rnn.* has layers {layers}: dsran_jax's SGRAF supports "
                     f"one GRU layer (--num_layers=1, every SGRAF recipe)")
  steps = sorted({int(m.group(1)) for k in sim for m in [_SGR_KEY.match(k)] if m})
  has_saf = any(k.startswith("SAF_module.") for k in sim)
  if steps and has_saf:
    raise ValueError("sim_enc holds both SGR_module.* and SAF_module.* weights")
  if not steps and not has_saf:
    raise ValueError("sim_enc holds neither SGR_module.* nor SAF_module.* weights")
  if steps and steps != list(range(len(steps))):
    raise ValueError(f"sim_enc SGR_module indices {steps}: expected 0..n-1")
  module = "SGR" if steps else "SAF"
  out = {"embed_size": int(fc.shape[0]), "img_dim": int(fc.shape[1]),
         "vocab_size": int(emb.shape[0]), "word_dim": int(emb.shape[1]),
         "sgraf.sim_dim": int(loc.shape[0]), "sgraf.module": module,
         "sgraf.bi_gru": any(k.endswith("_reverse") for k in txt),
         "sgraf.num_regions": int(slots.shape[0]), "sgraf.num_layers": 1}
  if steps:
    out["sgraf.sgr_step"] = len(steps)
  checks = {"embed_size": "embed_size", "img_dim": "img_dim", "vocab_size": "vocab_size",
            "word_dim": "word_dim", "sim_dim": "sgraf.sim_dim", "module_name": "sgraf.module",
            "bi_gru": "sgraf.bi_gru", "num_layers": "sgraf.num_layers"}
  if steps:
    checks["sgr_step"] = "sgraf.sgr_step"
  for key, ours in checks.items():
    if key in opt and opt[key] != out[ours]:
      raise ValueError(f"opt.{key}={opt[key]!r} but the weights say {out[ours]!r}")
  for key, ours in SGRAF_OPTS.items():
    if key in opt and f"sgraf.{ours}" not in out:
      out[f"sgraf.{ours}"] = opt[key]
  return out


def convert_state_dicts(img: Mapping[str, np.ndarray], txt: Mapping[str, np.ndarray],
                        sim: Mapping[str, np.ndarray],
                        expected: Mapping[str, Tuple[int, ...]],
                        what: str = "SGRAF checkpoint") -> dict:
  """Maps their img_enc / txt_enc / sim_enc state dicts (numpy) onto our variables.

  Args:
    expected: `variables.variable_shapes(model)` of the model they should fill.

  Raises:
    ConversionError naming every unexpected key, missing param and shape mismatch.
  """
  state = {}
  for prefix, sd in (("img_enc", img), ("txt_enc", txt), ("sim_enc", sim)):
    state.update({f"{prefix}.{k}": v for k, v in sd.items()})
  # Their EncoderImage.load_state_dict keeps only its own keys, so a full-model state in
  # img_enc would load; we report strays instead (none appear in their train.py files).
  return map_state_dict(state, RULES, expected, what)


def make_config(c, options: Mapping[str, Any], opt: Mapping[str, Any], family: str = FAMILY,
                configure: Optional[Callable[[Any], Any]] = None):
  """The workdir config: the base config `c` with model.name=`family`, the model options
  the checkpoint implies (every model.sgraf key written out), the recipe its `opt`
  records (for fine-tuning) and the precomp layout SGRAF trains on; `configure(c)`
  then adjusts it (KIDRR: every module off) before it is validated."""
  c = workdir_config(c, family, options, opt, "precomp",
                     num_regions=options["sgraf.num_regions"])
  if configure is not None:
    configure(c)
  return validate_workdir_config(c, "an SGRAF", models.family_config(family).validate)


def convert(ckpt: Mapping[str, Any], options: Optional[Mapping[str, Any]] = None,
            family: str = FAMILY, configure: Optional[Callable[[Any], Any]] = None, *,
            config) -> Converted:
  """A loaded SGRAF checkpoint (`convert.engine.load_checkpoint`) as a workdir's content.

  Args:
    ckpt: the checkpoint dict ("model": [img_enc, txt_enc, sim_enc], "opt", ...).
    options: converter options: `vocab` (their `*_precomp_vocab.json` or a dsran_jax
      vocab.json) and `path` (for messages). The data layout is always "precomp".
    family: the family the workdir runs ("kidrr" for KIDRR with every module off).
    configure: adjusts the config before the model is built (see make_config).
    config: the base config (`default_config.get_base_config()`, from the caller), filled
      in as the workdir's config.
  """
  options = dict(options or {})
  what = f"SGRAF checkpoint {options['path']}" if options.get("path") else "SGRAF checkpoint"
  img, txt, sim = _states(ckpt, what)
  opt = opt_of(ckpt)
  try:
    model_opts = model_options(opt, img, txt, sim)
  except ValueError as e:
    raise ConversionError(f"{what}: {e}") from None
  config = make_config(config, model_opts, opt, family, configure)
  model = models.build_model(config.model, config.model.vocab_size)
  variables = convert_state_dicts(img, txt, sim, variable_shapes(model), what)
  vocab = None
  if options.get("vocab"):
    vocab = authors_vocab.load_checked_vocab(options["vocab"], config.model.vocab_size,
                                             "txt_enc.embed.weight")
  s = config.model.sgraf
  summary = {"module": s.module, "sim_dim": s.sim_dim, "sgr_step": s.sgr_step,
             "bi_gru": s.bi_gru, "embed_size": config.model.embed_size,
             "img_dim": config.model.img_dim, "vocab_size": config.model.vocab_size,
             "num_regions": s.num_regions}
  if vocab is None:
    summary["note"] = ("no --vocab given; encode_texts(texts=...) needs the authors' "
                       "vocab/<data_name>_vocab.json converted with --vocab=...")
  return Converted(variables, config, vocab, summary)
