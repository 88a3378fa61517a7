"""PNG figures saved in a workdir (matplotlib, headless).

- `training_curves(workdir)`: loss, learning rate and dev rsum from `metrics.jsonl`.
- `recall_curves(sims, path)`: Recall@K against K, image -> text and text -> image.
- `attention_map(workdir, images)`: where the first JSR GAT looks, over the 7x7 grid
  cells and the regions (labelled with object names on synthetic data), next to the
  image's captions.
- `evaluation_figures(workdir)`: recall curves (and, on synthetic data, an attention map)
  of the workdir's best checkpoint on its test split.

Figures are drawn on `matplotlib.figure.Figure` objects with an Agg canvas, never through
pyplot's global state, so importing this module does not switch a notebook's backend.
"""
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

GRID_SIDE = 7


def _figure(figsize) -> Figure:
  fig = Figure(figsize=figsize)
  FigureCanvasAgg(fig)
  return fig


def _save(fig: Figure, path: str, dpi: int = 110) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=dpi)
  return path


def read_metrics(workdir: str) -> list:
  """Rows of `{workdir}/metrics.jsonl`."""
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def training_curves(workdir: str, filename: str = "training_curves.png") -> str:
  """Loss, learning rate and dev rsum against step; returns the PNG path."""
  rows = read_metrics(workdir)
  series = {key: [(r["step"], r[key]) for r in rows if key in r]
            for key in ("loss", "lr", "dev_rsum")}
  panels = [k for k, v in series.items() if v]
  fig = _figure((4.5 * max(len(panels), 1), 3.4))
  axes = fig.subplots(1, max(len(panels), 1), squeeze=False)
  titles = {"loss": "training loss", "lr": "learning rate", "dev_rsum": "dev rsum"}
  for ax, key in zip(axes[0], panels):
    steps, values = zip(*series[key])
    ax.plot(steps, values, marker="o" if key == "dev_rsum" else None, ms=3)
    ax.set_title(titles[key])
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  return _save(fig, os.path.join(workdir, filename))


# --------------------------------------------------------------------- recall curves


def _ranks_of(source, cpi: int) -> Tuple[np.ndarray, np.ndarray]:
  """(i2t ranks, t2i ranks) of a sims matrix, a `.npy` path, an object with `sims()`
  (a `search.Gallery`) or a ready `(i2t, t2i)` pair."""
  from dsran_jax import ranking  # pylint: disable=g-import-not-at-top
  if isinstance(source, tuple) and len(source) == 2:
    return np.asarray(source[0]), np.asarray(source[1])
  if isinstance(source, (str, os.PathLike)):
    source = np.load(os.fspath(source), mmap_mode="r")
  elif hasattr(source, "sims"):
    cpi = getattr(source, "captions_per_image", cpi)
    source = source.sims()
  return ranking.i2t_ranks(source, cpi), ranking.t2i_ranks(source, cpi)


def recall_at(ranks: np.ndarray, ks: Sequence[int]) -> np.ndarray:
  """R@K (percent) for each K of `ks`, from 0-based ranks (the `ranking` convention)."""
  ranks = np.asarray(ranks)
  return np.array([100.0 * np.mean(ranks < k) for k in ks])


