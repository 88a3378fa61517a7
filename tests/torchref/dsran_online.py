"""PyTorch reference of DSRAN's online grid: the authors' BERT-build training step.

Written after kywen1119/DSRAN `model_bert.py` (`ImageEncoder`, `DSRAN.forward`,
`ContrastiveLoss`, `VSE.train_start` / `train_emb`) and `data_bert.py`
(`get_transform`: `ToTensor()` + ImageNet `Normalize` after the crop): the frozen CNN
(`requires_grad = False`) runs inside the model, in train mode because `train_start`
calls `self.DSRAN.train()` on the whole model, so its BatchNorm normalises with the
batch's statistics and moves its running statistics; its last map, `(B, C, h, w)` viewed
as `(B, h*w, C)`, is the grid `img_enc.fc` and `gat_1` read. The CNN is transformers'
`ResNetModel` (torchvision's maths, see `torchref/resnet.py`), with random weights and
BatchNorm statistics; the rest is `torchref/dsran.py`'s BERT-build DSRAN.

Dropout is set to 0 (the JAX side skips its Dropout modules): the step's other
randomness is the crops, which both sides take as given pixels.
"""
import os

import numpy as np
import torch
from torch import nn
from transformers import ResNetModel

from torchref import dsran, resnet

_MODELS = {}  # model dir -> the DSRAN with its online CNN
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def make(model_dir: str, K: int, bert: dict, dims: dict, cnn: dict, torch_seed: int,
         init_seed: int, calib_pixels: np.ndarray) -> dict:
  """Builds a random BERT-build DSRAN whose `img_enc.cnn` is a random ResNet (`cnn`:
  `depths`, `hidden_sizes`, `embedding_size` of HF's ResNetConfig), frozen as theirs.

  Returns:
    {"state": the model's state dict (their keys, no `module.`) as numpy,
     "cnn_weights": the CNN in torchvision names (`.safetensors`, `fc.*` included)}.
  """
  files = resnet.build(os.path.join(model_dir, "cnn"), cnn["depths"], cnn["hidden_sizes"],
                       cnn["embedding_size"], seed=init_seed, calib_pixels=calib_pixels)
  model = dsran._bert_model(K, bert, dims, torch_seed, init_seed)  # pylint: disable=protected-access
  trunk = ResNetModel(resnet._model(os.path.join(model_dir, "cnn")).config)  # pylint: disable=protected-access
  trunk.load_state_dict(resnet._model(os.path.join(model_dir, "cnn")).state_dict(),  # pylint: disable=protected-access
                        strict=True)
  model.img_enc.cnn = trunk
  for p in model.img_enc.cnn.parameters():  # their `if not opt.ft_res`
    p.requires_grad = False
  _MODELS[model_dir] = model
  return {"state": {k: v.detach().numpy().copy() for k, v in model.state_dict().items()},
          "cnn_weights": files["tv"]}


def _to_tensor_normalize(pixels: np.ndarray) -> torch.Tensor:
  """Their `ToTensor()` + `Normalize(mean, std)` of uint8 NHWC crops -> NCHW float."""
  x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float().div(255)
  mean = torch.tensor(MEAN).view(1, 3, 1, 1)
  std = torch.tensor(STD).view(1, 3, 1, 1)
  return (x - mean) / std


def _contrastive(img, cap, margin):
  """Their `ContrastiveLoss` (hardest negatives, summed)."""
  scores = img.mm(cap.t())
  diagonal = scores.diag().view(img.size(0), 1)
  cost_s = (margin + scores - diagonal.expand_as(scores)).clamp(min=0)
  cost_im = (margin + scores - diagonal.t().expand_as(scores)).clamp(min=0)
  mask = torch.eye(scores.size(0)) > .5
  cost_s = cost_s.masked_fill_(mask, 0)
  cost_im = cost_im.masked_fill_(mask, 0)
  return cost_s.max(1)[0].sum() + cost_im.max(0)[0].sum()


def train_emb(model_dir: str, pixels: np.ndarray, regions: np.ndarray, pos: np.ndarray,
              ids: np.ndarray, margin: float) -> dict:
  """One `train_emb` on given crops (uint8 NHWC), up to the gradients (the optimiser
  update is the tests' concern elsewhere).

  Returns:
    {"loss", "grad_norm": global norm of the gradients of the parameters that have one,
     "state": the state dict after the step (numpy), "grid": the CNN grid (B, h*w, C)}.
  """
  model = _MODELS[model_dir]
  model.train()  # their train_start: the frozen CNN's BatchNorm too
  for m in model.modules():
    if isinstance(m, nn.Dropout):
      m.p = 0.0
  model.zero_grad(set_to_none=True)
  fmap = model.img_enc.cnn(pixel_values=_to_tensor_normalize(pixels)).last_hidden_state
  grid = fmap.view(fmap.size(0), fmap.size(1), -1).transpose(2, 1)
  img = model.embed_images(grid, torch.from_numpy(regions), torch.from_numpy(pos))
  cap = model.embed_texts(torch.from_numpy(ids))
  loss = _contrastive(img, cap, margin)
  loss.backward()
  grads = [p.grad for p in model.parameters() if p.grad is not None]
  assert all(p.grad is None for p in model.img_enc.cnn.parameters())
  grad_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
  return {"loss": float(loss.detach()), "grad_norm": float(grad_norm),
          "state": {k: v.detach().numpy().copy() for k, v in model.state_dict().items()},
          "grid": grid.detach().numpy().copy()}
