"""A synthetic image-text world: learnable in minutes on a CPU, not solvable by shortcuts.

`read_raw_split(config, split_name)` (for `data.format == "synthetic"`) returns a
`raw.RawSplit` whose features look like the real inputs (grid (49, img_dim), regions
(R, img_dim), region_pos (R, 1607) from real-looking boxes and 1601-way class
distributions, region_mask) and whose captions are short lowercase English.

The world
---------
An image is a *scene* (beach, street, kitchen, ...) plus 2-4 *objects*, each with a class
(dog, bus, lamp, ...), a colour, a size and a cell of a 7x7 layout. Captions are
generated from that description; features are generated from it with noise:

* Regions carry object identity and attributes only: an object's region is
  `a_cls * (class + supercategory direction) + a_col * colour + a_size * size + noise`
  in fixed random img_dim-d directions. Detector imperfections: the class signal is
  sometimes mixed with a same-supercategory class (`class_confusion`), objects have part
  regions (wheel, head, ...) and there are scene-neutral background regions (shadow,
  reflection, ...). Regions never carry the scene.
* region_pos carries the box (the object's layout cell, jittered, sized by its size
  attribute and class aspect) and a noisy class distribution (the detector's top class is
  sometimes a wrong class of the same supercategory, `detector_error`).
* Grid cells carry the scene everywhere (a scene direction plus a sky/middle/ground band
  direction) and only weak evidence of the objects at the cells their boxes cover
  (`grid_object_evidence`), in directions unrelated to the region ones. So the scene is
  only in the grid branch, and positions are in region_pos and (weakly) in the grid.
* Hard negatives: consecutive images form *families* of `family_layouts x family_scenes`
  images (4 by default). With probability `family_fraction` a family's images share
  their objects and attributes exactly and differ only in the arrangement (layout variant
  k > 0 swaps two objects' positions, so their relation flips) and/or in the scene: only a
  model that reads spatial relations and the grid tells all members apart, a bag of
  regions sees one image four times. Other families are independent images.
* Captions (5 per image, at most ~19 wordpieces with [CLS]/[SEP]) name a subset of the
  objects with colour (and sometimes size), a spatial relation between two of them (left
  of / right of / above / below, "next to" for horizontal neighbours) derived from their
  cells, and the scene, with synonyms (puppy/dog, bike/bicycle, in the woods/in the
  forest, ...) and several templates ("a red dog to the left of a blue cat on the beach",
  "a kitchen with a white cup and a green vase", "there is a small bus above a car").

Everything is a pure function of (`data.synthetic.seed`, split name, image index): image
i of a split is the same whatever the split size, so a smaller split is a prefix of a
larger one. Layouts and captions (a few bytes per image) are built when the split is
read; features are generated on demand per index (64 images of width 2048 take ~30 ms),
so nothing large is held in memory (the fixed random directions and a noise bank: ~10 MB
at img_dim 2048).

Difficulty knobs (fields of `Difficulty`; pass `difficulty=` to `read_raw_split`)
--------------------------------------------------------------------------------
Composition: `min_objects`, `max_objects` (objects per image), `num_classes`,
`num_colours`, `num_scenes` (vocabulary in use, at most the lists below).
Hard negatives: `family_fraction` (fraction of families that are hard-negative
families), `family_layouts`, `family_scenes` (arrangements and scenes per family; family
size is their product; 1 switches that kind of hard negative off).
Captions: `p_caption_scene` (a caption names the scene), `p_caption_relation` (a caption
uses a spatial relation instead of a list), `p_caption_colour`, `p_caption_size` (an
object mention carries its colour / size), `p_next_to` (a horizontal relation is said
"next to", which loses the direction).
Features: `region_noise`, `grid_noise`, `iso_noise` (noise std, in units of a signal's
per-dimension std), `class_confusion`, `detector_error`, `grid_object_evidence` (strength
of object evidence in grid cells), `scene_strength`, `supercategory_share` (how similar
classes of one supercategory are), `p_part` (part region per object), `max_background`.
Setting `family_fraction=0` and `p_caption_relation=0` gives an easy world; raising the
noise, `class_confusion` and `detector_error` makes recall saturate lower.
"""
import dataclasses
import functools
import zlib
from typing import Optional

import numpy as np

from dsran_jax.data import global_feat
from dsran_jax.data import raw as raw_lib
from dsran_jax.data import region_pos as region_pos_lib

CAPTIONS_PER_IMAGE = 5
GRID_SIDE = 7
NUM_CELLS = GRID_SIDE * GRID_SIDE
NUM_VG_CLASSES = region_pos_lib.NUM_CLASSES  # 1601 Visual Genome classes, 0 = background
SPLITS = ("train", "dev", "test")

