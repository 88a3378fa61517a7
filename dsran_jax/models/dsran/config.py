"""DSRAN's config hooks (jax-free). Its options live under `config.model.dsran`
(`K`, `text_encoder`, `image_inputs`, ..., the BERT build's `bert_path`,
`bert_random_init` and `bert.*`), declared once in `OPTIONS` below, from which the
section's defaults, `validate` and the Module's `DSRANConfig` come. Shared widths are the
top-level `model.embed_size`, `model.img_dim` (regions and grid), `model.word_dim`,
`model.vocab_size` and `model.glove_path` (GRU build), and `model.dtype`. `migrate`
moves the top-level keys of a config.json written before the section existed into it.
The model's specification: docs/models/dsran.md."""
from dsran_jax.hub import minilm_dir
from dsran_jax.models.common import recipes
from dsran_jax.models.common.options import (Option, Options, at_least, bert_options,
                                              integer_at_least, one_of, within)

IMAGE_INPUTS = ("grid+regions", "regions", "image+regions")
ONLINE = "image+regions"


def positive_ints(value):
  """A non-empty tuple of positive integers."""
  ok = (isinstance(value, (tuple, list)) and len(value) > 0
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))
  return None if ok else "must be a non-empty tuple of positive integers"


# The authors' README recipes: (epochs, batch, lr_update epoch, K) per dataset and build.
RECIPES = {
    ("f30k", "bert"): (12, 128, 6, 2),
    ("coco", "bert"): (18, 320, 9, 4),
    ("f30k", "gru"): (16, 128, 8, 2),
    ("coco", "gru"): (18, 300, 9, 2),
}


OPTIONS = Options("dsran", [
    Option("K", 2, one_of(1, 2, 4), "JSR branches"),
    Option("text_encoder", "bert", one_of("bert", "gru"), "the build: BERT or GRU"),
    Option("image_inputs", "grid+regions", one_of(*IMAGE_INPUTS),
           '"grid+regions": precomputed 7x7 grids and the regions; "image+regions": the '
           "frozen ResNet run in the step on raw images (the authors' online grid); "
           '"regions": the regions alone'),
    Option("pos_dim", 1607, at_least(1),
           "width of the region positions + class scores (6 box + 1601 class probs)"),
    Option("use_region_pos", True, None,
           "BERT build: the region_pos MLP branch (the GRU build has none)"),
    Option("gat_heads", 8, at_least(1), "GAT attention heads"),
    Option("gat_dropout", 0.2, within(0.0, 1.0, high_open=True), "GAT dropout rate"),
    Option("gat_layers", 1, at_least(0), "GAT layers"),
    Option("text_padding", "masked", one_of("masked", "reference"),
           '"masked" | "reference" (the authors\' padding, for converted checkpoints)'),
    # The online grid (image_inputs="image+regions"): the frozen ResNet's shape, its
    # input crop, and where its weights come from.
    Option("cnn_depths", (3, 8, 36, 3), positive_ints,
           "online grid: bottleneck blocks per ResNet stage (ResNet-152)"),
    Option("cnn_widths", (64, 128, 256, 512), positive_ints,
           "online grid: bottleneck widths per stage (the stem is the first; the grid has "
           "4 x the last channels, = model.img_dim)"),
    Option("crop_size", 224, integer_at_least(32),
           "online grid: the CNN's input side (their opt.crop_size): RandomResizedCrop "
           "in training, the centre crop at evaluation"),
    Option("resize_size", 256, integer_at_least(32),
           "online grid: evaluation resizes the shorter side to this, then centre-crops",
           field=False),
    Option("cnn_weights", "", None,
           "online grid: the ResNet's torchvision state dict (.safetensors / .pth), e.g. "
           "torchvision's resnet152-b121ed2d.pth or a converted workdir's "
           "resnet152.safetensors", field=False),
    Option("cnn_random_init", False, None,
           "online grid: a randomly initialised frozen ResNet (tests and the demo only)",
           field=False),
] + bert_options())
defaults = OPTIONS.defaults

# DSRAN's keys that a config.json written before `model.dsran` existed holds at the top
# level of `model` (`migrate`): the section's own keys, `bert` a sub-section.
_MOVED = OPTIONS.keys


def migrate(saved: dict) -> dict:
  """A saved config dict (config.json) in today's layout: DSRAN's old top-level
  `model.*` keys (`model.K`, `model.text_encoder`, `model.bert.*`, ...) moved under
  `model.dsran` when the model is DSRAN (`model.name` "dsran" or absent). Another
  family never read them: those at their default are dropped, any other value is kept
  under `model.dsran` (nothing is lost). A no-op on a migrated config."""
  model = saved.get("model") if isinstance(saved, dict) else None
  if not isinstance(model, dict) or not any(k in model for k in _MOVED):
    return saved
  model = dict(model)
  old = {k: model.pop(k) for k in _MOVED if k in model}
  if model.get("name", "dsran") != "dsran":
    default = OPTIONS.defaults().to_dict()
    old = {k: v for k, v in old.items() if v != default[k]}
  if old:
    section = dict(model.get("dsran") or {})
    for key, value in old.items():
      if key == "bert" and isinstance(value, dict):
        value = {**value, **(section.get("bert") or {})}
      section.setdefault(key, value)
    model["dsran"] = section
  return {**saved, "model": model}


