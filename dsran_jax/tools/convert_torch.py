"""Converts an authors' DSRAN PyTorch checkpoint (BERT or GRU build) into a dsran_jax workdir.

    python -m dsran_jax.tools.convert_torch --checkpoint=model_best.pth.tar --workdir=DIR \
        [--bert_path=DIR_or_hub_name] [--bert_heads=N] [--vocab=f30k_vocab.pkl|vocab.json] \
        [--data_format=vlp|precomp]

The checkpoint is read with `torch.load(weights_only=True)`, allowing only the one
non-tensor class the authors' files contain (`argparse.Namespace`, their `opt`); anything
else is refused before it is built. The build (BERT or GRU), K, the widths and the BERT
shape are read off the weights. The workdir gets:
- `config.json`: the base config with the inferred model shape, `model.text_padding =
  "reference"` (the authors' padding, so their weights give their embeddings) and the
  authors' eval batch size (`eval.batch_size`: it sets the GRU build's padding width);
- `checkpoints/best`: `{"params", "batch_stats"}` (orbax), meta with the source file,
  epoch and best rsum;
- `vocab.json` (GRU build, from `--vocab`): the authors' word ids unchanged.

The weight map is the regex table `bert_rules()` / `gru_rules(K)` (checkpoint module
prefix -> Flax module path, plus a leaf kind); `convert_state_dict(state_dict, build)`
applies it without touching files. torch is needed only for reading the `.pth.tar`.
"""
import argparse
import os
import pickle
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from absl import app
from absl import flags
import numpy as np
from flax import traverse_util

# ----------------------------------------------------------------------- weight map

# How a checkpoint leaf (the part of the key after the module prefix) lands in the Flax
# variables: {torch leaf: (collection, flax leaf, transform)}; None drops the leaf.
_T = lambda w: np.ascontiguousarray(w.T)  # PyTorch (out, in) -> Flax (in, out)
_I = lambda w: w
LEAF_KINDS: Dict[str, Dict[str, Optional[Tuple[str, str, Callable]]]] = {
    "linear": {"weight": ("params", "kernel", _T), "bias": ("params", "bias", _I)},
    "bn": {"weight": ("params", "scale", _I), "bias": ("params", "bias", _I),
           "running_mean": ("batch_stats", "mean", _I),
           "running_var": ("batch_stats", "var", _I), "num_batches_tracked": None},
    "embed": {"weight": ("params", "embedding", _I)},
    "gru": {"weight_ih_l0": ("params", "w_ih", _T), "bias_ih_l0": ("params", "b_ih", _I),
            "weight_hh_l0": ("params", "w_hh", _T), "bias_hh_l0": ("params", "b_hh", _I)},
}
DROP = "drop"  # kind of modules we do not use
BERT = "bert"  # kind of the BERT subtree, mapped by models.bert.hf_state_dict_to_params

