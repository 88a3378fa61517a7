"""Every config key, declared once: its default, its rule and what it means (`KEYS`).

`get_base_config()` builds the ConfigDict of every key from `KEYS` (plus each model
family's own section, `config.model.<family>`, which the family declares in
`dsran_jax/models/<family>/config.py`); `validation.validate_config` checks each value
with the same table's rules. Every file in `configs/` starts from `get_base_config()` and
overrides what its recipe needs, so a key declared here exists in every config and
`--config.a.b=v` overrides are checked against it (configs are locked: a mistyped key is
an error). A key declared twice is an error when this module is imported.

A rule is a function of the value returning None (valid) or what is wrong with it
("must be an integer >= 1"); `validation` prefixes the key and the value:

    config.train.checkpoint_every=0: must be an integer >= 1

The top-level `config.model.*` keys are those the families share (the family's name,
the compute dtype and the widths of the word-vocabulary families); their ranges are
checked by each family's `validate`, so their rules here check the type only. Every
option of one family, DSRAN's included, lives in its `config.model.<family>` section.
"""
import dataclasses
import inspect
import math
import numbers
import re
from typing import Any, Callable, Dict, Iterable, List, Optional

import ml_collections

from dsran_jax import models
from dsran_jax.core.training import parse_milestones


class ConfigError(ValueError):
  """One or more config values are out of range, or a key is unknown; `problems` lists
  each (one line naming the key, its value and what is allowed)."""

  def __init__(self, problems, header: str = "invalid config (nothing was run)"):
    if isinstance(problems, str):
      problems = [problems]
    self.problems: List[str] = [str(p) for p in problems]
    self.header = header
    super().__init__(f"{header}:\n  " + "\n  ".join(self.problems) if header
                     else "\n".join(self.problems))

  def one_line(self) -> str:
    """Every problem on one line (for a command line's error message)."""
    return "; ".join(" ".join(p.split()) for p in self.problems)


# ------------------------------------------------------------------------------ rules

Rule = Callable[[Any], Optional[str]]


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def Int(lo: Optional[int] = None, hi: Optional[int] = None, note: str = "") -> Rule:
  """An integer in [lo, hi] (no bound where None)."""
  if lo is None and hi is None:
    rng = ""
  elif hi is None:
    rng = f" >= {lo}"
  elif lo is None:
    rng = f" <= {hi}"
  else:
    rng = f" in [{lo}, {hi}]"

  def check(v):
    if (not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi)):
      return f"must be an integer{rng}{note}"
  return check


def Real(lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False,
         hi_open: bool = False, allow_inf: bool = False, note: str = "") -> Rule:
  """A number in the interval, finite unless `allow_inf`."""
  unbounded = lo == -math.inf and hi == math.inf
  rng = ("" if unbounded else
         f" in {'(' if lo_open or lo == -math.inf else '['}{lo}, "
         f"{hi}{')' if hi_open or hi == math.inf else ']'}")

  def check(v):
    ok = _is_real(v) and not math.isnan(v) and (allow_inf or math.isfinite(v))
    ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
      return f"must be a {'' if allow_inf else 'finite '}number{rng}{note}"
  return check


def Choice(*values) -> Rule:
  """One of `values`."""
  def check(v):
    if v not in values:
      return f"expected one of {', '.join(repr(x) for x in values)}"
  return check


def Str(nonempty: bool = False, note: str = "") -> Rule:
  """A string (non-empty if asked)."""
  def check(v):
    if not isinstance(v, str) or (nonempty and not v.strip()):
      return f"must be a {'non-empty ' if nonempty else ''}string{note}"
  return check


def Bool() -> Rule:
  """True or False."""
  def check(v):
    if not isinstance(v, bool):
      return "must be True or False"
  return check


