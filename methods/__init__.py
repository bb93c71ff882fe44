"""Training strategies; importing this package registers each one in METHODS."""

from methods import (  # noqa: F401
    block_dependent,
    boosted,
    byot,
    cagrad,
    dfs,
    distill,
    ge,
    kd_anneal,
    l2w,
    meta_gf,
    pcgrad,
    sdn,
    uniform,
    ztw,
)
from methods.base import StepOutput, Strategy  # noqa: F401