SUPERCATEGORIES = ("animal", "vehicle", "furniture", "object")
# (caption names (first is canonical), supercategory, box aspect w/h).
CLASSES = (
    (("dog", "puppy"), 0, 1.3), (("cat", "kitten"), 0, 1.2), (("horse", "pony"), 0, 1.2),
    (("bird",), 0, 1.0), (("cow",), 0, 1.4), (("sheep",), 0, 1.3),
    (("car",), 1, 1.8), (("bus",), 1, 2.0), (("bicycle", "bike"), 1, 1.5),
    (("motorcycle",), 1, 1.5), (("truck",), 1, 1.9), (("boat",), 1, 1.7),
    (("chair",), 2, 0.8), (("table", "desk"), 2, 1.6), (("bench",), 2, 2.0),
    (("lamp",), 2, 0.5), (("sofa", "couch"), 2, 2.0), (("bed",), 2, 1.6),
    (("ball",), 3, 1.0), (("umbrella",), 3, 1.0), (("kite",), 3, 0.9),
    (("bag", "backpack"), 3, 0.9), (("bottle",), 3, 0.4), (("cup", "mug"), 3, 0.9),
    (("box", "crate"), 3, 1.2), (("clock",), 3, 1.0), (("vase",), 3, 0.6),
    (("book",), 3, 1.3),
)
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple",
           "brown", "pink")
SIZES = (("small", "little"), ("large", "big"))
# (prepositional phrases, noun phrases for "<scene> with ...").
SCENES = (
    (("on the beach", "at the beach", "by the sea"), ("a beach", "a sandy beach")),
    (("on the street", "on a city street", "in the street"), ("a city street", "a street")),
    (("in a kitchen", "in the kitchen"), ("a kitchen",)),
    (("in the forest", "in the woods"), ("a forest",)),
    (("in a park", "at the park"), ("a park",)),
    (("in an office", "in the office"), ("an office",)),
    (("in the snow", "on a snowy hill"), ("a snowy hill", "a snowy field")),
    (("in a living room", "in the lounge"), ("a living room",)),
)
SCENE_NAMES = ("beach", "street", "kitchen", "forest", "park", "office", "snow",
               "living room")
# Relation ids: relation(i, j) describes object i relative to object j.
LEFT, RIGHT, ABOVE, BELOW = 0, 1, 2, 3
RELATIONS = (("to the left of", "left of", "on the left of"),
             ("to the right of", "right of", "on the right of"),
             ("above", "over"), ("below", "under", "beneath"))
NEXT_TO = ("next to", "beside", "near")
# Detector classes that are never captioned: object parts and scene-neutral background
# "stuff" (scene-specific stuff would leak the scene).
PARTS = ("head", "leg", "wheel", "window", "handle", "top")
STUFF = ("shadow", "spot", "line", "edge", "light", "reflection")
CANVASES = ((640, 480), (500, 375), (480, 640), (500, 333), (640, 427), (375, 500))

_REGION_NOISE_DIMS = 32
_GRID_NOISE_DIMS = 32
_NOISE_BANK_ROWS = 1024
# rng stream tags, so that layout, caption and feature draws never share a stream.
_STREAM_GROUP, _STREAM_LAYOUT, _STREAM_CAPTION, _STREAM_FEATURES, _STREAM_WORLD = range(5)
_STREAM_PIXELS = 5
# Raw images (`render`): the canvas at a fifth of its size (96-128 pixels a side), RGB
# of each colour name, pixel noise std.
PIXEL_SCALE = 0.2
COLOUR_RGB = ((220, 30, 30), (30, 60, 220), (30, 170, 60), (235, 215, 40), (20, 20, 20),
              (245, 245, 245), (245, 140, 20), (140, 40, 170), (120, 75, 35), (245, 150, 190))
PIXEL_NOISE = 8.0


