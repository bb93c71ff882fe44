"""Training strategies; importing this package registers each one in METHODS."""

from methods import boosted, byot, cagrad, distill, ge, kd_anneal, l2w, meta_gf, pcgrad, sdn, uniform, ztw  # noqa: F401
from methods.base import StepOutput, Strategy  # noqa: F401