def Regexes() -> Rule:
  """A string of comma-separated regular expressions."""
  def check(v):
    if not isinstance(v, str):
      return "must be a string of comma-separated regular expressions"
    for p in (p.strip() for p in v.split(",")):
      if p:
        try:
          re.compile(p)
        except re.error as e:
          return f"{p!r} is not a regular expression ({e})"
  return check


def Milestones() -> Rule:
  """A string of comma-separated epochs >= 1, increasing ("" for none)."""
  def check(v):
    try:
      parse_milestones(v)
    except ValueError as e:
      return str(e)
  return check


def _caption_cap_rule(v) -> Optional[str]:
  """`data.max_len`: -1 (the family's rule), 0 (whole captions) or a cut in [3, 4096]
  (a caption keeps at least its two end tokens)."""
  if not _is_int(v) or not (v in (-1, 0) or 3 <= v <= 4096):
    return ("must be -1 (the family's rule), 0 (whole captions) or an integer in "
            "[3, 4096] (the cut, in tokens)")


# ------------------------------------------------------------------------ declarations


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key: its dotted name ("train.log_every"), default, rule and meaning."""
  name: str
  default: Any
  rule: Rule
  doc: str


def declare(keys: Iterable[Key]) -> Dict[str, Key]:
  """{name: Key} of `keys`, in order; a name declared twice, or both a key and a section
  ("a.b" and "a.b.c"), is a ValueError naming it."""
  table: Dict[str, Key] = {}
  for key in keys:
    if key.name in table:
      raise ValueError(f"config key {key.name!r} is declared twice (defaults "
                       f"{table[key.name].default!r} and {key.default!r}): declare each "
                       f"key once")
    parts = key.name.split(".")
    for i in range(1, len(parts)):
      if ".".join(parts[:i]) in table:
        raise ValueError(f"config key {key.name!r} is inside {'.'.join(parts[:i])!r}, "
                         f"which is declared as a key, not a section")
    if any(other.startswith(key.name + ".") for other in table):
      raise ValueError(f"config key {key.name!r} is declared as a key but is already a "
                       f"section")
    if key.rule(key.default) is not None:
      raise ValueError(f"config key {key.name!r}: its default {key.default!r} breaks its "
                       f"own rule ({key.rule(key.default)})")
    table[key.name] = key
  return table


VLP_SPLITS = ("train", "dev", "test", "testall")
DATASETS = ("f30k", "coco")
# The shared model widths: the range is checked by the family (see the module docstring).
_FAMILY = " (range checked by the model family)"

KEYS: Dict[str, Key] = declare([
    # data: where the dataset is and how it is read
    Key("data.format", "vlp",
        Str(nonempty=True, note=" (a format of dsran_jax/data/formats.py)"),
        "the reader: 'synthetic' | 'precomp' | 'vlp' (the formats registered in "
        "dsran_jax/data/formats.py, which checks the name)"),
    Key("data.name", "f30k", Str(nonempty=True, note=" (vlp: 'f30k' or 'coco')"),
        "'f30k' | 'coco': selects file layout and protocol"),
    Key("data.root", "", Str(note=" (required for precomp and vlp)"),
        "dataset directory (see README, 'Data layouts')"),
    Key("data.tfds_dir", "", Str(),
        "if set, read splits packed by dsran_jax.data.tfds_builder"),
    Key("data.train_split", "train", Str(nonempty=True), "split trained on"),
    Key("data.dev_split", "dev", Str(nonempty=True), "split of the dev evaluations"),
    Key("data.test_split", "test", Str(nonempty=True),
        "split of the test evaluation ('testall' for COCO 5K with precomp)"),
    Key("data.max_len", -1, _caption_cap_rule,
        "the caption cut, in tokens ([CLS]/[SEP] or <start>/<end> included): -1 follows "
        "the authors of the family (DSRAN's BERT build cuts at 32, every word-vocabulary "
        "family keeps captions whole), 0 keeps every caption whole, n > 0 cuts at n "
        "(reported when it cuts). docs/protocol.md, 'Caption lengths'"),
    Key("data.caption_bucket", 8, Int(1),
        "captions of a batch are padded to the smallest multiple of this holding its "
        "longest caption (bounded jit shapes: one compile per multiple reached)"),
    Key("data.shuffle_buffer", 0, Int(0, note=" (0: full shuffle)"),
        "0: full shuffle of caption indices (cheap: indices only)"),
    Key("data.prefetch", 2, Int(0), "batches prepared ahead"),
    Key("data.num_regions", 100, Int(1),
        "regions per image (padded/cut with a region mask)"),
    Key("data.img_dim", 2048, Int(1), "width of the image features"),
    Key("data.grid_file", "", Str(), "grid features; default {root}/{split}_grid.npy"),
    Key("data.global_file", "", Str(note=" (default {root}/{split}_global.npy)"),
        "pooled ResNet features; default {root}/{split}_global.npy"),
    Key("data.vocab_file", "", Str(), "GRU vocabulary JSON; default {workdir}/vocab.json"),
    Key("data.vocab_splits", "train", Choice("train", "train+dev", "all"),
        "captions a new word vocabulary counts: data.train_split, + data.dev_split, or "
        "those and data.test_split ('all'); the recipes set their authors'"),
    Key("data.image_dir", "", Str(),
        "raw images of a model that runs its CNN in the step (DSRAN's online grid): a "
        "directory searched recursively, an image found by its id as file stem"),
    # the synthetic world (data.format == "synthetic")
    Key("data.synthetic.seed", 0, Int(0, 2**32 - 1), "seed of the synthetic world"),
    Key("data.synthetic.num_train_images", 2000, Int(1), "synthetic train images"),
    Key("data.synthetic.num_dev_images", 200, Int(1), "synthetic dev images"),
    Key("data.synthetic.num_test_images", 200, Int(1), "synthetic test images"),
    Key("data.synthetic.num_regions", 12, Int(1), "regions of a synthetic image"),

    # model: the family, and the keys the families share
    Key("model.name", "dsran", Str(nonempty=True),
        "model family (dsran_jax/models/<name>/)"),
    Key("model.embed_size", 1024, Int(note=_FAMILY), "joint embedding width"),
    Key("model.img_dim", 2048, Int(note=_FAMILY),
        "width of the region (and grid) features"),
    Key("model.dtype", "float32", Choice("float32", "bfloat16"),
        "compute dtype (params and BatchNorm/softmax/loss stay fp32)"),
    Key("model.bf16_on_cpu", "auto", Choice("auto", "always"),
        "bfloat16 on a CPU: auto = only where it runs natively (AMX, AVX512-BF16 on "
        "AMD), else float32 (core/precision.py); always = bf16 anyway"),
    # word-vocabulary families (DSRAN's GRU build, SCAN, SGRAF, ...)
    Key("model.word_dim", 300, Int(note=_FAMILY), "word-embedding width"),
    Key("model.vocab_size", 0, Int(note=_FAMILY), "0: size of the built vocabulary"),
    Key("model.glove_path", "", Str(), "optional GloVe text file for word-embedding init"),

    # train
    Key("train.batch_size", 128, Int(1), "pairs per step (all devices)"),
    Key("train.num_epochs", 12, Int(0, note=" (used when train.num_steps is 0)"),
        "epochs (when train.num_steps is 0)"),
    Key("train.num_steps", 0, Int(0, note=" (0: train.num_epochs epochs)"),
        ">0 overrides num_epochs"),
    Key("train.log_every", 100, Int(1), "steps between log lines"),
    Key("train.eval_every", 0, Int(0, note=" (0: once per epoch)"),
        "steps between dev evaluations; 0: once per epoch"),
    Key("train.checkpoint_every", 1000, Int(1), "steps between 'latest' checkpoints"),
    Key("train.checkpoint_every_s", 600.0,
        Real(0, allow_inf=True, note=" (seconds; 0: after every step; inf: by steps only)"),
        "... and at most this many seconds between them"),
    Key("train.seed", 0, Int(0, 2**32 - 1), "seed of initialisation, order and dropout"),
    Key("train.optimizer", "bertadam", Choice("bertadam", "adam", "adamw"),
        "'bertadam' (authors' BERT build) | 'adam' (GRU build) | 'adamw' (VSE∞)"),
    Key("train.weight_decay", 0.0, Real(0), "'adamw': decoupled weight decay (x lr)"),
    Key("train.learning_rate", 2e-5, Real(0, lo_open=True), "peak learning rate"),
    Key("train.lr_update", 6, Int(1, note=" (epochs between x0.1 decays; a large value "
                                          "disables them)"),
        "epochs between x0.1 decays"),
    Key("train.lr_milestones", "", Milestones(),
        "comma-separated epochs at which the lr falls x0.1 (e.g. '15,25'); '' (the "
        "default): every train.lr_update epochs"),
    Key("train.warmup", 0.1, Real(0, 1, hi_open=True, note=" (fraction of the steps)"),
        "fraction of total steps, linear warmup (BertAdam); 0: none"),
    Key("train.grad_clip", 0.0, Real(0, note=" (0: no clipping)"),
        "global-norm clip; 0: none (BertAdam clips per tensor at 1.0)"),
    Key("train.bert_lr_scale", 1.0, Real(0), "lr multiplier for BERT weights"),
    Key("train.freeze_bert", False, Bool(), "True: BERT weights are not trained"),
    Key("train.freeze", "", Regexes(),
        "comma-separated regexes of parameter paths never trained (added to the "
        "family's own frozen layers)"),
    Key("train.margin", 0.2, Real(0), "triplet loss margin"),
    Key("train.departures", "", Str(),
        "written by training, never read: where the run departs from the authors' "
        "recipe (e.g. no GloVe file), as logged at its start"),
    Key("train.max_violation", True, Bool(), "hardest negatives (VSE++)"),
    Key("train.sum_violation_steps", 0, Int(0),
        "VSE++ warm-up: sum of violations for this many steps"),

    # eval
    Key("eval.batch_size", 256, Int(1), "items encoded per batch"),
    Key("eval.protocol", "1k", Choice("1k", "coco"),
        "'1k' (Flickr30K) | 'coco' (5K and 5-fold 1K)"),
    Key("eval.max_dev_images", 0, Int(0, note=" (0: every dev image)"),
        "dev images of model selection: the first N (SCAN/SGRAF and COCO: 1000, i.e. "
        "5000 captions); 0: all (Flickr30K's 1014 for DSRAN and MLASM)"),
    Key("eval.save_sims", False, Bool(), "also save the test sims matrix"),
    Key("eval.chunk_size", 1000, Int(1), "images per block of the sims matrix when ranking"),
    Key("eval.tile_images", 0, Int(0, note=" (0: the family's default)"),
        "scoring tile (images x captions); 0: family default"),
    Key("eval.tile_captions", 0, Int(0, note=" (0: the family's default)"),
        "scoring tile's captions; 0: family default"),
    # Two-stage evaluation: the embedding model of this workdir ranks everything, this
    # model re-scores each query's top shortlist_k (both directions).
    Key("eval.shortlist_workdir", "",
        Str(note=" (a workdir of an embedding model; '': full evaluation)"),
        "'': every pair scored (full evaluation)"),
    Key("eval.shortlist_k", 50, Int(1, note=" (candidates re-scored per query)"),
        "candidates per query (captions for i2t, images for t2i)"),
    Key("eval.shortlist_fusion", 0.0, Real(0, 1, note=" (weight of the first stage's score)"),
        "w: short list ordered by (1 - w) * this + w * first stage"),
    # ECCV Caption / CxC on COCO 5K (dsran_jax/evaluation/eccv.py, the eccv extra)
    Key("eval.eccv", False, Bool(),
        "also ECCV Caption and CxC on the COCO 5K test split (pip install dsran_jax[eccv])"),
    Key("eval.eccv_ids", "", Str(note=" (one caption annotation id per caption row)"),
        "caption annotation ids of the test split; '': the reader's, else "
        "{data.root}/{split}_ids.txt"),
    Key("eval.eccv_pm_dir", "", Str(), "ECCV Caption's plausible-match files: adds pmrp"),
])


def _set(c: ml_collections.ConfigDict, name: str, value) -> None:
  *sections, leaf = name.split(".")
  node = c
  for s in sections:
    if s not in node:
      node[s] = ml_collections.ConfigDict()
    node = node[s]
  node[leaf] = value


def get_base_config() -> ml_collections.ConfigDict:
  """Returns the default config: the authors' Flickr30K BERT recipe on VLP features."""
  c = ml_collections.ConfigDict()
  for key in KEYS.values():
    _set(c, key.name, key.default)
  # Every family's own options, defaults included, under config.model.<family>.
  for name in models.names():
    section = models.family_config(name).defaults()
    if section is not None:
      c.model[name] = section
  return c


