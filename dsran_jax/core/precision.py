"""Which compute dtype a `model.dtype="bfloat16"` run gets on this machine.

bf16 pays off only where the backend multiplies bf16 natively. GPUs and TPUs do. On a
CPU, XLA's bf16 dots (YNNPACK) are fast on some units and slower than fp32 on others,
so a bf16 request is honoured only where it was measured to beat fp32
(docs/benchmarks.md, "bf16 by CPU kind"):

- AMX (`amx_bf16`; Intel Sapphire Rapids and later): bf16 dots ~5x fp32 -> bf16.
- AVX512-BF16 on AMD (`avx512_bf16`, Zen 4 and later): ~2x (vdpbf16ps at the FMA rate,
  two products each); the DSRAN step 1.6x faster than fp32 -> bf16.
- AVX512-BF16 on Intel without AMX (Cooper Lake, or AMX hidden by a hypervisor): the
  DSRAN step 1.07-1.19x slower than fp32 -> fp32.
- No bf16 units (AVX2 only, AVX-512 without BF16, other ISAs): emulated -> fp32.

Where bf16 would be slower, the run computes in fp32 and says so in its first lines;
`model.bf16_on_cpu="always"` keeps bf16 anyway (to measure it).
"""
import functools
from typing import Optional, Tuple

BF16 = "bfloat16"
FP32 = "float32"


@functools.lru_cache(maxsize=None)
def _proc_cpuinfo() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return f.read()
  except OSError:
    return ""


def _field(cpuinfo: str, name: str) -> str:
  for line in cpuinfo.splitlines():
    key, _, value = line.partition(":")
    if key.strip() == name:
      return value.strip()
  return ""


def cpu_bf16_native(cpuinfo: Optional[str] = None) -> Tuple[bool, str]:
  """Whether this CPU runs bf16 matmuls faster than fp32 (see the module table), and
  the units that decide it, from `/proc/cpuinfo` (or the `cpuinfo` text given)."""
  info = _proc_cpuinfo() if cpuinfo is None else cpuinfo
  flags = set(_field(info, "flags").split())
  vendor = _field(info, "vendor_id")
  if "amx_bf16" in flags:
    return True, "AMX-BF16"
  if "avx512_bf16" in flags and vendor == "AuthenticAMD":
    return True, "AVX512-BF16 on AMD"
  if "avx512_bf16" in flags:
    return False, "AVX512-BF16 without AMX on Intel: bf16 dots run no faster than fp32"
  if not info:
    return False, "no /proc/cpuinfo to read the CPU's bf16 units from"
  return False, "no bf16 units (no AMX, no AVX512-BF16): bf16 would be emulated"


def compute_dtype(requested: str, bf16_on_cpu: str = "auto", backend: str = "cpu",
                  cpuinfo: Optional[str] = None) -> Tuple[str, str]:
  """The dtype a run computes in for `model.dtype=requested`, and a note ("" when the
  request stands) saying why it does not.

  Args:
    requested: "float32" or "bfloat16" (`config.model.dtype`).
    bf16_on_cpu: "auto" (bf16 only where the CPU runs it natively) or "always".
    backend: `jax.default_backend()`; GPUs and TPUs always run bf16.
    cpuinfo: the text of /proc/cpuinfo (tests); None reads this machine's.
  """
  if requested != BF16 or backend != "cpu" or bf16_on_cpu == "always":
    return requested, ""
  native, units = cpu_bf16_native(cpuinfo)
  if native:
    return BF16, ""
  return FP32, (f"model.dtype=bfloat16 computes in float32 on this CPU ({units}); "
                f"set model.bf16_on_cpu=always to run bf16 anyway")
