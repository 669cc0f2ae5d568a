"""Which classes of an ImageNet-layout dataset a run uses: all, the authors' ImageNet-Sub (the
first 100 in sorted order, `--imagenetsub`), or a range of positions in that order (`--classes
101-200`: the second hundred), so that a finding can be replicated on classes the study never saw.

Positions count from 1 in the sorted order of the class folders (ImageFolder's), inclusive at both
ends, so `--classes 1-100` selects exactly what `--imagenetsub` does; the selected classes get the
labels 0..n-1 in that order.
"""

from __future__ import annotations

from typing import Sequence

from cclnb.config import check_class_selection, parse_class_range
from cclnb.errors import ConfigError

IMAGENET_SUB_CLASSES = 100  # the authors' ImageNet-Sub: the first 100 classes in sorted order


def select_classes(classes: Sequence[str], imagenetsub: bool, class_range: str | None,
                   where: str) -> list[str]:
    """The sorted class names `classes` narrowed to the selection; `where` names the split's folder."""
    check_class_selection(imagenetsub, class_range)
    if imagenetsub:
        if len(classes) < IMAGENET_SUB_CLASSES:
            raise ConfigError(f"--imagenetsub keeps the first {IMAGENET_SUB_CLASSES} classes, but "
                              f"{where} has only {len(classes)}; drop --imagenetsub")
        return list(classes[:IMAGENET_SUB_CLASSES])
    if class_range is None:
        return list(classes)
    first, last = parse_class_range(class_range)
    if last > len(classes):
        raise ConfigError(f"--classes {class_range} reaches class {last}, but {where} has {len(classes)} "
                          f"classes; choose a range within 1-{len(classes)}")
    return list(classes[first - 1:last])


def selection_suffix(imagenetsub: bool, class_range: str | None) -> str:
    """What a dataset's name gains from the selection ('-imagenetsub', '-classes101-200' or '')."""
    if imagenetsub:
        return "-imagenetsub"
    if class_range is None:
        return ""
    first, last = parse_class_range(class_range)
    return f"-classes{first}-{last}"
