"""torch.nn layers the jax layers are checked against: BatchNorm1d, GRU, and the
authors' region_pos formula (torch layer norms)."""
import torch
from torch.nn import functional as F


def batchnorm1d(x, train_steps):
  """torch.nn.BatchNorm1d(C) (fresh: momentum 0.1, eps 1e-5) over x (B, N, C) on the
  channel axis, as the authors' GAT applies it (permute to (B, C, N) and back).

  Returns:
    {"train": the train-mode output of each of `train_steps` calls, "running_mean",
    "running_var": the statistics after them, "eval": the eval-mode output then}.
  """
  bn = torch.nn.BatchNorm1d(x.shape[-1])
  run = lambda: bn(torch.from_numpy(x).permute(0, 2, 1)).permute(0, 2, 1).detach().numpy()
  bn.train()
  train = [run() for _ in range(train_steps)]
  bn.eval()
  return {"train": train, "running_mean": bn.running_mean.numpy().copy(),
          "running_var": bn.running_var.numpy().copy(), "eval": run()}


def gru_packed(x, lengths, hidden, seed):
  """torch.nn.GRU(C, hidden, batch_first=True) (default init under `seed`) over the
  packed sequences of x (B, T, C) with `lengths` (decreasing), padded back with zeros.

  Returns:
    {"params": {"w_ih", "b_ih", "w_hh", "b_hh"} in dsran_jax's layout ((in, 3H) kernels,
    gates r, z, n as torch orders them), "out": (B, T, hidden)}.
  """
  torch.manual_seed(seed)
  gru = torch.nn.GRU(x.shape[-1], hidden, batch_first=True)
  params = {"w_ih": gru.weight_ih_l0.detach().numpy().T.copy(),
            "b_ih": gru.bias_ih_l0.detach().numpy().copy(),
            "w_hh": gru.weight_hh_l0.detach().numpy().T.copy(),
            "b_hh": gru.bias_hh_l0.detach().numpy().copy()}
  packed = torch.nn.utils.rnn.pack_padded_sequence(
      torch.from_numpy(x), [int(n) for n in lengths], batch_first=True)
  out, _ = gru(packed)
  ref, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
  return {"params": params, "out": ref.detach().numpy()}


def region_pos(boxes, cls):
  """The authors' get_rcnn (boxes (R, 6) = x1, y1, x2, y2, class, score; cls (R, 1601)
  class probabilities), transcribed to run on arrays; float32 or float64 as given."""
  vis_pe, cls_label = torch.from_numpy(boxes.copy()), torch.from_numpy(cls.copy())
  w_est = torch.max(vis_pe[:, [0, 2]]) * 1. + 1e-5
  h_est = torch.max(vis_pe[:, [1, 3]]) * 1. + 1e-5
  vis_pe[:, [0, 2]] /= w_est
  vis_pe[:, [1, 3]] /= h_est
  rel_area = (vis_pe[:, 3] - vis_pe[:, 1]) * (vis_pe[:, 2] - vis_pe[:, 0])
  rel_area.clamp_(0)
  vis_pe = torch.cat((vis_pe[:, :4], rel_area.view(-1, 1), vis_pe[:, 5:]), -1)
  return torch.cat((F.layer_norm(vis_pe, [6]), F.layer_norm(cls_label, [1601])), -1).numpy()