def get_config() -> ml_collections.ConfigDict:
  """This file as a config file: main's default `--config`, which types the overrides
  of `--mode=eval`."""
  return get_base_config()


def parse_config_arg(arg: str):
  """`configs/<file>.py:ARG` -> (family, recipe kwargs): ARG is `family[,key=value...]`,
  e.g. `sgraf,module=SAF`, `scan,cross_attn=i2t,agg_func=LogSumExp`,
  `dsran,text_encoder=gru`; empty means DSRAN with the recipe's defaults."""
  family, *items = [part.strip() for part in (arg or "").split(",")]
  kwargs = {}
  for item in items:
    key, eq, value = item.partition("=")
    if not eq or not key:
      raise ValueError(f"config argument {arg!r}: {item!r} is not key=value "
                       "(expected family[,key=value...], e.g. sgraf,module=SAF)")
    kwargs[key] = value
  return family, kwargs


def call_recipe(fn, c, what: str, kwargs):
  """`fn(c, **kwargs)`, with an unknown keyword named against the recipe's own."""
  params = list(inspect.signature(fn).parameters)[1:]
  unknown = sorted(set(kwargs) - set(params))
  if unknown:
    accepted = [p for p in params if p != "dataset"]
    raise ValueError(f"{what} takes no {unknown}: its options are {accepted or 'none'}")
  return fn(c, **kwargs)