Rule = Tuple[str, str, str]  # (regex on the module prefix, Flax path template, kind)


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
      (r"^img_enc\.cnn(\..*)?$", "", DROP),            # ResNet-152: we take grid features
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
      (r"^img_enc\.cnn(\..*)?$", "", DROP),
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


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor; torch itself is not imported here
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def strip_data_parallel(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
  """Drops the `module.` prefix nn.DataParallel puts on every key (BERT build)."""
  if state_dict and all(k.startswith("module.") for k in state_dict):
    return {k[len("module."):]: v for k, v in state_dict.items()}
  return dict(state_dict)


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


def _need(state_dict, key: str, why: str) -> np.ndarray:
  if key not in state_dict:
    raise ValueError(f"missing param {key} (needed to infer {why})")
  return state_dict[key]


def _layer_count(keys, prefix: str) -> int:
  found = {int(m.group(1)) for k in keys for m in [re.match(prefix + r"(\d+)\.", k)] if m}
  if found != set(range(len(found))):
    raise ValueError(f"{prefix}N: layers {sorted(found)} are not numbered 0..n-1")
  return len(found)


def infer_bert_config(bert_state: Mapping[str, np.ndarray], heads: Optional[int] = None):
  """The `BertConfig` whose weights these are (keys without the `txt_enc.bert.` prefix).

  The number of attention heads leaves no trace in the weights: `heads`, else
  hidden / 64 (every released BERT's head width).
  """
  from dsran_jax.models.bert import BertConfig  # pylint: disable=g-import-not-at-top
  words = _need(bert_state, "embeddings.word_embeddings.weight", "the BERT vocabulary/width")
  pos = _need(bert_state, "embeddings.position_embeddings.weight", "BERT max positions")
  types = _need(bert_state, "embeddings.token_type_embeddings.weight", "BERT token types")
  inter = _need(bert_state, "encoder.layer.0.intermediate.dense.weight",
                "the BERT intermediate width")
  hidden = int(words.shape[1])
  if heads is None:
    if hidden % 64:
      raise ValueError(f"BERT hidden size {hidden} is not a multiple of 64: give the number "
                       f"of attention heads with --bert_heads")
    heads = hidden // 64
  if heads <= 0 or hidden % heads:
    raise ValueError(f"--bert_heads={heads} does not divide the BERT hidden size {hidden}")
  return BertConfig(vocab_size=int(words.shape[0]), hidden_size=hidden,
                    num_layers=_layer_count(bert_state, r"encoder\.layer\."),
                    num_heads=heads, intermediate_size=int(inter.shape[0]),
                    max_position=int(pos.shape[0]), type_vocab_size=int(types.shape[0]))


def infer_overrides(state_dict: Mapping[str, np.ndarray], build: str,
                    bert_heads: Optional[int] = None) -> Dict[str, Any]:
  """`config.model` values the weights imply (embed_size, K, img_dim, ...)."""
  grid_fc = "img_enc.fc.0.weight" if build == "bert" else "img_enc.fc.weight"
  w = _need(state_dict, grid_fc, "embed_size and img_dim")
  out = {"text_encoder": build, "embed_size": int(w.shape[0]), "img_dim": int(w.shape[1]),
         "K": infer_K(state_dict, build), "text_padding": "reference"}
  if build == "bert":
    out["pos_dim"] = int(_need(state_dict, "rcnn_enc.fc_pos.0.weight", "pos_dim").shape[1])
    out["use_region_pos"] = True
    bert_state = {k[len("txt_enc.bert."):]: v for k, v in state_dict.items()
                  if k.startswith("txt_enc.bert.")}
    out["bert"] = infer_bert_config(bert_state, bert_heads)
  else:
    emb = _need(state_dict, "txt_enc.embed.weight", "the vocabulary size and word_dim")
    out.update(vocab_size=int(emb.shape[0]), word_dim=int(emb.shape[1]),
               use_region_pos=False)
  return out


def _dsran_config(overrides: Mapping[str, Any]):
  from dsran_jax.models.dsran import DSRANConfig  # pylint: disable=g-import-not-at-top
  keys = ("embed_size", "K", "text_encoder", "img_dim", "pos_dim", "use_region_pos",
          "text_padding", "bert", "vocab_size", "word_dim")
  return DSRANConfig(**{k: overrides[k] for k in keys if k in overrides})


def expected_shapes(overrides: Mapping[str, Any]) -> Dict[str, Tuple[int, ...]]:
  """Flat {"params/a/b": shape, "batch_stats/...": shape} of the model (no compute)."""
  import jax  # pylint: disable=g-import-not-at-top
  from dsran_jax import models  # pylint: disable=g-import-not-at-top
  cfg = _dsran_config(overrides)
  model = models.build_model(cfg)
  batch = models.dummy_batch(cfg)
  shapes = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(1)}, batch, train=False))
  flat = traverse_util.flatten_dict(dict(shapes), sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


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
    `models.bert.BertConfig`).

  Raises:
    ValueError: naming every unexpected key, every missing param, and every shape that
      does not match the inferred config (tensor, checkpoint shape, expected shape).
  """
  from dsran_jax.models.bert import hf_state_dict_to_params  # pylint: disable=g-import-not-at-top
  state = {k: _to_numpy(v) for k, v in strip_data_parallel(state_dict).items()}
  build = build or detect_build(state)
  if build not in ("bert", "gru"):
    raise ValueError(f"build={build!r}: expected 'bert' or 'gru'")
  overrides = infer_overrides(state, build, bert_heads)
  rules = [(re.compile(p), t, kind) for p, t, kind in
           (bert_rules() if build == "bert" else gru_rules(overrides["K"]))]
  expected = expected_shapes(overrides)

  flat: Dict[str, np.ndarray] = {}
  bert_state: Dict[str, np.ndarray] = {}
  unexpected, bad_shapes, problems = [], [], []
  for key, value in state.items():
    module, _, leaf = key.rpartition(".")
    for pattern, template, kind in rules:
      m = pattern.match(module)
      if m:
        break
    else:
      unexpected.append(key)
      continue
    if kind == DROP:
      continue
    if kind == BERT:
      bert_state[key[len("txt_enc.bert."):]] = value
      continue
    target = LEAF_KINDS[kind].get(leaf, "unknown")
    if target is None:
      continue
    if target == "unknown":
      unexpected.append(key)
      continue
    collection, name, transform = target
    path = f"{collection}/{m.expand(template)}/{name}"
    if path not in expected:
      unexpected.append(key)
      continue
    value = transform(value.astype(np.float32))
    if value.shape != expected[path]:
      bad_shapes.append(f"{key} -> {path}: checkpoint {tuple(value.shape)} (after mapping), "
                        f"model expects {expected[path]}")
    flat[path] = value

  if build == "bert":
    bert_prefix = "params/text_enc/bert/"
    try:
      bert = hf_state_dict_to_params(bert_state, overrides["bert"])
      for sub, v in traverse_util.flatten_dict(bert, sep="/").items():
        flat[bert_prefix + sub] = v
    except ValueError as e:
      problems.append(f"in txt_enc.bert.* (inferred {overrides['bert']}): {e}")
      # Keep the missing-param report below from repeating every BERT param.
      flat.update({k: None for k in expected if k.startswith(bert_prefix)})

  missing = sorted(set(expected) - set(flat))
  for title, items in (("unexpected keys", unexpected), ("missing params", missing),
                       ("shape mismatches", bad_shapes)):
    if items:
      problems.append(f"{len(items)} {title}:\n  " + "\n  ".join(items))
  if problems:
    raise ValueError(f"{build.upper()}-build checkpoint does not match dsran_jax's DSRAN "
                     f"(K={overrides['K']}, embed_size={overrides['embed_size']}):\n"
                     + "\n".join(problems))
  variables = traverse_util.unflatten_dict(flat, sep="/")
  variables.setdefault("batch_stats", {})
  return variables, overrides


# ------------------------------------------------------------------------ file reading

ALLOWED_GLOBALS = ("argparse.Namespace",)


def load_checkpoint(path: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Reads an authors' `.pth.tar` safely.

  Returns:
    `(state_dict, info)`: the model state dict (BERT build: the dict under 'model'; GRU
    build: its first element, as their `VSE.state_dict()` wraps it in a list), and the
    other entries (`epoch`, `best_rsum`, `Eiters`, `opt` as a dict).

  Raises:
    ValueError: if the pickle needs any global besides argparse.Namespace (it is never
      built), or the file has no 'model' entry.
  """
  import torch  # pylint: disable=g-import-not-at-top  # optional dependency
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      ckpt = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    names = re.findall(r"GLOBAL (\S+) was not an allowed global", str(e))
    try:  # lists all of them, where the file format allows it
      names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path)
               if n not in ALLOWED_GLOBALS] or names
    except Exception:  # pylint: disable=broad-except
      pass
    if not names:
      raise ValueError(f"{path}: cannot read the checkpoint safely: {e}") from e
    raise ValueError(
        f"{path}: refusing to load: the pickle needs the global(s) {', '.join(names)}, "
        f"which could run code; only {', '.join(ALLOWED_GLOBALS)} and tensors are allowed "
        f"in an authors' DSRAN checkpoint") from None
  if not isinstance(ckpt, dict) or "model" not in ckpt:
    raise ValueError(f"{path}: expected a dict with a 'model' entry (an authors' DSRAN "
                     f"checkpoint), got {type(ckpt).__name__}"
                     + (f" with keys {sorted(ckpt)}" if isinstance(ckpt, dict) else ""))
  model = ckpt["model"]
  if isinstance(model, (list, tuple)):
    if len(model) != 1:
      raise ValueError(f"{path}: 'model' is a list of {len(model)} state dicts; expected 1")
    model = model[0]
  if not isinstance(model, Mapping):
    raise ValueError(f"{path}: 'model' is a {type(model).__name__}, not a state dict")
  info = {k: v for k, v in ckpt.items() if k != "model"}
  if isinstance(info.get("opt"), argparse.Namespace):
    info["opt"] = vars(info["opt"])
  return dict(model), info


