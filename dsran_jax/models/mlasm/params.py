"""MLASM's PyTorch checkpoint rules (xiaohu306/MLASM train.py layout) for `tools.convert_torch`.

Their `checkpoint_{epoch}_rsum=....pth.tar` is `{"model": [img_enc, cap_enc, region_enc,
word_enc] (state dicts), "opt": argparse.Namespace, "epoch", "best_rsum", "Eiters"}`:

    img_enc:    cnn.module.*  (torchvision ResNet-152 in nn.DataParallel, fc = identity,
                               BatchNorm running stats drifted by their train-mode BN)
                fc.{weight,bias} (E, 2048)   fc_attn_i.*  (E, E)   fusion.gate0.* (E, 2E)
                fusion.fusion0.*, fusion.fusion1.*   (never called: dropped)
    cap_enc:    fc_text.* (E, E);  sa.*  (a TextSA never called: dropped)
    region_enc: fc_region.* (E, 2048)
    word_enc:   embed.weight (V, 300), rnn.{weight,bias}_{ih,hh}_l0   (nn.GRU, r|z|n)

The model itself reads the pooled CNN feature (`global_feat`), not images, so the CNN is
not part of the Flax variables: `convert` checks it against dsran_jax's ResNet
(`models/common/resnet.py`) and hands it back as a file for the workdir,
`resnet152.safetensors` (`resnet.checkpoint_cnn`: every tensor under torchvision's name,
values and dtypes as stored, drifted running stats, step counters and all), which
`python -m dsran_jax.extract --weights=...` reads to write `{split}_global.npy` with the
authors' exact CNN.
"""
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from dsran_jax import models
from dsran_jax.convert import authors_vocab
from dsran_jax.convert.engine import (ConversionError, Converted, map_state_dict, opt_of,
                                      safetensors_file, state_dicts, to_numpy,
                                      validate_workdir_config, workdir_config)
from dsran_jax.models.common import recipes, resnet
from dsran_jax.models.mlasm import config as mlasm_config
from dsran_jax.models.variables import variable_shapes

FAMILY = "mlasm"
ENCODERS = ("img_enc", "cap_enc", "region_enc", "word_enc")
CNN_PREFIX = "img_enc.cnn.module."
RULES = [
    (r"^img_enc\.fc$", "img_enc/fc", "linear"),
    (r"^img_enc\.fc_attn_i$", "img_enc/fc_attn_i", "linear"),
    (r"^img_enc\.fusion\.gate0$", "img_enc/fusion/gate0", "linear"),
    (r"^img_enc\.fusion\.fusion[01]$", "", "drop"),  # unused by their Fusion.forward
    (r"^cap_enc\.fc_text$", "cap_enc/fc_text", "linear"),
    (r"^cap_enc\.sa(\..*)?$", "", "drop"),  # their TextSA, never called
    (r"^region_enc\.fc_region$", "region_enc/fc_region", "linear"),
    (r"^word_enc\.embed$", "word_enc/embed", "embed"),
    (r"^word_enc\.rnn$", "word_enc/gru", "gru"),
]


def _states(ckpt: Mapping[str, Any], what: str) -> Dict[str, np.ndarray]:
  """The four state dicts, flattened to `<encoder>.<key>` numpy arrays (float32, but the
  CNN's tensors as stored: they are written out whole)."""
  dicts = state_dicts(ckpt, 4, what)
  return {f"{enc}.{k}": to_numpy(v, keep_dtype=(enc == "img_enc" and k.startswith("cnn.")))
          for enc, sd in zip(ENCODERS, dicts) for k, v in sd.items()}


def detect(ckpt: Mapping[str, Any]) -> bool:
  """True for an MLASM train.py checkpoint: `model` is four state dicts, the first with
  `fc_attn_i` and the fusion gate, the third `fc_region`, the fourth a word `embed`."""
  if not isinstance(ckpt, Mapping):
    return False
  try:
    img, cap, region, word = state_dicts(ckpt, 4, "checkpoint")
  except ConversionError:
    return False
  return ("fc_attn_i.weight" in img and "fusion.gate0.weight" in img
          and "fc_text.weight" in cap and "fc_region.weight" in region
          and "embed.weight" in word)


def _need(state: Mapping[str, np.ndarray], key: str) -> np.ndarray:
  if key not in state:
    raise ConversionError(f"missing {key}; the checkpoint has {sorted(state)[:8]} ...")
  return state[key]


