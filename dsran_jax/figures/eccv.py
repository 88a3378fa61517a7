"""What R@K's "false negatives" look like: a few ECCV Caption queries with their
top-ranked items marked COCO positive / ECCV positive / neither.

`eccv_queries(sims, path, layout)` draws, for image queries (i2t), the image (its COCO id,
or a thumbnail when `image_dir` holds it) and its top captions as text; for caption
queries (t2i), the caption and its top images. COCO's ground truth counts only the pair
it was written for; ECCV Caption adds machine-and-human-verified matches, so items marked
"ECCV positive" are correct retrievals that COCO R@K counts as errors. Queries are chosen
where that happens most (ties by order). `eccv_figure(workdir)` draws it for an evaluated
workdir from its saved sims (`eval.save_sims`).
"""
import glob
import os
from typing import Dict, List, Optional, Sequence

from matplotlib.patches import Patch
import numpy as np

from dsran_jax import coco_benchmarks as cb
from dsran_jax import data
from dsran_jax.evaluation import eccv as eccv_eval
from dsran_jax.figures.canvas import figure, save, wrap
from dsran_jax.workdir import Workdir

MARKS = {"coco": ("COCO positive", "#1a9850"), "eccv": ("ECCV positive (COCO: wrong)",
                                                        "#2166ac"),
         "none": ("neither", "#bbbbbb")}


def _mark(item: int, coco: set, eccv: set) -> str:
  return "coco" if item in coco else "eccv" if item in eccv else "none"


def choose_queries(sims, layout: cb.CocoLayout, direction: str, num: int,
                   top: int) -> List[Dict]:
  """The `num` ECCV queries of `direction` whose top `top` hold the most ECCV positives
  that COCO does not count; each {query (id), index, items: [(id, index, mark)]}."""
  eccv_gt = cb.load_ground_truth("eccv")
  coco_gt = cb.load_ground_truth("coco_5k")
  gt, cgt = (eccv_gt.i2t, coco_gt.i2t) if direction == "i2t" else (eccv_gt.t2i, coco_gt.t2i)
  q_ids = layout.image_ids if direction == "i2t" else layout.caption_ids
  item_ids = layout.caption_ids if direction == "i2t" else layout.image_ids
  index = {int(v): i for i, v in enumerate(q_ids)}
  queries = [q for q in gt if q in index]
  if not queries:
    raise cb.LayoutError(f"no ECCV {direction} query is in the matrix ({layout.source})")
  tops = cb.top_items(sims, direction, [index[q] for q in queries], top)
  rows = []
  for q, t in zip(queries, tops):
    coco, eccv = set(cgt.get(q, np.zeros(0)).tolist()), set(gt[q].tolist())
    items = [(int(item_ids[j]), int(j), _mark(int(item_ids[j]), coco, eccv)) for j in t]
    rows.append({"query": int(q), "index": index[q], "items": items,
                 "eccv_only": sum(m == "eccv" for _, _, m in items)})
  rows.sort(key=lambda r: -r["eccv_only"])   # stable: ties keep the ground truth's order
  return rows[:num]


def _thumbnail(image_dir: Optional[str], image_id: int, stem: Optional[str]):
  """The image as an array, or None when `image_dir` has no file for it."""
  if not image_dir:
    return None
  names = ([f"{stem}.jpg"] if stem else []) + [f"COCO_val2014_{image_id:012d}.jpg",
                                               f"{image_id:012d}.jpg"]
  for name in names:
    path = os.path.join(image_dir, name)
    if os.path.isfile(path):
      from PIL import Image  # pylint: disable=g-import-not-at-top
      with Image.open(path) as im:
        im.thumbnail((256, 256))
        return np.asarray(im.convert("RGB"))
  return None


def _draw_image(ax, image_id: int, image_dir, stem, color=None):
  thumb = _thumbnail(image_dir, image_id, stem)
  if thumb is not None:
    ax.imshow(thumb)
    ax.set_title(f"image {image_id}", fontsize=7)
  else:
    ax.text(0.5, 0.5, f"COCO image\n{image_id}", ha="center", va="center", fontsize=9)
  if color:
    for s in ax.spines.values():
      s.set_edgecolor(color)
      s.set_linewidth(4)


def _draw_text(ax, text: str, color=None, width: int = 28):
  ax.text(0.04, 0.96, wrap(text, width), ha="left", va="top", fontsize=7,
          transform=ax.transAxes)
  if color:
    ax.set_facecolor(color + "33")
    for s in ax.spines.values():
      s.set_edgecolor(color)
      s.set_linewidth(3)


