"""Evaluation: scorers (`scorer`), the retrieval protocols (`retrieval`), short lists
shared with search (`shortlist`), two-stage re-ranking (`two_stage`), and the evaluator
seam (`registry`) that `runner.evaluate_workdir` runs.

The names below are the package's public API; importing the evaluator modules here is
what registers them.
"""
# Importing the evaluator modules registers them.
from dsran_jax.evaluation import registry, retrieval, shortlist, two_stage  # noqa: F401
# After retrieval: the eccv evaluator reads the sims matrix the retrieval evaluator writes.
from dsran_jax.evaluation import eccv
from dsran_jax.evaluation.registry import Outcome, Task, register
from dsran_jax.evaluation.retrieval import (evaluate, evaluate_split, format_table, headline,
                                            protocol_label, protocol_of)
from dsran_jax.evaluation.runner import evaluate_workdir
from dsran_jax.evaluation.scorer import (EmbeddingScorer, Interrupted, ModelScorer, Scorer,
                                         check_finite, compute_sims_blocks, encode_all,
                                         leading_dim, local_mesh, make_scorer)

__all__ = ["EmbeddingScorer", "Interrupted", "ModelScorer", "Outcome", "Scorer", "Task",
           "check_finite", "compute_sims_blocks", "eccv", "encode_all", "evaluate",
           "evaluate_split", "evaluate_workdir", "format_table", "headline", "leading_dim", "local_mesh",
           "make_scorer", "protocol_label", "protocol_of", "register", "registry",
           "retrieval", "shortlist", "two_stage"]
