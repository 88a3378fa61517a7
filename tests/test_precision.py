"""The bf16 rule by CPU kind (core/precision.py) and how a run applies it."""
import pytest

from dsran_jax import models
from dsran_jax.core import precision
from dsran_jax.default_config import get_base_config


def _cpuinfo(vendor, *flags):
  return (f"processor\t: 0\nvendor_id\t: {vendor}\nmodel name\t: x\n"
          f"flags\t\t: fpu sse avx2 avx512f {' '.join(flags)}\n")


AMX_XEON = _cpuinfo("GenuineIntel", "avx512_bf16", "amx_tile", "amx_bf16")
BF16_XEON = _cpuinfo("GenuineIntel", "avx512_bf16", "avx512_vnni")
ZEN4 = _cpuinfo("AuthenticAMD", "avx512_bf16", "avx512_vnni")
ZEN3 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse avx2 fma\n"


@pytest.mark.parametrize("info, native", [(AMX_XEON, True), (ZEN4, True),
                                          (BF16_XEON, False), (ZEN3, False), ("", False)])
def test_cpu_bf16_native_by_units(info, native):
  got, units = precision.cpu_bf16_native(info)
  assert got is native and units


@pytest.mark.parametrize("info, want", [(AMX_XEON, "bfloat16"), (ZEN4, "bfloat16"),
                                        (BF16_XEON, "float32"), (ZEN3, "float32")])
def test_bf16_request_on_cpu_follows_the_units(info, want):
  dtype, note = precision.compute_dtype("bfloat16", "auto", "cpu", info)
  assert dtype == want
  assert bool(note) == (want == "float32")
  if note:
    assert "model.bf16_on_cpu=always" in note


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_accelerators_and_always_keep_bf16_and_fp32_stays(backend):
  assert precision.compute_dtype("bfloat16", "auto", backend, ZEN3) == ("bfloat16", "")
  assert precision.compute_dtype("bfloat16", "always", "cpu", ZEN3) == ("bfloat16", "")
  assert precision.compute_dtype("float32", "auto", "cpu", AMX_XEON) == ("float32", "")


def test_build_model_computes_in_the_resolved_dtype(monkeypatch):
  c = get_base_config()
  c.model.dtype = "bfloat16"
  c.model.dsran.text_encoder = "gru"
  monkeypatch.setattr(precision, "_proc_cpuinfo", lambda: ZEN3)
  assert models.compute_dtype(c.model, "cpu")[0] == "float32"
  assert models.build_model(c.model, 50).config.dtype == "float32"
  assert c.model.dtype == "bfloat16"  # the user's config is left as written
  monkeypatch.setattr(precision, "_proc_cpuinfo", lambda: ZEN4)
  assert models.build_model(c.model, 50).config.dtype == "bfloat16"
  c.model.bf16_on_cpu = "always"
  monkeypatch.setattr(precision, "_proc_cpuinfo", lambda: ZEN3)
  assert models.build_model(c.model, 50).config.dtype == "bfloat16"
