"""Training strategies; importing this package registers each one in METHODS."""

from methods import boosted, distill, ge, l2w, uniform, ztw  # noqa: F401  (registers)
from methods.base import StepOutput, Strategy  # noqa: F401