def recipe_config(dataset: str, family: str = "", **kwargs) -> ml_collections.ConfigDict:
  """The base config with family `family`'s authors' recipe for `dataset` ("f30k" or
  "coco"); an empty family means DSRAN. COCO tests on 5K + 5x1K.

  `family` may carry recipe options (`parse_config_arg`: "sgraf,module=SAF"); they and
  `kwargs` go to the family's `recipe` (DSRAN: "dsran,text_encoder=gru").
  """
  if dataset not in DATASETS:
    raise ValueError(f"dataset {dataset!r}: expected one of {DATASETS}")
  family, options = parse_config_arg(family)
  kwargs = {**options, **kwargs}
  c = get_base_config()
  c.model.name = family or models.DEFAULT
  c.data.format = "vlp"
  c.data.name = dataset
  if dataset == "coco":
    c.data.test_split = "testall"
    c.eval.protocol = "coco"
  return call_recipe(models.family_config(c.model.name).recipe, c,
                     f"the {c.model.name} recipe", {"dataset": dataset, **kwargs})


def authors_recipe(dataset: str, text_encoder: str) -> ml_collections.ConfigDict:
  """DSRAN's recipe for `dataset` and build ("bert" | "gru")."""
  return recipe_config(dataset, "dsran", text_encoder=text_encoder)
