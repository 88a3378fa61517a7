"""Region position/class input of the BERT build: `region_pos (R, 1607)` per image.

Reproduces the authors' `get_rcnn` (data_bert.py) in numpy:
  1. x1, x2 are divided by max(x1, x2 over the image's boxes) + 1e-5, y1, y2 by
     max(y1, y2) + 1e-5 (a "lazy" estimate of the image size);
  2. column 4 becomes the relative area (x2-x1)*(y2-y1) of the normalised box, clamped at 0;
     column 5 (the detector score) is kept;
  3. layer_norm of that 6-vector and, separately, of the 1601 class probabilities (no affine,
     eps 1e-5, biased variance, as torch.nn.functional.layer_norm), concatenated.

dtype follows torch: the authors load boxes from HDF5 without `.float()`, so float64 boxes
are normalised in float64 (and class probabilities in their own dtype); the result is cast
to float32 at the end, where the model consumes it.
"""
import numpy as np

NUM_CLASSES = 1601
BOX_DIM = 6
POS_DIM = BOX_DIM + NUM_CLASSES
_EPS = 1e-5


def _compute_dtype(dtype):
  # torch keeps float64 as is and the authors' .float() / default dtype gives float32
  # for everything else.
  return np.float64 if dtype == np.float64 else np.float32


def layer_norm(x: np.ndarray, eps: float = _EPS) -> np.ndarray:
  """torch F.layer_norm over the last axis without affine parameters, in x's dtype.

  Follows torch's CPU kernel (rstd = 1/sqrt(var + eps) rounded to x's dtype, then
  y = (x - mean) * rstd). The moments are accumulated in float64 where torch accumulates
  float32 inputs in float32, so float32 results differ from torch by a few ulp (relative
  1e-6 at most); float64 inputs agree to double precision.
  """
  dt = x.dtype.type
  mean = x.mean(axis=-1, dtype=np.float64, keepdims=True).astype(dt)
  d = x - mean
  var = np.einsum("...i,...i->...", d, d, dtype=np.float64)[..., None] / x.shape[-1]
  rstd = (dt(1) / np.sqrt(var.astype(dt) + dt(eps))).astype(dt)
  return d * rstd


def region_pos(boxes, cls_prob, dtype=np.float32) -> np.ndarray:
  """Position/class encoding of an image's regions.

  Args:
    boxes: (R, 6) detector boxes: x1, y1, x2, y2, (unused: replaced by area), score.
    cls_prob: (R, 1601) class probabilities of the Visual Genome detector.
    dtype: output dtype; float32 is what the model consumes (float64 for parity tests).

  Returns:
    (R, 1607) `dtype`: layer_norm(6-d box vector) ++ layer_norm(class probabilities).
  """
  boxes = np.asarray(boxes)
  cls_prob = np.asarray(cls_prob)
  if boxes.ndim != 2 or boxes.shape[1] != BOX_DIM:
    raise ValueError(f"region_pos: boxes must be (R, {BOX_DIM}), got {boxes.shape}")
  if cls_prob.ndim != 2 or cls_prob.shape != (boxes.shape[0], NUM_CLASSES):
    raise ValueError(
        f"region_pos: cls_prob must be ({boxes.shape[0]}, {NUM_CLASSES}) for "
        f"{boxes.shape[0]} boxes, got {cls_prob.shape}")
  bdt = _compute_dtype(boxes.dtype)
  b = boxes.astype(bdt, copy=True)
  # Explicit scalar dtypes: under numpy < 2 a python float would promote to float64.
  w_est = bdt(b[:, [0, 2]].max() * bdt(1.0)) + bdt(_EPS)
  h_est = bdt(b[:, [1, 3]].max() * bdt(1.0)) + bdt(_EPS)
  b[:, [0, 2]] /= w_est
  b[:, [1, 3]] /= h_est
  rel_area = (b[:, 3] - b[:, 1]) * (b[:, 2] - b[:, 0])
  rel_area = np.where(rel_area < 0, bdt(0), rel_area)  # clamp(0); keeps NaN like torch
  vis = np.concatenate([b[:, :4], rel_area[:, None], b[:, 5:]], axis=1)
  cls = cls_prob.astype(_compute_dtype(cls_prob.dtype), copy=False)
  return np.concatenate(
      [layer_norm(vis).astype(dtype), layer_norm(cls).astype(dtype)], axis=1)
