"""The attention figure: where a model's attention over image nodes looks (the 7x7 grid
cells and the regions, labelled with object names on synthetic data), next to the
image's captions. A family shows one by exposing the hook
`attention_maps(model, variables, images) -> {"grid", "regions", "region_mask", "title"}`
in its package; `attention_figures` is what
`evaluation_figures` calls after an evaluation."""
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
from matplotlib.colors import TwoSlopeNorm

from dsran_jax import data, inference, models
from dsran_jax.data import synthetic
from dsran_jax.figures.canvas import figure, save, wrap
from dsran_jax.workdir import Workdir

GRID_SIDE = 7


def synthetic_region_labels(world, description: dict, region_pos: np.ndarray) -> List[str]:
  """Names of a synthetic image's regions, as its detector saw them.

  A region's class is the argmax of its class probabilities (the last 1601 columns of
  `region_pos`; the layer norm keeps the order), mapped back to the world's object,
  (part) and [background] names; objects also get their colour from `description`
  (`SyntheticWorld.describe`: an image's classes are distinct).
  """
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


def attention_maps_hook(model_name: str) -> Optional[Callable]:
  """The family's `attention_maps(model, variables, images)` hook, or None if it has no
  attention over image nodes to show."""
  return getattr(models.family(model_name), "attention_maps", None)


def attention_weights(encoder, images: Dict[str, np.ndarray]) -> Dict[str, Any]:
  """The family's attention maps of `images` under a loaded `inference.Matcher`:
  {"grid": (B, cells) or None, "regions": (B, R), "region_mask": (B, R), "title"}."""
  hook = attention_maps_hook(encoder.config.model.name)
  if hook is None:
    raise ValueError(f"config.model.name={encoder.config.model.name!r}: the family has no "
                     f"attention_maps hook")
  return hook(encoder.model, encoder.variables, images)


def attention_map(workdir: str, images: Sequence[Any] = (0,), path: Optional[str] = None,
                  split: Optional[str] = None, encoder=None, config=None,
                  max_regions: int = 20) -> str:
  """The model's attention over image nodes (the family's `attention_maps` hook) for
  some test images; returns the PNG path.

  One row per image: the attention over the 49 grid cells as a 7x7 heatmap (on synthetic
  data with the objects' cells marked), the attention over the regions as bars (labelled
  with the detected object names on synthetic data), and the image's captions.

  Args:
    workdir: a dsran_jax workdir.
    images: image indices (int) or ids (str) of the split.
    path: output PNG (default `{workdir}/attention_map.png`).
    split: split name (default `config.data.test_split`).
    encoder: an `inference.Matcher` of the workdir (default: loaded).
    config: config whose `data` section locates the split (default: the workdir's).
    max_regions: regions shown per image (the most attended ones, in detector order).
  """
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
  att = attention_weights(encoder, arrays)
  on_synthetic = config.data.format == "synthetic"
  world = layouts = None
  if on_synthetic:
    world, layouts = synthetic.world_and_layouts(config, split_name)

  fig = figure((15.0, 3.9 * len(rows)))
  axes = fig.subplots(len(rows), 3, squeeze=False,
                      gridspec_kw={"width_ratios": [1.0, 1.6, 1.5]})
  for n, i in enumerate(rows):
    ax_g, ax_r, ax_t = axes[n]
    grid_w, reg_w = att["grid"], att["regions"][n]
    mask = att["region_mask"][n]
    grid_mass = float(grid_w[n].sum()) if grid_w is not None else 0.0
    desc = world.describe(layouts, i) if on_synthetic else None
    # -- grid cells
    real = np.flatnonzero(mask)
    # Uniform attention over all nodes is the reference a trained block departs from;
    # weights are shown relative to it, on a scale centred there.
    n_nodes = (grid_w.shape[1] if grid_w is not None else 0) + len(real)
    uniform = 1.0 / max(n_nodes, 1)
    if grid_w is not None and grid_w.shape[1] == GRID_SIDE * GRID_SIDE:
      # Within the grid: each cell's share of the grid's attention against an even
      # spread over the cells (the regions usually take most of the mass, which would
      # leave every cell below the all-node uniform and the map one colour).
      cells = grid_w[n] / max(float(grid_w[n].sum()), 1e-12) * grid_w.shape[1]
      heat = cells.reshape(GRID_SIDE, GRID_SIDE)
      im = ax_g.imshow(heat, cmap="RdBu_r", interpolation="nearest",
                       norm=_centred_at_one(heat))
      bar = fig.colorbar(im, ax=ax_g, fraction=0.046, pad=0.04)
      bar.set_label("share ÷ even spread", fontsize=7)
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
    labels = [f"region {k}" for k in range(len(reg_w))]
    if on_synthetic:
      labels = synthetic_region_labels(world, desc, arrays["region_pos"][n])
    shown = real
    if len(real) > max_regions:  # keep the most attended, shown in detector order
      shown = np.sort(real[np.argsort(-reg_w[real], kind="stable")[:max_regions]])
    ax_r.barh(np.arange(len(shown)), reg_w[shown], color="C0")
    ax_r.set_yticks(np.arange(len(shown)))
    ax_r.set_yticklabels([labels[k] for k in shown], fontsize=7)
    ax_r.invert_yaxis()
    ax_r.axvline(uniform, color="0.4", ls="--", lw=0.8, label=f"uniform (1/{n_nodes})")
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
    ax_t.text(0.0, 1.0, "\n".join(wrap(t, 55) for t in text), va="top", ha="left",
              fontsize=8, transform=ax_t.transAxes)
  fig.suptitle(att.get("title", "attention over the image's nodes") + "\n"
               "left: each grid cell's share of the grid's attention ÷ an even spread over "
               "the cells (red: more, blue: less); middle: each region's weight, the dashed "
               "line the uniform weight over all nodes; right: the image's captions",
               fontsize=9)
  fig.tight_layout()
  return save(fig, path or Workdir(workdir).figure_file("attention_map"))


def _centred_at_one(values: np.ndarray):
  """A colour norm with 1 (the uniform weight) at the centre of the map, spanning the
  farthest value on either side, so equal departures get equal colour."""
  spread = max(float(np.max(np.abs(values - 1.0))), 1e-3)
  return TwoSlopeNorm(vcenter=1.0, vmin=max(1.0 - spread, 0.0), vmax=1.0 + spread)


def attention_figures(workdir: str, config, num_images: int = 3,
                      encoder=None) -> Dict[str, str]:
  """The attention map of the first test images, for a family with an `attention_maps`
  hook on synthetic data (whose objects are known, so the figure can be read); {}
  otherwise."""
  if (config.data.format != "synthetic" or num_images <= 0
      or attention_maps_hook(config.model.name) is None):
    return {}
  return {"attention_map": attention_map(workdir, list(range(num_images)), encoder=encoder,
                                         config=config)}