def eccv_queries(sims, path: str, layout: Optional[cb.CocoLayout] = None,
                 texts: Optional[Sequence[str]] = None, image_dir: Optional[str] = None,
                 stems: Optional[Sequence[str]] = None, num_queries: int = 2,
                 top: int = 5, title: Optional[str] = None) -> Dict:
  """Draws `num_queries` image queries and as many caption queries with their top `top`
  items, each marked COCO positive / ECCV positive / neither; returns {"path", "i2t",
  "t2i"} (the queries drawn, from `choose_queries`).

  Args:
    sims: COCO 5K sims (array or `.npy` path), rows/columns as `layout` (default: the
      package's `coco_test_ids` order).
    texts: the captions of the columns (default: shown as annotation ids).
    image_dir: a directory of COCO images (`{stem}.jpg`, `COCO_val2014_{id:012d}.jpg` or
      `{id:012d}.jpg`) for thumbnails; images are shown as ids otherwise.
    stems: file stems of the rows (the split's image ids), for `image_dir`.
  """
  if isinstance(sims, (str, os.PathLike)):
    sims = np.load(os.fspath(sims), mmap_mode="r")
  layout = cb.package_layout() if layout is None else layout
  if tuple(np.shape(sims)) != (len(layout.image_ids), len(layout.caption_ids)):
    raise cb.LayoutError(f"sims has shape {tuple(np.shape(sims))}, the ids "
                         f"({layout.source}) give {len(layout.image_ids)} x "
                         f"{len(layout.caption_ids)}")
  if texts is not None and len(texts) != len(layout.caption_ids):
    raise ValueError(f"{len(texts)} captions for {len(layout.caption_ids)} columns")
  i2t = choose_queries(sims, layout, "i2t", num_queries, top)
  t2i = choose_queries(sims, layout, "t2i", num_queries, top)

  def caption(j: int) -> str:
    cid = int(layout.caption_ids[j])
    return f"{texts[j]}  [{cid}]" if texts is not None else f"caption {cid}"

  def stem(i: int):
    return stems[i] if stems is not None else None

  rows = len(i2t) + len(t2i)
  fig = figure((2.3 * (top + 1), 2.0 * rows + 0.6))
  axes = fig.subplots(rows, top + 1, squeeze=False)
  for r, q in enumerate(i2t):
    _draw_image(axes[r, 0], q["query"], image_dir, stem(q["index"]))
    axes[r, 0].set_ylabel("image query", fontsize=8)
    for c, (_, j, m) in enumerate(q["items"], start=1):
      _draw_text(axes[r, c], f"{c}. {caption(j)}", MARKS[m][1])
  for r, q in enumerate(t2i, start=len(i2t)):
    _draw_text(axes[r, 0], f"query: {caption(q['index'])}")
    axes[r, 0].set_ylabel("caption query", fontsize=8)
    for c, (iid, i, m) in enumerate(q["items"], start=1):
      _draw_image(axes[r, c], iid, image_dir, stem(i), MARKS[m][1])
      axes[r, c].set_xlabel(f"{c}. {MARKS[m][0].split(' (')[0]}", fontsize=7,
                            color=MARKS[m][1])
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  fig.legend(handles=[Patch(facecolor=c, label=label) for label, c in MARKS.values()],
             loc="upper center", bbox_to_anchor=(0.5, 0.975), ncol=3, fontsize=8,
             frameon=False)
  fig.suptitle(title or "ECCV Caption queries: top-ranked items", y=0.998, fontsize=10)
  fig.tight_layout(rect=(0, 0, 1, 0.93))
  return {"path": save(fig, path), "i2t": i2t, "t2i": t2i}


def eccv_figure(workdir: str, config=None, image_dir: Optional[str] = None,
                num_queries: int = 2, top: int = 5) -> Dict:
  """`eccv_queries` of an evaluated COCO 5K workdir: its saved test sims
  (`sims_{split}.npy`, from `eval.save_sims`), the split's captions and COCO ids (as the
  `eccv` evaluator maps them); the PNG is the workdir's `eccv_queries` figure."""
  wd = Workdir(workdir)
  config = config or wd.load_config()
  split_name = config.data.test_split
  sims_path = wd.sims_file(split_name)
  if not os.path.isfile(sims_path):
    found = sorted(glob.glob(os.path.join(wd.path, "sims_*.npy")))
    raise FileNotFoundError(f"{sims_path}: missing; evaluate with eval.save_sims=True "
                            f"(found: {found or 'none'})")
  split = data.read_raw_split(config, split_name)
  layout = eccv_eval.split_layout(config, split_name, len(split.texts),
                                  split.captions_per_image, data.format_module(config))
  return eccv_queries(sims_path, wd.figure_file("eccv_queries"), layout, split.texts,
                      image_dir, split.image_ids, num_queries, top,
                      title=f"ECCV Caption queries of {split_name} ({wd.path})")