class _AuthorsVocabulary:
  """Stand-in for the authors' `vocab.Vocabulary`: unpickling only fills its __dict__."""


_VOCAB_GLOBALS = {
    ("vocab", "Vocabulary"): _AuthorsVocabulary,
    ("__main__", "Vocabulary"): _AuthorsVocabulary,  # how their shipped .pkl files name it
    ("builtins", "dict"): dict, ("builtins", "int"): int, ("builtins", "str"): str,
}


class _VocabUnpickler(pickle.Unpickler):

  def find_class(self, module, name):
    if (module, name) in _VOCAB_GLOBALS:
      return _VOCAB_GLOBALS[(module, name)]
    raise pickle.UnpicklingError(
        f"refusing to load {module}.{name}: an authors' vocabulary pickle holds only a "
        f"vocab.Vocabulary with dicts, ints and strings")


def load_authors_vocab(path: str):
  """The authors' pickled `Vocabulary` as our `data.tokenize.Vocabulary`, ids unchanged."""
  from dsran_jax.data.tokenize import Vocabulary  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    try:
      # Their files are Python 2 pickles: byte strings are UTF-8 words.
      obj = _VocabUnpickler(f, encoding="utf-8").load()
    except pickle.UnpicklingError as e:
      raise ValueError(f"{path}: {e}") from None
  word2idx = getattr(obj, "word2idx", None)
  if not isinstance(obj, _AuthorsVocabulary) or not isinstance(word2idx, dict):
    raise ValueError(f"{path}: not an authors' vocabulary (a Vocabulary with word2idx)")
  words = [None] * len(word2idx)
  for word, idx in word2idx.items():
    if not isinstance(idx, int) or not 0 <= idx < len(words) or words[idx] is not None:
      raise ValueError(f"{path}: word ids are not 0..{len(words) - 1}, each once "
                       f"(word {word!r} has id {idx!r})")
    words[idx] = word
  return Vocabulary(words)


