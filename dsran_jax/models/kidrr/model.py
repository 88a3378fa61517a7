"""KIDRR (Xie et al., IPM 2023) as a reconstruction on the SGRAF core (MODELS.md section
4): SGRAF's module plus the KIDRR modules, each behind a switch.

- KGID (per item, `kgid.KnowledgeDissemination`) rewrites the regions / words and the
  two globals in `encode_*`, before any pair is formed.
- The multi-level similarity nodes (i2t local, global-local) and the relation-graph
  reconstruction (edge blending, top-k, residual) are `common.similarity.Extensions`
  of SGRAF's per-pair head, so they run inside the same tiled `score`.

With every switch off the module *is* SGRAF's (the same class, the same parameters and
the same code path), so SGRAF weights give SGRAF's scores bit for bit.
"""
import dataclasses

from dsran_jax.models.kidrr.kgid import KnowledgeDissemination
from dsran_jax.models.sgraf.model import SGRAF


@dataclasses.dataclass(frozen=True)
class KgidConfig:
  """KGID switches: `steps` (T_k, 0 = off) and `share_steps`."""
  steps: int = 0
  share_steps: bool = True

  def __post_init__(self):
    if self.steps < 0:
      raise ValueError(f"config.model.kidrr.kgid_steps={self.steps}: must be >= 0")


class KIDRR(SGRAF):
  """SGRAF + knowledge dissemination + multi-level nodes + relation-graph reconstruction.

  Reps are SGRAF's (regions, words and globals after KGID), so `score` is SGRAF's head
  with `config.ext` switched on.
  """
  kgid: KgidConfig = KgidConfig()

  def setup(self):
    super().setup()
    c, k = self.config, self.kgid
    if k.steps:
      common = dict(embed_dim=c.embed_size, steps=k.steps, share_steps=k.share_steps,
                    dropout_rate=c.sa_dropout, num_regions=c.num_regions,
                    reference_bn=c.reference_bn)
      self.img_kgid = KnowledgeDissemination(modality="image", **common)
      self.txt_kgid = KnowledgeDissemination(modality="text", **common)

  def encode_images(self, batch, train: bool = False):
    reps = super().encode_images(batch, train)
    if not self.kgid.steps:
      return reps
    x, g = self.img_kgid(reps["regions"], reps["region_mask"], reps["global"], train)
    return {**reps, "regions": x, "global": g}

  def encode_texts(self, batch, train: bool = False):
    reps = super().encode_texts(batch, train)
    if not self.kgid.steps:
      return reps
    x, g = self.txt_kgid(reps["words"], reps["word_mask"], reps["global"], train)
    return {**reps, "words": x, "global": g}
