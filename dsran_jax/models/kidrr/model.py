"""KIDRR (Xie et al., IPM 2023) as a reconstruction on the SGRAF core
(docs/models/kidrr.md): SGRAF's module plus the KIDRR modules, each behind a switch.

- KGID (per item, `kgid.KnowledgeDissemination`) rewrites the regions / words and the
  two globals in `encode_*`, before any pair is formed.
- The multi-level similarity nodes (i2t local, global-local) and the relation-graph
  reconstruction (edge blending, top-k, residual) are `sgraf.similarity.Extensions`
  of SGRAF's per-pair head, so they run inside the same tiled `score`.

With every switch off the module *is* SGRAF's (the same class, the same parameters and
the same code path), so SGRAF weights give SGRAF's scores bit for bit.
"""
from dsran_jax.models.kidrr import config as spec
from dsran_jax.models.kidrr.kgid import KnowledgeDissemination
from dsran_jax.models.sgraf.model import SGRAF
from dsran_jax.models.sgraf.similarity import Extensions


class KidrrConfig(spec.OPTIONS.dataclass("KidrrConfigFields")):
  """Hashable KIDRR switches: every `config.model.kidrr` option (fields, defaults and
  rules from `kidrr.config.OPTIONS`); built by `kidrr.build`."""

  @property
  def extensions(self) -> Extensions:
    """The per-pair switches, as the SGRAF head (`SgrafConfig.ext`) reads them."""
    return Extensions(i2t=self.i2t, lambda_i2t=self.lambda_i2t,
                      global_local=self.global_local, blend=self.rgr_blend,
                      topk=self.rgr_topk, residual=self.rgr_residual,
                      saf_steps=self.saf_steps)


class KIDRR(SGRAF):
  """SGRAF + knowledge dissemination + multi-level nodes + relation-graph reconstruction.

  Reps are SGRAF's (regions, words and globals after KGID), so `score` is SGRAF's head
  with `config.ext` (`kidrr.extensions`) switched on.
  """
  spec = spec
  kidrr: KidrrConfig = KidrrConfig()

  def setup(self):
    super().setup()
    c, k = self.config, self.kidrr
    if k.kgid_steps:
      common = dict(embed_dim=c.embed_size, steps=k.kgid_steps, share_steps=k.kgid_share_steps,
                    dropout_rate=c.sa_dropout, num_regions=c.num_regions,
                    reference_bn=c.reference_bn)
      self.img_kgid = KnowledgeDissemination(modality="image", **common)
      self.txt_kgid = KnowledgeDissemination(modality="text", **common)

  def encode_images(self, batch, train: bool = False):
    reps = super().encode_images(batch, train)
    if not self.kidrr.kgid_steps:
      return reps
    x, g = self.img_kgid(reps["regions"], reps["region_mask"], reps["global"], train)
    return {**reps, "regions": x, "global": g}

  def encode_texts(self, batch, train: bool = False):
    reps = super().encode_texts(batch, train)
    if not self.kidrr.kgid_steps:
      return reps
    x, g = self.txt_kgid(reps["words"], reps["word_mask"], reps["global"], train)
    return {**reps, "words": x, "global": g}