@dataclasses.dataclass(frozen=True)
class Difficulty:
  """Knobs of the synthetic world (see the module docstring)."""
  min_objects: int = 2
  max_objects: int = 4
  num_classes: int = len(CLASSES)
  num_colours: int = len(COLOURS)
  num_scenes: int = len(SCENES)
  family_fraction: float = 0.75
  family_layouts: int = 2
  family_scenes: int = 2
  p_caption_scene: float = 0.7
  p_caption_relation: float = 0.6
  p_caption_colour: float = 0.9
  p_caption_size: float = 0.15
  p_next_to: float = 0.2
  region_noise: float = 0.5
  grid_noise: float = 0.4
  iso_noise: float = 0.5
  class_confusion: float = 0.15
  detector_error: float = 0.1
  grid_object_evidence: float = 0.35
  scene_strength: float = 0.8
  supercategory_share: float = 0.35
  colour_on_object: float = 0.0
  grid_colour_evidence: float = 0.0
  max_background: int = 3

  def validate(self, num_regions: int) -> None:
    """Raises ValueError naming the knob that is out of range."""
    checks = [
        (1 <= self.min_objects <= self.max_objects, "min_objects <= max_objects, >= 1"),
        (self.max_objects <= min(num_regions, 6),
         f"max_objects <= min(data.synthetic.num_regions={num_regions}, 6)"),
        (2 <= self.num_classes <= len(CLASSES), f"2 <= num_classes <= {len(CLASSES)}"),
        (self.max_objects <= self.num_classes, "max_objects <= num_classes"),
        (2 <= self.num_colours <= len(COLOURS), f"2 <= num_colours <= {len(COLOURS)}"),
        (2 <= self.num_scenes <= len(SCENES), f"2 <= num_scenes <= {len(SCENES)}"),
        (0 <= self.family_fraction <= 1, "0 <= family_fraction <= 1"),
        # Two objects have only 4 distinct relations, hence at most 4 arrangements.
        (1 <= self.family_layouts <= 4 and (self.family_layouts == 1 or self.min_objects >= 2),
         "1 <= family_layouts <= 4 (and min_objects >= 2 if > 1)"),
        (1 <= self.family_scenes <= self.num_scenes, "1 <= family_scenes <= num_scenes"),
        (self.max_background >= 0, "max_background >= 0"),
    ]
    for ok, what in checks:
      if not ok:
        raise ValueError(f"synthetic Difficulty: need {what}, got {self}")


DEFAULT_DIFFICULTY = Difficulty()


@dataclasses.dataclass
class Layouts:
  """The symbolic content of a split's images (arrays over images, objects padded with -1).

  `cls`, `colour`, `size`, `row`, `col` are (N, max_objects). `family` is the image's
  family index if it belongs to a hard-negative family (same objects as the other
  members), else -1; `variant` is (layout variant, scene variant) within the family.
  """
  split: str
  scene: np.ndarray
  num_objects: np.ndarray
  cls: np.ndarray
  colour: np.ndarray
  size: np.ndarray
  row: np.ndarray
  col: np.ndarray
  canvas: np.ndarray
  family: np.ndarray
  variant: np.ndarray

  def __len__(self):
    return len(self.scene)

  def objects(self, i: int):
    """[(class, colour, size, row, col)] of image i."""
    n = int(self.num_objects[i])
    return [(int(self.cls[i, k]), int(self.colour[i, k]), int(self.size[i, k]),
             int(self.row[i, k]), int(self.col[i, k])) for k in range(n)]


def relation(obj_a, obj_b) -> int:
  """Spatial relation of object a to object b (tuples (..., row, col)): LEFT..BELOW."""
  dr, dc = obj_a[-2] - obj_b[-2], obj_a[-1] - obj_b[-1]
  if abs(dc) > abs(dr):
    return LEFT if dc < 0 else RIGHT
  return ABOVE if dr < 0 else BELOW


def _split_code(split_name: str) -> int:
  return zlib.crc32(split_name.encode("utf-8"))


def _rng(*key) -> np.random.Generator:
  return np.random.default_rng([int(k) for k in key])