def recall_curves(sims, path: str, cpi: int = 5, max_k: int = 50,
                  title: Optional[str] = None) -> str:
  """Recall@K for K = 1..max_k, image -> text and text -> image; returns the PNG path.

  Args:
    sims: a (N, cpi * N) sims matrix (array or `.npy` path), a `search.Gallery`, an
      `(i2t_ranks, t2i_ranks)` pair from `ranking`, or a dict `{label: any of those}`
      to compare several models on one figure.
    path: output PNG.
    cpi: captions per image.
    max_k: largest K (cut to the number of images).
    title: figure title.
  """
  sources = sims if isinstance(sims, dict) else {"": sims}
  fig = _figure((6.0, 4.0))
  ax = fig.subplots()
  colours = ["C0", "C1", "C2", "C3", "C4", "C5"]
  last_k = 1
  for n, (label, source) in enumerate(sources.items()):
    i2t, t2i = _ranks_of(source, cpi)
    for direction, ranks, style, n_items in (("image → text", i2t, "-", len(t2i)),
                                             ("text → image", t2i, "--", len(i2t))):
      # Beyond the number of candidates every recall is 100%.
      ks = np.arange(1, max(1, min(max_k, n_items)) + 1)
      last_k = max(last_k, int(ks[-1]))
      r = recall_at(ranks, ks)
      name = f"{label}: {direction}" if label else direction
      ax.plot(ks, r, style, color=colours[n % len(colours)], label=name)
      marks = [k for k in (1, 5, 10) if k <= ks[-1]]
      ax.plot(marks, r[np.array(marks) - 1], "o", color=colours[n % len(colours)], ms=4)
      for k in marks:
        ax.annotate(f"{r[k - 1]:.1f}", (k, r[k - 1]), textcoords="offset points",
                    xytext=(3, -10 if style == "--" else 4), fontsize=7)
  ax.set_xlabel("K")
  ax.set_ylabel("Recall@K (%)")
  ax.set_ylim(0, 101)
  ax.set_xlim(0.5, last_k + 0.5)
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=8)
  ax.set_title(title or "Recall@K")
  fig.tight_layout()
  return _save(fig, path)


# ------------------------------------------------------------------- attention maps


