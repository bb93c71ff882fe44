"""Multi-exit backbones; importing this package registers every family in BACKBONES."""

from bench.backbones import msdnet, ranet, sdn, tiny, vit  # noqa: F401  (each module registers its family)
from bench.backbones.contract import MultiExitNet, Truncated, map_state  # noqa: F401
from bench.registry import BACKBONES


def build(section: dict, num_classes: int, in_channels: int = 3, image_size: int = 32) -> MultiExitNet:
    """Build the backbone of a config section `{name, **params}` for the given data shape."""
    values = dict(section)
    return BACKBONES.build(values.pop("name"), values, num_classes=num_classes, in_channels=in_channels,
                           image_size=image_size)
