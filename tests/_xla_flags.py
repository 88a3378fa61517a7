"""The XLA setup of the suite's processes: pytest's (conftest.py) and the ones tests start
(`subprocess_env`, `xla_flags`).

The suite compiles tiny shapes, so compiling dominates its time. It turns most of XLA's
optimisation passes off and compiles with XLA:CPU's older fusion emitters, which cut
about a fifth of the suite's CPU time. A user's run compiles with neither, and so does
`DSRAN_FULL_XLA=1` (.ci/run's second pass): numbers that depend on how XLA fuses the code
show there.
"""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL_XLA = os.environ.get("DSRAN_FULL_XLA") == "1"
FAST_COMPILE_FLAG = "--xla_cpu_use_fusion_emitters=false"
# The probe's answer, inherited by every process of a session.
_PROBED = "DSRAN_TESTS_FAST_COMPILE"


def fast_compile() -> bool:
  """Whether this session's processes compile with FAST_COMPILE_FLAG: not under
  DSRAN_FULL_XLA, and not with a jaxlib that no longer has the flag (an unknown flag in
  XLA_FLAGS aborts every process; asked once per session, in a subprocess)."""
  if FULL_XLA:
    return False
  if _PROBED not in os.environ:
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"],
                           env=dict(os.environ, XLA_FLAGS=FAST_COMPILE_FLAG, JAX_PLATFORMS="cpu"),
                           capture_output=True, timeout=300, check=False)
    os.environ[_PROBED] = "1" if probe.returncode == 0 else "0"
  return os.environ[_PROBED] == "1"


def xla_flags(devices: int = 1) -> str:
  """XLA_FLAGS for a test process with `devices` CPU devices."""
  flags = [f"--xla_force_host_platform_device_count={devices}"] if devices > 1 else []
  return " ".join(flags + ([FAST_COMPILE_FLAG] if fast_compile() else []))


def user_compile() -> dict:
  """`jax.jit(..., compiler_options=user_compile())`: one function compiled as a user's
  run compiles it, inside the suite's settings (the emitters' option only where the suite
  changed them, i.e. where this jaxlib has it)."""
  options = {"xla_backend_optimization_level": 3, "xla_llvm_disable_expensive_passes": False}
  if fast_compile():
    options["xla_cpu_use_fusion_emitters"] = True
  return options


def subprocess_env(devices: int = 1) -> dict:
  """The environment of a `python` subprocess that runs this checkout on `devices` CPU
  devices (a user's run has one)."""
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS=xla_flags(devices))
