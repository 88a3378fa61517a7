"""PyTorch references, run in a separate process that never imports jax or TensorFlow.

Why: with the registry's default (CUDA) torch build, importing `transformers`' PyTorch
models into a process that already holds jax and TensorFlow segfaults inside triton's
import. The parity tests therefore never import torch themselves: every torch-side
computation (building a reference model from the authors' code, saving it in their
checkpoint layout, running it) is a function in a module of this package, called through
`TorchRef`, which runs it in one long-lived child process started with the `spawn`
method (a fresh interpreter, not a fork of the jax process).

Contract for a reference module `tests/torchref/<name>.py`:
- module level imports only torch, transformers, numpy and the standard library;
- its public functions take and return picklable values: numpy arrays, paths (str),
  dicts/lists/tuples of those, numbers and strings. Tensors never cross the boundary.

Use from a test through the session fixture `torch_ref` (tests/conftest.py):

    out = torch_ref("scan.reference_sims", ckpt_path=str(tmp_path / "m.pth.tar"), ...)
"""
import concurrent.futures
import multiprocessing
import os
import sys
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
_FORBIDDEN = ("jax", "jaxlib", "tensorflow", "flax")


def _call(target: str, kwargs: dict) -> Any:
  """Runs in the child: imports `torchref.<module>` and calls `<function>(**kwargs)`."""
  import importlib  # pylint: disable=g-import-not-at-top
  present = [m for m in _FORBIDDEN if m in sys.modules]
  if present:
    raise RuntimeError(f"torch reference process has {present} imported; it must stay "
                       "free of jax/TensorFlow (see tests/torchref/__init__.py)")
  module_name, _, fn_name = target.rpartition(".")
  module = importlib.import_module(f"torchref.{module_name}")
  out = getattr(module, fn_name)(**kwargs)
  present = [m for m in _FORBIDDEN if m in sys.modules]
  if present:
    raise RuntimeError(f"torchref.{module_name} imported {present}")
  return out


def _init_child(path: str) -> None:
  if path not in sys.path:
    sys.path.insert(0, path)
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
  import torch  # pylint: disable=g-import-not-at-top
  # Two cores are shared with the jax process; deterministic float32 reference maths.
  torch.set_num_threads(1)


class TorchRef:
  """Callable handle on the reference process: `ref("module.function", **kwargs)`."""

  def __init__(self):
    ctx = multiprocessing.get_context("spawn")
    self._pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=1, mp_context=ctx, initializer=_init_child,
        initargs=(os.path.dirname(_HERE),))

  def __call__(self, target: str, **kwargs) -> Any:
    return self._pool.submit(_call, target, kwargs).result()

  def close(self) -> None:
    self._pool.shutdown(wait=True, cancel_futures=True)