class SyntheticWorld:
  """The fixed part of the world (directions, vocabulary ids) for one seed and width."""

  def __init__(self, seed: int, img_dim: int, num_regions: int,
               difficulty: Difficulty = DEFAULT_DIFFICULTY):
    difficulty.validate(num_regions)
    if img_dim < 1:
      raise ValueError(f"data.img_dim must be positive, got {img_dim}")
    self.seed = int(seed)
    self.img_dim = int(img_dim)
    self.num_regions = int(num_regions)
    self.d = difficulty
    d = difficulty
    nc, ncol, nsc = d.num_classes, d.num_colours, d.num_scenes
    # Region directions: classes, supercategories, colours, sizes, parts, stuff.
    self._r_cls = 0
    self._r_sup = self._r_cls + nc
    self._r_col = self._r_sup + len(SUPERCATEGORIES)
    self._r_size = self._r_col + ncol
    self._r_part = self._r_size + 2
    self._r_stuff = self._r_part + len(PARTS)
    self._k_region = self._r_stuff + len(STUFF)
    # Grid directions: scenes, scene x band (sky / middle / ground), classes, colours.
    self._g_scene = 0
    self._g_band = nsc
    self._g_cls = self._g_band + 3 * nsc
    self._g_col = self._g_cls + nc
    self._k_grid = self._g_col + ncol
    rng = _rng(self.seed, _STREAM_WORLD)
    # Unit per-dimension std, so coefficients are per-dimension stds.
    self.region_basis = rng.standard_normal((self._k_region, img_dim), dtype=np.float32)
    self.grid_basis = rng.standard_normal((self._k_grid, img_dim), dtype=np.float32)
    # Noise comes from banks of precomputed rows picked per image: features are then
    # built by gathers and adds only. BLAS matmuls per image were 10-40x slower whenever
    # the cores were busy (OpenBLAS threads spin against the trainer's threads).
    def low_rank_bank(dims):  # structured noise: confined to `dims` random directions
      z = rng.standard_normal((_NOISE_BANK_ROWS, dims), dtype=np.float32)
      basis = rng.standard_normal((dims, img_dim), dtype=np.float32)
      return (z @ basis) / np.float32(np.sqrt(dims))
    # Banks are pre-scaled by their knob so that adding noise is one gather and one add.
    self.region_noise_bank = low_rank_bank(_REGION_NOISE_DIMS) * np.float32(d.region_noise)
    self.grid_noise_bank = low_rank_bank(_GRID_NOISE_DIMS) * np.float32(d.grid_noise)
    self.iso_noise_bank = rng.standard_normal(
        (_NOISE_BANK_ROWS, img_dim), dtype=np.float32) * np.float32(d.iso_noise)
    # Detector vocabulary: every world class / part / stuff gets a distinct VG index.
    vg = rng.choice(np.arange(1, NUM_VG_CLASSES), nc + len(PARTS) + len(STUFF), replace=False)
    self.vg_class = vg[:nc]
    self.vg_part = vg[nc:nc + len(PARTS)]
    self.vg_stuff = vg[nc + len(PARTS):]
    self.supercat = np.array([CLASSES[c][1] for c in range(nc)])
    self.aspect = np.array([CLASSES[c][2] for c in range(nc)])
    # A same-supercategory "confusable" class per class (itself if it has none).
    self.confusable = np.array([
        next((o for o in list(range(c + 1, nc)) + list(range(c))
              if self.supercat[o] == self.supercat[c]), c) for c in range(nc)])
    cells = np.arange(NUM_CELLS)
    self.cell_row = cells // GRID_SIDE
    self.cell_col = cells % GRID_SIDE
    self.cell_band = np.where(self.cell_row < 2, 0, np.where(self.cell_row < 5, 1, 2))

  # ---------------------------------------------------------------- layouts and captions

  def _sample_layout(self, rng, n=None):
    d = self.d
    if n is None:
      n = int(rng.integers(d.min_objects, d.max_objects + 1))
    cls = rng.choice(d.num_classes, n, replace=False)
    colour = rng.integers(d.num_colours, size=n)
    size = rng.integers(2, size=n)
    scene = int(rng.integers(d.num_scenes))
    canvas = int(rng.integers(len(CANVASES)))
    for _ in range(100):
      cells = rng.choice(NUM_CELLS, n, replace=False)
      r, c = cells // GRID_SIDE, cells % GRID_SIDE
      dr = np.abs(r[:, None] - r[None, :])
      dc = np.abs(c[:, None] - c[None, :])
      off = ~np.eye(n, dtype=bool)
      # Every pair has one clearly dominant axis, so its relation is unambiguous.
      if np.all((np.maximum(dr, dc) >= 2)[off]) and np.all((dr != dc)[off]):
        break
    else:  # unreachable for <= 6 objects on 7x7; keep the last draw rather than loop
      pass
    return dict(scene=scene, cls=cls, colour=colour, size=size, row=r, col=c,
                canvas=canvas)

  @staticmethod
  def _relations(row, col):
    n = len(row)
    return tuple(relation((row[a], col[a]), (row[b], col[b]))
                 for a in range(n) for b in range(a + 1, n))

  def _layout_variants(self, base, rng):
    """`family_layouts` arrangements of base's objects with pairwise different relations."""
    n = len(base["cls"])
    variants = [(base["row"], base["col"])]
    seen = {self._relations(*variants[0])}
    pairs = [tuple(p) for p in rng.permutation(
        [(a, b) for a in range(n) for b in range(a + 1, n)])]
    for _ in range(1000):
      if len(variants) == self.d.family_layouts:
        return variants
      if pairs:  # swapping two objects flips their relation: the minimal hard negative
        a, b = pairs.pop()
        row, col = base["row"].copy(), base["col"].copy()
        row[[a, b]], col[[a, b]] = row[[b, a]], col[[b, a]]
      else:  # more variants than pairs: a fresh arrangement of the same objects
        fresh = self._sample_layout(rng, n=n)
        row, col = fresh["row"], fresh["col"]
      rel = self._relations(row, col)
      if rel not in seen:
        seen.add(rel)
        variants.append((row, col))
    raise RuntimeError(f"no {self.d.family_layouts} distinct arrangements of {n} objects")

  def layouts(self, split_name: str, num_images: int) -> Layouts:
    """The symbolic content of the first `num_images` images of a split.

    Image i depends only on (seed, split, i // family size, i), so a split is a prefix of
    any larger split of the same name.
    """
    d = self.d
    code = _split_code(split_name)
    m = d.max_objects
    out = dict(scene=np.zeros(num_images, np.int32),
               num_objects=np.zeros(num_images, np.int32),
               canvas=np.zeros(num_images, np.int32),
               family=np.full(num_images, -1, np.int32),
               variant=np.zeros((num_images, 2), np.int32),
               **{k: np.full((num_images, m), -1, np.int32)
                  for k in ("cls", "colour", "size", "row", "col")})

    def put(i, lay):
      n = len(lay["cls"])
      out["scene"][i], out["num_objects"][i], out["canvas"][i] = lay["scene"], n, lay["canvas"]
      for k in ("cls", "colour", "size", "row", "col"):
        out[k][i, :n] = lay[k]

    size = d.family_layouts * d.family_scenes
    for f in range((num_images + size - 1) // size):
      members = range(f * size, min(num_images, (f + 1) * size))
      frng = _rng(self.seed, code, f, _STREAM_GROUP)
      if size == 1 or frng.random() >= d.family_fraction:
        for i in members:
          put(i, self._sample_layout(_rng(self.seed, code, i, _STREAM_LAYOUT)))
        continue
      base = self._sample_layout(frng)
      arrangements = self._layout_variants(base, frng)
      scenes = frng.choice(d.num_scenes, d.family_scenes, replace=False)
      for i in members:
        li, si = divmod(i - f * size, d.family_scenes)
        lay = dict(base, row=arrangements[li][0], col=arrangements[li][1],
                   scene=int(scenes[si]))
        put(i, lay)
        out["family"][i] = f
        out["variant"][i] = (li, si)
    return Layouts(split=split_name, **out)

  def _noun_phrase(self, rng, obj) -> str:
    cls, colour, size = obj[:3]
    words = []
    if rng.random() < self.d.p_caption_size:
      words.append(SIZES[size][rng.integers(len(SIZES[size]))])
    if rng.random() < self.d.p_caption_colour:
      words.append(COLOURS[colour])
    names = CLASSES[cls][0]
    words.append(names[rng.integers(len(names))])
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article] + words)

  def _caption(self, rng, objs, scene: int) -> str:
    d = self.d
    n = len(objs)
    want_scene = rng.random() < d.p_caption_scene
    scene_pps, scene_nps = SCENES[scene]
    if n >= 2 and rng.random() < d.p_caption_relation:
      i, j = rng.choice(n, 2, replace=False)
      rel = relation(objs[i], objs[j])
      if rel in (LEFT, RIGHT) and rng.random() < d.p_next_to:
        rel_words = NEXT_TO[rng.integers(len(NEXT_TO))]
      else:
        rel_words = RELATIONS[rel][rng.integers(len(RELATIONS[rel]))]
      text = (f"{self._noun_phrase(rng, objs[i])} {rel_words} "
              f"{self._noun_phrase(rng, objs[j])}")
      prefix = rng.choice(["", "", "", "a photo of ", "there is ", "an image of "])
      text = prefix + text
      if want_scene:
        text += " " + scene_pps[rng.integers(len(scene_pps))]
      return text
    k = int(rng.choice(np.arange(1, min(n, 3) + 1),
                       p=np.array([1, 3, 2][:min(n, 3)], float) / [1, 4, 6][min(n, 3) - 1]))
    nps = [self._noun_phrase(rng, objs[o]) for o in rng.choice(n, k, replace=False)]
    listed = nps[0] if k == 1 else ", ".join(nps[:-1]) + " and " + nps[-1]
    if want_scene and rng.random() < 0.5:
      return f"{scene_nps[rng.integers(len(scene_nps))]} with {listed}"
    prefix = rng.choice(["", "", "a photo of ", "there is ", "an image of "])
    text = prefix + listed
    if want_scene:
      text += " " + scene_pps[rng.integers(len(scene_pps))]
    return text

  def captions(self, layouts: Layouts) -> list:
    """`CAPTIONS_PER_IMAGE` distinct captions per image, image-major."""
    code = _split_code(layouts.split)
    texts = []
    for i in range(len(layouts)):
      rng = _rng(self.seed, code, i, _STREAM_CAPTION)
      objs, scene = layouts.objects(i), int(layouts.scene[i])
      caps = []
      for _ in range(20 * CAPTIONS_PER_IMAGE):
        cap = self._caption(rng, objs, scene)
        if cap not in caps:
          caps.append(cap)
          if len(caps) == CAPTIONS_PER_IMAGE:
            break
      while len(caps) < CAPTIONS_PER_IMAGE:  # a tiny vocabulary: repeats are allowed
        caps.append(self._caption(rng, objs, scene))
      texts.extend(caps)
    return texts

  # ------------------------------------------------------------------------ features

  def read_images(self, layouts: Layouts, indices, with_global: bool = False) -> dict:
    """Image-side arrays for `indices` of a split: grid, regions, region_pos, region_mask
    and, `with_global`, global_feat (B, img_dim): the mean of the image's 49 grid cells,
    as the real one is the average pool of ResNet's 7x7 map (data/global_feat.py): the
    scene, plus weak evidence of the larger objects.

    Each image is drawn from an rng keyed by (seed, split, index) and computed with
    per-image matmuls of fixed shape, so its features are bit-identical in any batch.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= len(layouts)):
      raise IndexError(
          f"synthetic split {layouts.split!r}: image indices must be in "
          f"[0, {len(layouts)}), got min {indices.min()} max {indices.max()}")
    b, r, dim = len(indices), self.num_regions, self.img_dim
    out = dict(grid=np.empty((b, NUM_CELLS, dim), np.float32),
               regions=np.zeros((b, r, dim), np.float32),
               region_pos=np.zeros((b, r, region_pos_lib.POS_DIM), np.float32),
               region_mask=np.zeros((b, r), bool),
               _scratch=np.empty((max(NUM_CELLS, r), dim), np.float32))
    code = _split_code(layouts.split)
    for row, i in enumerate(indices):
      self._image(layouts, int(i), _rng(self.seed, code, i, _STREAM_FEATURES), out, row)
    del out["_scratch"]
    if with_global:
      out["global_feat"] = out["grid"].mean(axis=1, dtype=np.float32)
    return out

  def _image(self, L: Layouts, i: int, rng, out, row):
    d = self.d
    n = int(L.num_objects[i])
    cls, colour, size = L.cls[i, :n], L.colour[i, :n], L.size[i, :n]
    w, h = CANVASES[L.canvas[i]]
    cw, ch = w / GRID_SIDE, h / GRID_SIDE
    # ---- boxes: objects, then one part per object (inside its box), then background.
    cx = (L.col[i, :n] + 0.5 + rng.uniform(-0.3, 0.3, n)) * cw
    cy = (L.row[i, :n] + 0.5 + rng.uniform(-0.3, 0.3, n)) * ch
    extent = np.where(size == 1, rng.uniform(2.2, 3.2, n), rng.uniform(1.2, 1.8, n))
    sq = np.sqrt(self.aspect[cls])
    bw, bh = extent * cw * sq, extent * ch / sq
    obj_boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
    pf = rng.uniform(0.3, 0.6, (n, 2))
    po = rng.random((n, 2))
    px1 = obj_boxes[:, 0] + po[:, 0] * (1 - pf[:, 0]) * bw
    py1 = obj_boxes[:, 1] + po[:, 1] * (1 - pf[:, 1]) * bh
    part_boxes = np.stack([px1, py1, px1 + pf[:, 0] * bw, py1 + pf[:, 1] * bh], 1)
    # Part types do not depend on the class: a red part says nothing about its object.
    part_cls = rng.integers(len(PARTS), size=n)
    n_bg = int(rng.integers(1, d.max_background + 1)) if d.max_background else 0
    bg_wh = rng.uniform(0.1, 0.5, (n_bg, 2)) * (w, h)
    bg_xy = rng.random((n_bg, 2)) * ((w, h) - bg_wh)
    bg_boxes = np.concatenate([bg_xy, bg_xy + bg_wh], 1)
    bg_cls = rng.integers(len(STUFF), size=n_bg)
    boxes = np.concatenate([obj_boxes, part_boxes, bg_boxes])
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, w - 1)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, h - 1)
    n_part = len(part_boxes)
    kind = np.repeat([0, 1, 2], [n, n_part, n_bg])
    score = np.concatenate([rng.uniform(0.6, 0.99, n), rng.uniform(0.45, 0.75, n_part),
                            rng.uniform(0.15, 0.45, n_bg)])
    # ---- region coefficients (rows in slot order: objects, parts, background).
    s = len(kind)
    coef = np.zeros((s, self._k_region), np.float32)
    strength = rng.uniform(0.7, 1.2, s).astype(np.float32)
    obj_rows = np.arange(n)
    confused = rng.random(n) < d.class_confusion
    mix = np.where(confused, rng.uniform(0.25, 0.5, n), 0.0).astype(np.float32)
    own = np.float32(np.sqrt(1 - d.supercategory_share))
    coef[obj_rows, self._r_cls + cls] += strength[:n] * own * (1 - mix)
    coef[obj_rows, self._r_cls + self.confusable[cls]] += strength[:n] * own * mix
    coef[obj_rows, self._r_sup + self.supercat[cls]] += (
        strength[:n] * np.float32(np.sqrt(d.supercategory_share)))
    coef[obj_rows, self._r_size + size] += 0.3 * strength[:n]
    # The colour is seen on the object's part region (inside its box), not on the object
    # region: "red dog" is a relation between two overlapping regions.
    part_rows = np.arange(n, n + n_part)
    col_obj = np.float32(0.8 * d.colour_on_object)
    col_part = np.float32(0.8 * (1 - d.colour_on_object))
    coef[obj_rows, self._r_col + colour] += col_obj * strength[:n]
    coef[part_rows, self._r_col + colour] += col_part * strength[part_rows]
    coef[part_rows, self._r_part + part_cls] += strength[part_rows]
    bg_rows = np.arange(n + n_part, s)
    coef[bg_rows, self._r_stuff + bg_cls] += strength[bg_rows]
    # ---- detector class distributions (logits: the detected class, its confusable
    # class, a few random classes, a flat floor).
    top = np.concatenate([self.vg_class[cls], self.vg_part[part_cls], self.vg_stuff[bg_cls]])
    err = np.flatnonzero(rng.random(n) < d.detector_error)
    second = top.copy()
    second[:n] = self.vg_class[self.confusable[cls]]
    top[err], second[err] = second[err], top[err]
    logits = np.full((s, NUM_VG_CLASSES), -4.0, np.float32)
    logits[np.arange(s)[:, None], rng.integers(1, NUM_VG_CLASSES, (s, 8))] = rng.uniform(
        -1, 1, (s, 8))
    logits[np.arange(s), second] = rng.uniform(0.5, 2.5, s)
    logits[np.arange(s), top] = 2.0 + 4.0 * score
    logits[:, 0] = rng.uniform(-1, 1, s)  # VG background class
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    # ---- detector order (score descending), cut to num_regions.
    order = np.argsort(-score, kind="stable")[:self.num_regions]
    k = len(order)
    det = np.concatenate([boxes, np.zeros((s, 1)), score[:, None]], 1)[order]
    out["region_pos"][row, :k] = region_pos_lib.region_pos(det.astype(np.float32), probs[order])
    out["region_mask"][row, :k] = True
    # Sparse coefficients -> features: every row has a nonzero (its class, part or stuff
    # direction), so reduceat over the row-major nonzeros sums each row's directions.
    rr, kk = np.nonzero(coef[order])
    starts = np.searchsorted(rr, np.arange(k))
    regions = np.add.reduceat(coef[order][rr, kk, None] * self.region_basis[kk], starts)
    noise_rows = rng.integers(_NOISE_BANK_ROWS, size=(2, k))
    regions += np.take(self.region_noise_bank, noise_rows[0], axis=0, out=out["_scratch"][:k])
    regions += np.take(self.iso_noise_bank, noise_rows[1], axis=0, out=out["_scratch"][:k])
    out["regions"][row, :k] = regions
    # ---- grid: the scene everywhere (plus a sky / middle / ground band), weak object
    # evidence where the object's box covers the cell centre, image-level and cell noise.
    sc = int(L.scene[i])
    sst = np.float32(d.scene_strength * rng.uniform(0.7, 1.1))
    noise_rows = rng.integers(_NOISE_BANK_ROWS, size=(2, NUM_CELLS + 1))
    image_noise = self.grid_noise_bank[noise_rows[0, -1]]
    bands = (sst * self.grid_basis[self._g_scene + sc] +
             np.float32(0.6) * sst * self.grid_basis[self._g_band + 3 * sc:][:3] +
             image_noise)
    grid = out["grid"][row]
    np.take(bands, self.cell_band, axis=0, out=grid)
    # Gathers into a reused scratch buffer that stays in cache: this loop is memory bound.
    scratch = out["_scratch"]
    grid += np.take(self.grid_noise_bank, noise_rows[0, :-1], axis=0, out=scratch)
    grid += np.take(self.iso_noise_bank, noise_rows[1, :-1], axis=0, out=scratch)
    ccx = (self.cell_col + 0.5) * cw
    ccy = (self.cell_row + 0.5) * ch
    for o in range(n):
      x1, y1, x2, y2 = boxes[o]
      cells = np.flatnonzero((ccx >= x1) & (ccx <= x2) & (ccy >= y1) & (ccy <= y2))
      ev = np.float32(d.grid_object_evidence) * strength[o]
      grid[cells] += ev * self.grid_basis[self._g_cls + cls[o]]
      if d.grid_colour_evidence:
        grid[cells] += (ev * np.float32(d.grid_colour_evidence)) * (
            self.grid_basis[self._g_col + colour[o]])

  def render(self, layouts: Layouts, i: int) -> np.ndarray:
    """Raw RGB pixels of image i, (H, W, 3) uint8, for models that run a CNN on images
    (DSRAN's online grid): the canvas at `PIXEL_SCALE`, painted in three bands (sky,
    middle, ground) of the scene's colours, each object a rectangle of its colour
    centred on its layout cell, sized by its size and shaped by its class's aspect, plus
    pixel noise. A pure function of (seed, split, i), like the features; the scene,
    colours and positions are visible, the class only through its shape."""
    w, h = CANVASES[layouts.canvas[i]]
    w, h = max(8, round(w * PIXEL_SCALE)), max(8, round(h * PIXEL_SCALE))
    palette = _rng(self.seed, _STREAM_PIXELS).integers(
        0, 256, (len(SCENES), 3, 3)).astype(np.float32)
    rows = np.arange(h)[:, None] * GRID_SIDE // h             # layout row of each pixel
    band = np.where(rows < 2, 0, np.where(rows < 5, 1, 2))
    img = np.broadcast_to(palette[int(layouts.scene[i])][band], (h, w, 3)).copy()
    cw, ch = w / GRID_SIDE, h / GRID_SIDE
    yy, xx = np.arange(h)[:, None], np.arange(w)[None, :]
    for cls, colour, size, row, col in layouts.objects(i):
      extent = 2.6 if size == 1 else 1.5
      sq = np.sqrt(self.aspect[cls])
      cx, cy = (col + 0.5) * cw, (row + 0.5) * ch
      bw, bh = extent * cw * sq / 2, extent * ch / sq / 2
      inside = (np.abs(xx - cx) <= bw) & (np.abs(yy - cy) <= bh)
      img[inside] = COLOUR_RGB[colour]
    rng = _rng(self.seed, _split_code(layouts.split), i, _STREAM_PIXELS)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(PIXEL_NOISE)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)

  def describe(self, layouts: Layouts, i: int) -> dict:
    """Human-readable content of image i (for tests, debugging and demos)."""
    return dict(
        scene=SCENE_NAMES[layouts.scene[i]],
        objects=[dict(cls=CLASSES[c][0][0], colour=COLOURS[co], size=SIZES[s][0],
                      row=r, col=cc) for c, co, s, r, cc in layouts.objects(i)],
        family=int(layouts.family[i]), variant=tuple(int(v) for v in layouts.variant[i]))


@functools.lru_cache(maxsize=8)
def get_world(seed: int, img_dim: int, num_regions: int,
              difficulty: Difficulty = DEFAULT_DIFFICULTY) -> SyntheticWorld:
  """The (cached) world of a seed: its random directions are built once per process."""
  return SyntheticWorld(seed, img_dim, num_regions, difficulty)


def split_size(config, split_name: str) -> int:
  """Number of images of a synthetic split, from `data.synthetic.num_{train,dev,test}_images`."""
  if split_name not in SPLITS:
    raise ValueError(
        f"synthetic data has splits {SPLITS}, got {split_name!r} "
        "(data.train_split / data.dev_split / data.test_split)")
  n = int(config.data.synthetic[f"num_{split_name}_images"])
  if n < 1:
    raise ValueError(f"data.synthetic.num_{split_name}_images must be >= 1, got {n}")
  return n


def difficulty_from_config(config) -> Difficulty:
  """`DEFAULT_DIFFICULTY`, overridden by an optional `data.synthetic.difficulty` dict.

  default_config has no such key; a config may add one (e.g. `c.data.synthetic.difficulty
  = {"family_fraction": 1.0}`) to set knobs without code changes.
  """
  overrides = config.data.synthetic.get("difficulty", None)
  if not overrides:
    return DEFAULT_DIFFICULTY
  overrides = dict(overrides)
  unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(Difficulty)})
  if unknown:
    raise ValueError(f"data.synthetic.difficulty: unknown knobs {unknown}")
  return dataclasses.replace(DEFAULT_DIFFICULTY, **overrides)


def world_and_layouts(config, split_name: str,
                      difficulty: Optional[Difficulty] = None):
  """(SyntheticWorld, Layouts) of a split, for tests and analysis."""
  world = get_world(int(config.data.synthetic.seed), int(config.data.img_dim),
                    int(config.data.synthetic.num_regions),
                    difficulty or difficulty_from_config(config))
  return world, world.layouts(split_name, split_size(config, split_name))


def read_raw_split(config, split_name: str,
                   difficulty: Optional[Difficulty] = None) -> raw_lib.RawSplit:
  """A synthetic split: captions now, image features generated on demand.

  Args:
    config: the full config; uses `data.synthetic.{seed, num_regions,
      num_{split}_images}` and `data.img_dim`.
    split_name: "train", "dev" or "test".
    difficulty: world knobs (module docstring); default `difficulty_from_config`.

  Returns:
    A `RawSplit` with 5 captions per image and a `read_images` that returns grid
    (B, 49, img_dim), regions (B, R, img_dim), region_pos (B, R, 1607) float32 and
    region_mask (B, R) bool, plus global_feat (B, img_dim) when the model reads it,
    and `read_pixels` (`SyntheticWorld.render`): each image's raw pixels.
  """
  world, layouts = world_and_layouts(config, split_name, difficulty)
  return raw_lib.RawSplit(
      image_ids=[f"synthetic-{split_name}-{i:06d}" for i in range(len(layouts))],
      texts=world.captions(layouts),
      captions_per_image=CAPTIONS_PER_IMAGE,
      read_images=functools.partial(world.read_images, layouts,
                                    with_global=global_feat.uses_global(config)),
      read_pixels=functools.partial(world.render, layouts))