def load_vocab(path: str):
  """A GRU vocabulary from the authors' `.pkl` or our `vocab.json`."""
  from dsran_jax.data.tokenize import Vocabulary  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise FileNotFoundError(f"vocabulary not found: {path}")
  if path.endswith(".json"):
    return Vocabulary.load(path)
  return load_authors_vocab(path)


# ----------------------------------------------------------------------------- workdir

_BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_layers=12)


def make_config(overrides: Mapping[str, Any], info: Mapping[str, Any],
                bert_path: str = "", data_format: str = "vlp"):
  """The workdir config: base config + the inferred model + what `opt` tells us."""
  from dsran_jax.default_config import get_base_config  # pylint: disable=g-import-not-at-top
  c = get_base_config()
  m = c.model
  for key in ("text_encoder", "embed_size", "K", "img_dim", "use_region_pos", "text_padding"):
    m[key] = overrides[key]
  c.data.img_dim = overrides["img_dim"]
  c.data.format = data_format
  opt = info.get("opt") or {}
  name = str(opt.get("data_name", ""))
  if "coco" in name:
    c.data.name, c.eval.protocol = "coco", "coco"
  if overrides["text_encoder"] == "bert":
    b = overrides["bert"]
    m.pos_dim = overrides["pos_dim"]
    m.bert_random_init = True  # shape from model.bert.*, weights from the checkpoint
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                "max_position", "type_vocab_size"):
      m.bert[key] = getattr(b, key)
    if not bert_path and all(getattr(b, k) == v for k, v in _BERT_BASE.items()):
      bert_path = "bert-base-uncased"  # the authors' uncased_L-12_H-768_A-12
    m.bert_path = bert_path
    c.data.max_len = 32  # their ids are cut / zero-padded to 32
    c.train.optimizer = "bertadam"
  else:
    m.vocab_size, m.word_dim = overrides["vocab_size"], overrides["word_dim"]
    c.train.optimizer = "adam"
    c.train.warmup = 0.0
    if "grad_clip" in opt:
      c.train.grad_clip = float(opt["grad_clip"])
  # Their recipe, for fine-tuning from here; eval.batch_size also fixes the GRU build's
  # reference padding (each eval batch is padded to its longest caption).
  recipe = {"batch_size": ("train", "batch_size", int),
            "learning_rate": ("train", "learning_rate", float),
            "num_epochs": ("train", "num_epochs", int), "lr_update": ("train", "lr_update", int),
            "margin": ("train", "margin", float)}
  for src, (section, key, cast) in recipe.items():
    if src in opt:
      c[section][key] = cast(opt[src])
  if "batch_size" in opt:
    c.eval.batch_size = int(opt["batch_size"])
  return c


