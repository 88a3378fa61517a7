"""torch.nn.LSTM, the reference of dsran_jax's PyTorch-layout LSTM (BSSAN's text encoder),
run on packed sequences as a PyTorch text encoder runs it.

Module-level imports: torch, numpy and the standard library only (tests/torchref/__init__.py).
"""
import numpy as np
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


def lstm_packed(x, lengths, hidden, seed, bidirectional=False):
  """torch.nn.LSTM(C, hidden, batch_first=True, bidirectional=...) (default init under
  `seed`) over the packed sequences of x (B, T, C) with `lengths` (any order:
  enforce_sorted=False), padded back with zeros to T.

  Returns:
    {"params": {"lstm": {"w_ih", "b_ih", "w_hh", "b_hh"}, ["lstm_reverse": ...]} in
    dsran_jax's layout ((in, 4H) kernels, gates i, f, g, o as torch orders them),
    "out": (B, T, hidden * directions), "h_n", "c_n": (directions, B, hidden)}.
  """
  torch.manual_seed(seed)
  lstm = torch.nn.LSTM(x.shape[-1], hidden, batch_first=True, bidirectional=bidirectional)
  params = {}
  for name, suffix in (("lstm", ""), ("lstm_reverse", "_reverse")):
    if suffix and not bidirectional:
      continue
    get = lambda w: getattr(lstm, f"{w}_l0{suffix}").detach().numpy()
    params[name] = {"w_ih": get("weight_ih").T.copy(), "b_ih": get("bias_ih").copy(),
                    "w_hh": get("weight_hh").T.copy(), "b_hh": get("bias_hh").copy()}
  packed = pack_padded_sequence(torch.from_numpy(np.ascontiguousarray(x)),
                                [int(n) for n in lengths], batch_first=True,
                                enforce_sorted=False)
  with torch.no_grad():
    out, (h_n, c_n) = lstm(packed)
  ref, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
  return {"params": params, "out": ref.numpy(), "h_n": h_n.numpy(), "c_n": c_n.numpy()}