def model_options(opt: Mapping[str, Any], state: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  """`config.model` values (flat: widths, plus `mlasm.<key>`) the weights and `opt` imply."""
  region = _need(state, "region_enc.fc_region.weight")
  fc = _need(state, "img_enc.fc.weight")
  emb = _need(state, "word_enc.embed.weight")
  out = {"embed_size": int(region.shape[0]), "img_dim": int(region.shape[1]),
         "vocab_size": int(emb.shape[0]), "word_dim": int(emb.shape[1]),
         "mlasm.global_dim": int(fc.shape[1])}
  for key in ("embed_size", "word_dim", "img_dim", "vocab_size"):
    if opt.get(key) is not None and int(opt[key]) != out[key]:
      raise ConversionError(f"opt.{key}={opt[key]!r} but the weights say {out[key]}")
  if opt.get("num_layers", 1) != 1:
    raise ConversionError(f"opt.num_layers={opt['num_layers']}: MLASM's word GRU has one "
                          f"layer in dsran_jax")
  # train.py sets cross_attn = "all"; with "t2i" / "i2t" their forward_emb passes None to
  # one of the global encoders and fails, so no checkpoint of those exists.
  if opt.get("cross_attn", "all") != "all":
    raise ConversionError(f"opt.cross_attn={opt['cross_attn']!r}: MLASM's model needs "
                          f"'all' (both attention directions), as their train.py sets")
  if not str(opt.get("cnn_type", "resnet152")).startswith("resnet"):
    raise ConversionError(f"opt.cnn_type={opt['cnn_type']!r}: only ResNet image encoders "
                          f"are supported")
  if opt.get("ratio") is not None:
    # Their --ratio has no type: a command-line value arrives as a string.
    try:
      out["mlasm.ratio"] = float(opt["ratio"])
    except (TypeError, ValueError):
      raise ConversionError(f"opt.ratio={opt['ratio']!r} is not a number") from None
  return out


def cnn_state(state: Mapping[str, np.ndarray], global_dim: int, what: str):
  """`(resnet_config, tensors)` of the checkpoint's `img_enc.cnn.module.*`
  (`resnet.checkpoint_cnn`: checked against dsran_jax's ResNet, every tensor as stored,
  under torchvision's names), whose pooled output must be `global_dim` wide."""
  return resnet.converted_cnn(
      state, CNN_PREFIX, global_dim, "img_enc.fc.weight", what,
      "MLASM's checkpoints hold their ResNet-152 (with its drifted BatchNorm statistics), "
      "which global_feat must be extracted with")


def convert_state(state: Mapping[str, np.ndarray], expected: Mapping[str, Tuple[int, ...]],
                  what: str = "MLASM checkpoint") -> dict:
  """Maps the flattened MLASM state (CNN excluded) onto our `{"params", ...}`.

  Raises:
    ConversionError naming every unexpected key, missing param and shape mismatch.
  """
  rest = {k: v for k, v in state.items() if not k.startswith("img_enc.cnn.")}
  return map_state_dict(rest, RULES, expected, what)


def make_config(c, options: Mapping[str, Any], opt: Mapping[str, Any], data_format: str):
  """The workdir config: the base config `c` with model.name="mlasm", the widths and
  `model.mlasm` keys the checkpoint implies (every key written out), their recipe from
  `opt` (for fine-tuning) and the region layout they train on (36 regions)."""
  c = workdir_config(c, FAMILY, options, opt, data_format)
  # Their ContrastiveLoss takes the hardest negatives whatever opt.max_violation says.
  c.train.max_violation = True
  c.eval.max_dev_images = recipes.vsepp_dev_images(c.data.name)  # VSE++'s loaders
  return validate_workdir_config(c, "an MLASM", mlasm_config.validate)


def convert(ckpt: Mapping[str, Any], options: Optional[Mapping[str, Any]] = None, *,
            config) -> Converted:
  """A loaded MLASM checkpoint (`convert.engine.load_checkpoint`) as a workdir's content.

  Args:
    ckpt: the checkpoint dict ("model": [img_enc, cap_enc, region_enc, word_enc], "opt").
    options: converter options: `vocab` (their `vocab/<data_name>_vocab.pkl` or a
      dsran_jax vocab.json), `data_format` ("vlp", their features, or "precomp"),
      `path` (for messages).
    config: the base config (`default_config.get_base_config()`, from the caller), filled
      in as the workdir's config.

  Returns:
    `Converted` whose `files` hold the CNN weights file (`resnet.weights_file_name`).
  """
  options = dict(options or {})
  what = f"MLASM checkpoint {options['path']}" if options.get("path") else "MLASM checkpoint"
  state = _states(ckpt, what)
  opt = opt_of(ckpt)
  try:
    model_opts = model_options(opt, state)
  except ConversionError as e:
    raise ConversionError(f"{what}: {e}") from None
  config = make_config(config, model_opts, opt, options.get("data_format") or "vlp")
  model = models.build_model(config.model, config.model.vocab_size)
  variables = convert_state(state, variable_shapes(model), what)
  resnet_config, tv = cnn_state(state, config.model.mlasm.global_dim, what)
  cnn_file = resnet.weights_file_name(resnet_config)
  vocab = None
  if options.get("vocab"):
    vocab = authors_vocab.load_checked_vocab(options["vocab"], config.model.vocab_size,
                                             "word_enc.embed.weight")
  s = config.model.mlasm
  notes = [f"global_feat must come from the checkpoint's own CNN: python -m "
           f"dsran_jax.extract --images=... --weights=<workdir>/{cnn_file} --out=<data.root> "
           f"--split=test"]
  if vocab is None:
    notes.append("no --vocab given; encode_texts(texts=...) needs the authors' "
                 "vocab/<data_name>_vocab.pkl converted with --vocab=...")
  summary = {"ratio": s.ratio, "global_mode": s.global_mode, "global_dim": s.global_dim,
             "embed_size": config.model.embed_size, "img_dim": config.model.img_dim,
             "vocab_size": config.model.vocab_size, "cnn": resnet_config.describe(),
             "cnn_weights": cnn_file, "note": "; ".join(notes)}
  return Converted(variables, config, vocab, summary,
                   files={cnn_file: safetensors_file(
                       tv, {"source": f"{options.get('path', 'checkpoint')}: {CNN_PREFIX}*"})})