def convert_checkpoint(checkpoint: str, workdir: str, bert_path: str = "",
                       bert_heads: Optional[int] = None, vocab: str = "",
                       data_format: str = "vlp") -> Dict[str, Any]:
  """Converts `checkpoint` into `workdir` (config.json, checkpoints/best, vocab.json).

  Returns a summary dict (build, K, embed_size, step, ...), also printed by the CLI.
  """
  from dsran_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from dsran_jax.default_config import save_workdir_config  # pylint: disable=g-import-not-at-top
  if data_format not in ("vlp", "precomp"):
    raise ValueError(f"--data_format={data_format!r}: expected 'vlp' or 'precomp'")
  state_dict, info = load_checkpoint(checkpoint)
  heads = bert_heads
  if heads is None and bert_path:
    heads = _heads_from_bert_dir(bert_path, state_dict)
  if heads is None:
    # Their --bert_path names Google's release directory, e.g. uncased_L-12_H-768_A-12.
    m = re.search(r"_A-(\d+)", str((info.get("opt") or {}).get("bert_path", "")))
    heads = int(m.group(1)) if m else None
  variables, overrides = convert_state_dict(state_dict, bert_heads=heads)
  if overrides["text_encoder"] == "gru" and vocab:
    voc = load_vocab(vocab)
    if len(voc) != overrides["vocab_size"]:
      raise ValueError(f"{vocab} has {len(voc)} words but the checkpoint's word embedding "
                       f"txt_enc.embed.weight has {overrides['vocab_size']} rows")
  elif vocab:
    raise ValueError("--vocab is for the GRU build; the BERT build's tokenizer comes from "
                     "--bert_path")
  config = make_config(overrides, info, bert_path, data_format)
  os.makedirs(workdir, exist_ok=True)
  save_workdir_config(config, workdir)
  if overrides["text_encoder"] == "gru" and vocab:
    voc.save(os.path.join(workdir, "vocab.json"))
  step = int(info.get("Eiters") or info.get("epoch") or 0)
  best_rsum = info.get("best_rsum")
  meta = {"step": step, "source_checkpoint": os.path.abspath(checkpoint),
          "epoch": info.get("epoch"), "Eiters": info.get("Eiters"),
          "best_rsum": None if best_rsum is None else float(best_rsum),
          "rsum": None if best_rsum is None else float(best_rsum),
          "converted_by": "dsran_jax.tools.convert_torch"}
  checkpointing.save(workdir, checkpointing.BEST, step, variables, meta)
  summary = {"workdir": os.path.abspath(workdir), "build": overrides["text_encoder"],
             "K": overrides["K"], "embed_size": overrides["embed_size"],
             "img_dim": overrides["img_dim"], "step": step, "epoch": info.get("epoch"),
             "best_rsum": meta["best_rsum"]}
  if overrides["text_encoder"] == "bert":
    summary["bert"] = {k: getattr(overrides["bert"], k) for k in
                       ("hidden_size", "num_layers", "num_heads", "intermediate_size")}
    summary["bert_path"] = config.model.bert_path
  else:
    summary["vocab_size"] = overrides["vocab_size"]
    summary["vocab_json"] = bool(vocab)
  return summary


