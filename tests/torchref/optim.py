"""torch.optim references for dsran_jax.optim."""
import numpy as np
import torch


def adam_clipped(w, grads, lrs, clip):
  """torch.optim.Adam (defaults) on one parameter after clip_grad_norm_(clip), one step
  per gradient with learning rate `lrs[step]`; returns the final parameter."""
  tw = torch.nn.Parameter(torch.from_numpy(w.copy()))
  opt = torch.optim.Adam([tw], lr=float(lrs[0]))
  for g, lr in zip(grads, lrs):
    for group in opt.param_groups:
      group["lr"] = float(lr)
    tw.grad = torch.from_numpy(np.array(g, copy=True))
    torch.nn.utils.clip_grad_norm_([tw], clip)
    opt.step()
  return tw.detach().numpy().copy()