def bert_path(model_config) -> str:
  """The BERT directory (or hub name) of the BERT build; "" for the GRU build."""
  s = model_config.dsran
  return s.bert_path if s.text_encoder == "bert" else ""


def input_hint(model_config, key: str) -> str:
  """How to do without batch key `key` ("" when there is no way)."""
  del model_config
  if key == "grid":
    return ("set --config.model.dsran.image_inputs=regions to read the regions only, or "
            "image+regions to run the CNN on raw images (data.image_dir)")
  if key == "image":
    return ("set data.image_dir to the raw images, or --config.model.dsran.image_inputs="
            "grid+regions to read precomputed grids")
  return ""


def _section(model_config):
  """`model.dsran` of `config.model`, or the Module's DSRANConfig (the same options)."""
  return getattr(model_config, "dsran", model_config)


def image_keys(model_config):
  """`model_config`: `config.model`, or the Module's DSRANConfig (the same options)."""
  keys = ("regions", "region_pos", "region_mask")
  inputs = _section(model_config).image_inputs
  if inputs == "grid+regions":
    return ("grid",) + keys
  if inputs == ONLINE:
    return ("image",) + keys
  return keys


def online_grid(model_config) -> bool:
  """Whether the model runs its frozen ResNet on raw images (`image_inputs`
  "image+regions")."""
  return _section(model_config).image_inputs == ONLINE


def image_views(model_config):
  """`(crop, resize)` of the raw-image views the online grid reads (the data pipeline's
  RandomResizedCrop(crop) + flip in training, Resize(resize) + CenterCrop(crop) at
  evaluation); None when the model reads no raw images."""
  if not online_grid(model_config):
    return None
  s = _section(model_config)
  return int(s.crop_size), int(s.resize_size)


def text_keys(model_config):
  del model_config
  return ("input_ids", "attention_mask")


def tokenizer(model_config):
  """"bert" (WordPiece from `model.dsran.bert_path`) or "vocab" (GRU build)."""
  return "bert" if _section(model_config).text_encoder == "bert" else "vocab"


def caption_cap(model_config) -> int:
  """The authors' cut (`data.max_len=-1`): the BERT build's loader (data_bert.py) cuts
  ids at 32, [SEP] included; the GRU build's pads each batch to its longest caption."""
  return 32 if _section(model_config).text_encoder == "bert" else 0


def pads_to_cap(model_config) -> bool:
  """Reference padding of the BERT build: ids zero-padded to exactly the cut and every
  position attended, as their loader and model do."""
  s = _section(model_config)
  return s.text_encoder == "bert" and s.text_padding == "reference"


# The online grid's ResNet: frozen, as the authors' (`requires_grad = False` unless
# --finetune / --ft_res); its BatchNorm statistics still move (train mode).
CNN_PATHS = (r"^cnn/",)


def frozen_paths(model_config):
  return CNN_PATHS if online_grid(model_config) else ()


def eval_tile(model_config):
  del model_config
  return (1000, 5000)  # a dot product: whole Flickr30K test in one tile


GRIDS = ("precomputed", "online")


def _grid(c, grid: str):
  """`grid="online"`: the authors' online grid branch (raw images, frozen ResNet-152 in
  the step); "precomputed": grids extracted once (the default, for speed)."""
  if grid not in GRIDS:
    raise ValueError(f"grid={grid!r}: expected one of {', '.join(GRIDS)}")
  if grid == "online":
    c.model.dsran.image_inputs = ONLINE


def recipe(c, dataset: str, text_encoder: str = "bert", grid: str = "precomputed"):
  """The authors' recipe on their VLP features (BERT: BertAdam 2e-5 with warmup 0.1;
  GRU: Adam 2e-4, global-norm clip 2.0, no region_pos, word embeddings from GloVe
  840B: set `model.glove_path`, else the run reports the departure), model selection on
  VSE++'s dev (Flickr30K: all 1014 val images; COCO: the first 1000), and for the GRU
  build VSE++'s vocabulary of every caption of the dataset (their f30k_vocab.pkl /
  coco_vocab.pkl). `grid="online"` runs the frozen ResNet-152 on raw images in the step
  as they do (set data.image_dir and model.dsran.cnn_weights); "precomputed" reads
  `{split}_grid.npy`."""
  _grid(c, grid)
  epochs, batch, lr_update, k = RECIPES[(dataset, text_encoder)]
  d = c.model.dsran
  c.data.num_regions = 100
  c.eval.max_dev_images = recipes.vsepp_dev_images(dataset)
  d.text_encoder = text_encoder
  d.K = k
  c.train.batch_size = batch
  c.train.num_epochs = epochs
  c.train.lr_update = lr_update
  if text_encoder == "bert":
    d.bert_path = "bert-base-uncased"
    c.train.optimizer, c.train.learning_rate, c.train.warmup = "bertadam", 2e-5, 0.1
  else:
    d.use_region_pos = False
    c.train.optimizer, c.train.learning_rate, c.train.warmup = "adam", 2e-4, 0.0
    c.train.grad_clip = 2.0
    c.data.vocab_splits = "all"
  return c