def jsr_attention(encoder, images: Dict[str, np.ndarray]) -> Dict[str, Optional[np.ndarray]]:
  """Attention of the first JSR GAT (`jsr/gat_0`, first layer), per image.

  The weights are read from the `intermediates` the attention layer sows, in eval mode;
  params and outputs are unchanged. They are averaged over heads and over the real query
  nodes: the weight each node gets in the block's mean-pooled output.

  Args:
    encoder: an `inference.Encoder`.
    images: image-side arrays of B images (`grid`, `regions`, `region_pos`,
      `region_mask`), e.g. `split.images(indices)`.

  Returns:
    {"grid": (B, 49) or None, "regions": (B, R), "region_mask": (B, R)}; each image's
    weights over all its nodes sum to 1.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from dsran_jax.models.dsran import DSRAN  # pylint: disable=g-import-not-at-top
  model = encoder.model
  uses_grid = model.config.image_inputs == "grid+regions"
  keys = ["regions", "region_pos", "region_mask"] + (["grid"] if uses_grid else [])
  batch = {k: np.asarray(images[k]) for k in keys if k in images}
  regions = batch["regions"]
  b, r = regions.shape[:2]
  mask = batch.get("region_mask")
  mask = np.ones((b, r), bool) if mask is None else mask.astype(bool)
  batch["region_mask"] = mask
  if "region_pos" not in batch:
    batch["region_pos"] = np.zeros((b, r, model.config.pos_dim), np.float32)

  def run(variables, batch):
    _, state = model.apply(variables, **batch, train=False, method=DSRAN.embed_images,
                           mutable=["intermediates"])
    probs = state["intermediates"]["jsr"]["gat_0"]["layer_0"]["mha"]["attention"][0]
    return probs.mean(axis=1)  # over heads: (B, N_query, N_key)

  probs = np.asarray(jax.jit(run)(encoder.variables, batch), np.float64)
  n_grid = probs.shape[-1] - r
  # Reference padding attends from (and to) every region; masked mode only real ones.
  if model.config.text_padding == "reference":
    query_mask = np.ones((b, probs.shape[1]), bool)
  else:
    query_mask = np.concatenate([np.ones((b, n_grid), bool), mask], axis=1)
  w = (probs * query_mask[:, :, None]).sum(1) / query_mask.sum(1, keepdims=True)
  return {"grid": w[:, :n_grid] if n_grid else None, "regions": w[:, n_grid:],
          "region_mask": mask}


def synthetic_region_labels(world, description: dict, region_pos: np.ndarray) -> List[str]:
  """Names of a synthetic image's regions, as its detector saw them.

  A region's class is the argmax of its class probabilities (the last 1601 columns of
  `region_pos`; the layer norm keeps the order), mapped back to the world's object,
  (part) and [background] names; objects also get their colour from `description`
  (`SyntheticWorld.describe`: an image's classes are distinct).
  """
  from dsran_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  vg = np.asarray(region_pos)[:, -synthetic.NUM_VG_CLASSES:].argmax(-1)
  names = {int(v): synthetic.CLASSES[c][0][0] for c, v in enumerate(world.vg_class)}
  names.update({int(v): f"({synthetic.PARTS[p]})" for p, v in enumerate(world.vg_part)})
  names.update({int(v): f"[{synthetic.STUFF[s]}]" for s, v in enumerate(world.vg_stuff)})
  colour_of = {o["cls"]: o["colour"] for o in description["objects"]}
  labels = []
  for v in vg:
    name = names.get(int(v), f"class {int(v)}")
    labels.append(f"{colour_of[name]} {name}" if name in colour_of else name)
  return labels


def attention_map(workdir: str, images: Sequence[Any] = (0,), path: Optional[str] = None,
                  split: Optional[str] = None, encoder=None, config=None,
                  max_regions: int = 20) -> str:
  """Attention of the first JSR GAT for some test images; returns the PNG path.

  One row per image: the attention over the 49 grid cells as a 7x7 heatmap (on synthetic
  data with the objects' cells marked), the attention over the regions as bars (labelled
  with the detected object names on synthetic data), and the image's captions.

  Args:
    workdir: a dsran_jax workdir.
    images: image indices (int) or ids (str) of the split.
    path: output PNG (default `{workdir}/attention_map.png`).
    split: split name (default `config.data.test_split`).
    encoder: an `inference.Encoder` of the workdir (default: loaded).
    config: config whose `data` section locates the split (default: the workdir's).
    max_regions: regions shown per image (the most attended ones, in detector order).
  """
  from dsran_jax import data, inference  # pylint: disable=g-import-not-at-top
  encoder = encoder or inference.load(workdir)
  config = config or encoder.config
  split_name = split or config.data.test_split
  ds = data.load_split(config, split_name, workdir)
  rows = []
  for item in images:
    if isinstance(item, (int, np.integer)):
      if not 0 <= int(item) < ds.num_images:
        raise IndexError(f"image index {item} outside [0, {ds.num_images}) of split "
                         f"{split_name!r}")
      rows.append(int(item))
    else:
      ids = [str(i) for i in ds.image_ids]
      if str(item) not in ids:
        raise KeyError(f"unknown image id {item!r} in split {split_name!r} (e.g. "
                       f"{', '.join(ids[:3])})")
      rows.append(ids.index(str(item)))
  arrays = ds.images(np.array(rows))
  att = jsr_attention(encoder, arrays)
  synthetic = config.data.format == "synthetic"
  world = layouts = None
  if synthetic:
    from dsran_jax.data import synthetic as synth  # pylint: disable=g-import-not-at-top
    world, layouts = synth.world_and_layouts(config, split_name)

  fig = _figure((15.0, 3.9 * len(rows)))
  axes = fig.subplots(len(rows), 3, squeeze=False,
                      gridspec_kw={"width_ratios": [1.0, 1.6, 1.5]})
  for n, i in enumerate(rows):
    ax_g, ax_r, ax_t = axes[n]
    grid_w, reg_w = att["grid"], att["regions"][n]
    mask = att["region_mask"][n]
    grid_mass = float(grid_w[n].sum()) if grid_w is not None else 0.0
    desc = world.describe(layouts, i) if synthetic else None
    # -- grid cells
    if grid_w is not None and grid_w.shape[1] == GRID_SIDE * GRID_SIDE:
      heat = grid_w[n].reshape(GRID_SIDE, GRID_SIDE)
      im = ax_g.imshow(heat, cmap="magma", interpolation="nearest")
      fig.colorbar(im, ax=ax_g, fraction=0.046, pad=0.04)
      for o in (desc or {}).get("objects", []):
        ax_g.text(o["col"], o["row"], o["cls"], ha="center", va="center", fontsize=7,
                  color="cyan", fontweight="bold")
      ax_g.set_title(f"grid cells ({100 * grid_mass:.0f}% of attention)", fontsize=9)
      ax_g.set_xticks(range(GRID_SIDE))
      ax_g.set_yticks(range(GRID_SIDE))
    else:
      ax_g.axis("off")
      ax_g.set_title("no grid branch", fontsize=9)
    # -- regions
    real = np.flatnonzero(mask)
    labels = [f"region {k}" for k in range(len(reg_w))]
    if synthetic:
      labels = synthetic_region_labels(world, desc, arrays["region_pos"][n])
    shown = real
    if len(real) > max_regions:  # keep the most attended, shown in detector order
      shown = np.sort(real[np.argsort(-reg_w[real], kind="stable")[:max_regions]])
    ax_r.barh(np.arange(len(shown)), reg_w[shown], color="C0")
    ax_r.set_yticks(np.arange(len(shown)))
    ax_r.set_yticklabels([labels[k] for k in shown], fontsize=7)
    ax_r.invert_yaxis()
    # Uniform attention over all nodes, the reference a trained block departs from.
    n_nodes = (grid_w.shape[1] if grid_w is not None else 0) + len(real)
    ax_r.axvline(1.0 / max(n_nodes, 1), color="0.4", ls="--", lw=0.8, label="uniform")
    ax_r.legend(loc="lower right", fontsize=7)
    ax_r.set_xlabel("attention weight", fontsize=8)
    ax_r.set_title(f"regions ({100 * (1 - grid_mass):.0f}% of attention)", fontsize=9)
    ax_r.grid(axis="x", alpha=0.3)
    # -- captions
    ax_t.axis("off")
    k = ds.captions_per_image
    text = [f"image {ds.image_ids[i]}"]
    if desc:
      # Whatever else the world tells about the image (hard-negative family, ...).
      text += [f"{k}: {v}" for k, v in desc.items() if k != "objects"]
    text += [""] + [f"• {c}" for c in ds.texts[i * k:(i + 1) * k]]
    ax_t.text(0.0, 1.0, "\n".join(_wrap(t, 55) for t in text), va="top", ha="left",
              fontsize=8, transform=ax_t.transAxes)
  fig.suptitle("first JSR graph-attention block: attention averaged over heads and nodes",
               fontsize=10)
  fig.tight_layout()
  return _save(fig, path or os.path.join(workdir, "attention_map.png"))


def _wrap(text: str, width: int) -> str:
  import textwrap  # pylint: disable=g-import-not-at-top
  return "\n  ".join(textwrap.wrap(text, width)) or text


# ------------------------------------------------------------------------- together


def evaluation_figures(workdir: str, config=None, num_attention_images: int = 3,
                       encoder=None) -> Dict[str, str]:
  """Recall curves (and, on synthetic data, an attention map) of a workdir's best
  checkpoint on its test split; returns {figure name: PNG path}.

  Uses `search.Gallery`, so the test embeddings are cached in the workdir and a later
  `python -m dsran_jax.search` reuses them.

  Args:
    workdir: a dsran_jax workdir.
    config: config whose `data` section locates the data (default: the workdir's).
    num_attention_images: test images drawn in `attention_map.png` (synthetic data).
    encoder: an `inference.Encoder` of the workdir (default: loaded).
  """
  from dsran_jax import inference, search  # pylint: disable=g-import-not-at-top
  encoder = encoder or inference.load(workdir)
  config = config or encoder.config
  gallery = search.Gallery.load(workdir, encoder=encoder, config=config)
  step = encoder.meta.get("step")
  out = {"recall_curves": recall_curves(
      gallery, os.path.join(workdir, "recall_curves.png"), cpi=gallery.captions_per_image,
      title=f"Recall@K, {gallery.split_name} split ({gallery.num_images} images)"
            + (f", step {step}" if step is not None else ""))}
  if config.data.format == "synthetic" and num_attention_images > 0:
    n = min(num_attention_images, gallery.num_images)
    out["attention_map"] = attention_map(workdir, list(range(n)), encoder=encoder,
                                         config=config)
  return out
