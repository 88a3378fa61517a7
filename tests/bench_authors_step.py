"""DSRAN's train step against the authors' PyTorch step, side by side in one run.

    PYTHONPATH=tests:. python tests/bench_authors_step.py [--rounds=2] [--steps=6]

Alternates, `--rounds` times: ours fp32 (`dsran_jax.benchmark`, a subprocess), theirs
fp32, ours bf16 (`--bf16`), theirs under `torch.autocast("cpu", bfloat16)`, at the shape
of docs/benchmarks.md (batch 32, embed 1024, BERT 6x384, K=2, 100 regions + 1607-d
positions, 49 grid cells, 32 tokens). Theirs is `tests/torchref/dsran.TorchDSRANBert`
(written from their model_bert.py) in train mode: forward, their ContrastiveLoss (margin
0.2, hardest negatives), backward and their BertAdam update (per-parameter clipping at
1.0, no bias correction, weight decay 0.01 off biases and LayerNorm), torch's default
thread count; median of `--steps` after 2 warm-up steps. Prints one JSON line per run
and a summary with the ratios and the load average before and after.

The authors' step is only comparable on a quiet machine: under load torch's threads lose
far more than XLA's (see docs/benchmarks.md); the summary's `load_start` says which.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

B, E, REGIONS, GRID, SEQ, IMG, POS = 32, 1024, 100, 49, 32, 2048, 1607
BERT = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
            intermediate_size=1536, vocab_size=30522, max_position_embeddings=512)


def _load() -> float:
  with open("/proc/loadavg") as f:
    return float(f.read().split()[0])


def ours(bf16: bool, steps: int) -> dict:
  cmd = [sys.executable, "-m", "dsran_jax.benchmark", f"--batch_size={B}",
         f"--embed_size={E}", "--bert_layers=6", "--bert_hidden=384", "--K=2",
         f"--regions={REGIONS}", f"--seq_len={SEQ}", f"--steps={steps}"]
  if bf16:
    cmd.append("--bf16")
  out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
  r = json.loads(out.strip().splitlines()[-1])
  return {"run": "ours bf16" if bf16 else "ours fp32", "step_s": r["step_s"],
          "step_cpu_s": r["step_cpu_s"], "flops_per_step": r["flops_per_step"],
          "matmul_peak_gflops": r["matmul_peak_gflops"], "mfu": r["mfu"],
          "compute_dtype": r.get("compute_dtype"), "cpu_model": r.get("cpu_model")}


class BertAdam:
  """pytorch_pretrained_bert's BertAdam as their train.py configures it (warmup only
  scales lr; the first steps run at lr x warmup fraction, which does not change the cost)."""

  def __init__(self, named_params, lr=2e-5, b1=0.9, b2=0.999, eps=1e-6, wd=0.01, clip=1.0):
    import torch  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.groups = [(p, 0.0 if ("bias" in n or "LayerNorm" in n) else wd)
                   for n, p in named_params if p.requires_grad]
    self.state = {id(p): (torch.zeros_like(p), torch.zeros_like(p)) for p, _ in self.groups}
    self.lr, self.b1, self.b2, self.eps, self.clip = lr, b1, b2, eps, clip

  def step(self):
    torch = self.torch
    with torch.no_grad():
      for p, wd in self.groups:
        if p.grad is None:
          continue
        torch.nn.utils.clip_grad_norm_(p, self.clip)
        m, v = self.state[id(p)]
        m.mul_(self.b1).add_(p.grad, alpha=1 - self.b1)
        v.mul_(self.b2).addcmul_(p.grad, p.grad, value=1 - self.b2)
        update = m / (v.sqrt() + self.eps)
        if wd:
          update += wd * p
        p.add_(update, alpha=-self.lr)


def theirs(autocast: bool, steps: int, warmup: int = 2) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from torchref import dsran, dsran_online  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  cfg = transformers.BertConfig(**BERT, attn_implementation="eager")
  model = dsran.TorchDSRANBert(2, cfg, {"embed": E, "img": IMG, "pos": POS})
  model.img_enc.cnn = None  # precomputed grids, as their extracted-feature runs
  model.train()
  opt = BertAdam(model.named_parameters())
  rng = np.random.default_rng(0)
  grid = torch.from_numpy(rng.standard_normal((B, GRID, IMG), np.float32))
  regions = torch.from_numpy(rng.standard_normal((B, REGIONS, IMG), np.float32))
  pos = torch.from_numpy(rng.random((B, REGIONS, POS), np.float32))
  ids = torch.from_numpy(rng.integers(1000, 30000, (B, SEQ)))
  times, cpus = [], []
  for k in range(warmup + steps):
    t, c = time.perf_counter(), time.process_time()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
      img = model.embed_images(grid, regions, pos)
      cap = model.embed_texts(ids)
      # pylint: disable-next=protected-access
      loss = dsran_online._contrastive(img.float(), cap.float(), 0.2)
    loss.backward()
    opt.step()
    if k >= warmup:
      times.append(time.perf_counter() - t)
      cpus.append(time.process_time() - c)
  return {"run": "theirs autocast bf16" if autocast else "theirs fp32",
          "step_s": statistics.median(times), "step_cpu_s": statistics.median(cpus),
          "threads": torch.get_num_threads(), "torch": torch.__version__}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--steps", type=int, default=6)
  args = p.parse_args()
  load0, t0 = _load(), time.perf_counter()
  runs = []
  for _ in range(args.rounds):
    for fn, flag in ((ours, False), (theirs, False), (ours, True), (theirs, True)):
      r = dict(fn(flag, args.steps), load=_load())
      print(json.dumps(r), flush=True)
      runs.append(r)
  med = {name: statistics.median(r["step_s"] for r in runs if r["run"] == name)
         for name in ("ours fp32", "theirs fp32", "ours bf16", "theirs autocast bf16")}
  fp32 = next(r for r in runs if r["run"] == "ours fp32")
  print(json.dumps({
      "summary": med, "fp32_vs_theirs": med["theirs fp32"] / med["ours fp32"],
      "bf16_vs_their_autocast": med["theirs autocast bf16"] / med["ours bf16"],
      "ours_bf16_vs_ours_fp32": med["ours fp32"] / med["ours bf16"],
      "ours_fp32_roofline": statistics.median(r["mfu"] for r in runs if r["run"] == "ours fp32"),
      "flops_per_step": fp32["flops_per_step"], "cpu_model": fp32["cpu_model"],
      "cpu_count": os.cpu_count(), "load_start": load0, "load_end": _load(),
      "total_s": time.perf_counter() - t0}), flush=True)


if __name__ == "__main__":
  main()