def departures(c):
  """Where a run of `c` departs from the authors' recipe (`models.departures`): the GRU
  build's word embeddings without GloVe (model.py always loads glove.840B.300d)."""
  if c.model.dsran.text_encoder != "gru":
    return []
  return recipes.glove_departure(c, "N(0, 1)")


def demo(c, grid: str = "precomputed"):
  """Frozen MiniLM BERT build, K=2, 256-wide: 3 epochs of 1000 synthetic images.
  `grid="online"`: the synthetic world's rendered images through a small random frozen
  ResNet (64-pixel crops, 2x2 grid) in the step, so the online path runs on 2 cores."""
  _grid(c, grid)
  d = c.model.dsran
  if grid == "online":
    # A ResNet of one block per stage, 8..64 wide (256 grid channels), on 64-pixel
    # crops of 96-pixel-high renders: the path of the real recipe at a CPU's scale.
    d.cnn_depths, d.cnn_widths = (1, 1, 1, 1), (8, 16, 32, 64)
    d.crop_size, d.resize_size = 64, 73  # 224 / 256 scaled
    d.cnn_random_init = True
    c.data.img_dim = c.model.img_dim = 256  # regions as wide as the grid
  d.text_encoder = "bert"
  d.bert_path = minilm_dir()
  c.model.embed_size = 256
  d.K = 2
  c.train.batch_size = 64
  c.train.num_epochs = 3
  c.train.lr_update = 10  # BertAdam's warmup-linear decay does the annealing
  c.train.learning_rate = 2e-4
  c.train.optimizer = "bertadam"
  c.train.warmup = 0.05
  # Frozen MiniLM: forward only, so a step fits a 2-core CPU; the text GAT and projection
  # learn on top of it.
  c.train.freeze_bert = True
  return c


def validate(c):
  """Raises ValueError naming the first DSRAN key out of range (the shared widths
  included), or a rule over several keys broken."""
  OPTIONS.validate(c.model)
  recipes.validate_widths(c)
  m, d = c.model, c.model.dsran
  if m.embed_size % d.gat_heads:
    raise ValueError(f"config.model.embed_size={m.embed_size} must be divisible by "
                     f"config.model.dsran.gat_heads={d.gat_heads}")
  b = d.bert
  if b.hidden_size % b.num_heads:
    raise ValueError(f"config.model.dsran.bert.hidden_size={b.hidden_size} must be "
                     f"divisible by config.model.dsran.bert.num_heads={b.num_heads}")
  cap = int(c.data.max_len) if c.data.max_len >= 0 else caption_cap(c.model)
  if pads_to_cap(c.model) and cap == 0:
    raise ValueError("config.data.max_len=0: the BERT build's reference padding pads every "
                     "caption to the cut (the authors' 32); set data.max_len=-1 or a cut")
  if d.text_encoder == "bert" and d.bert_random_init and not 0 < cap <= b.max_position:
    raise ValueError(f"config.data.max_len={c.data.max_len} (a cut of {cap or 'none'}) "
                     f"must be within config.model.dsran.bert.max_position={b.max_position}, "
                     f"the positions of the random-init BERT")
  if online_grid(m):
    _validate_online(c)


def _validate_online(c):
  """The online grid's keys: the CNN's shape against model.img_dim, the views, and
  where the weights and images come from."""
  m, d = c.model, c.model.dsran
  if len(d.cnn_depths) != len(d.cnn_widths):
    raise ValueError(f"config.model.dsran.cnn_depths={tuple(d.cnn_depths)} and cnn_widths="
                     f"{tuple(d.cnn_widths)}: one depth and one width per stage")
  channels = 4 * d.cnn_widths[-1]  # the bottleneck's expansion
  if m.img_dim != channels:
    raise ValueError(f"config.model.img_dim={m.img_dim}: the online grid's ResNet "
                     f"(cnn_widths={tuple(d.cnn_widths)}) gives {channels} channels")
  if d.resize_size < d.crop_size:
    raise ValueError(f"config.model.dsran.resize_size={d.resize_size} is smaller than "
                     f"crop_size={d.crop_size}: the centre crop would not fit")
  if not d.cnn_weights and not d.cnn_random_init:
    raise ValueError("config.model.dsran.cnn_weights='': the online grid needs the ResNet's "
                     "weights (torchvision's resnet152-b121ed2d.pth as the authors, or a "
                     "converted workdir's resnet152.safetensors), or cnn_random_init=True")
  if c.data.format != "synthetic" and not c.data.image_dir:
    raise ValueError("config.data.image_dir='': the online grid reads raw images; set it to "
                     "the directory holding them (found by file stem, recursively)")