def _heads_from_bert_dir(bert_path: str, state_dict) -> Optional[int]:
  """num_attention_heads from a local BERT directory's config.json if its width matches."""
  import json  # pylint: disable=g-import-not-at-top
  cfg = os.path.join(os.path.expanduser(bert_path), "config.json")
  if not os.path.isfile(cfg):
    return None
  with open(cfg, encoding="utf-8") as f:
    d = json.load(f)
  words = strip_data_parallel(state_dict).get("txt_enc.bert.embeddings.word_embeddings.weight")
  if words is None or d.get("hidden_size") != tuple(words.shape)[1]:
    return None
  return d.get("num_attention_heads")


def _define_flags():
  # Defined only when run as a program, so importing this module never clashes with
  # another module's --workdir.
  flags.DEFINE_string("checkpoint", None, "The authors' model_best.pth.tar.")
  flags.DEFINE_string("workdir", None, "Output dsran_jax workdir.")
  flags.DEFINE_string("bert_path", "", "BERT directory or hub name for the tokenizer "
                      "(default bert-base-uncased for a BERT-base checkpoint).")
  flags.DEFINE_integer("bert_heads", None, "BERT attention heads (default: --bert_path's "
                       "config.json, else the checkpoint's opt.bert_path, else hidden / 64).")
  flags.DEFINE_string("vocab", "", "GRU build: the authors' vocab .pkl or a vocab.json.")
  flags.DEFINE_enum("data_format", "vlp", ["vlp", "precomp"], "data.format of the workdir.")


def main(argv: Sequence[str]) -> None:
  """CLI entry point: converts, then prints a JSON summary."""
  del argv
  import json  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if not f.checkpoint or not f.workdir:
    raise app.UsageError("--checkpoint and --workdir are required")
  summary = convert_checkpoint(f.checkpoint, f.workdir, bert_path=f.bert_path,
                               bert_heads=f.bert_heads, vocab=f.vocab,
                               data_format=f.data_format)
  if summary["build"] == "gru" and not summary["vocab_json"]:
    print("note: no --vocab given; encode_texts(texts=...) will need "
          f"{os.path.join(f.workdir, 'vocab.json')} (convert with --vocab=...pkl)")
  if summary["build"] == "bert" and not summary["bert_path"]:
    print("note: no --bert_path given; encode_texts(texts=...) needs model.bert_path (a BERT "
          "directory with vocab.txt) set in config.json")
  print(json.dumps(summary))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
