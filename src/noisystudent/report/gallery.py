"""The pseudo-label gallery: thumbnails of pool images by predicted class and confidence.

:func:`pseudo_label_gallery` is the hook: give it the candidates :func:`.collect.collect_run`
picked from a label store (``gallery_size`` > 0) and a callable ``load(key) -> PIL.Image`` that
reads one unlabeled image by its store key, and it returns a :class:`~.document.Gallery` with,
for each predicted class, three strips of at most ``per_strip`` thumbnails captioned with the
teacher's confidence: the most confident images, the least confident ones the threshold kept, and
the most confident ones it dropped (the images just below the threshold). The report calls it
when :func:`noisystudent.report.build_report` gets ``load_image``.

Thumbnails are small PNGs (``size`` px, aspect kept, padded to a square; small images are
enlarged without smoothing so their pixels stay visible) embedded as data URIs in the HTML; the
Markdown twin gets each strip as one PNG file. An image the loader cannot read is shown as a gap
and counted, never fatal.
"""

from __future__ import annotations

import io
import math
from typing import Callable, Mapping, Sequence

from .collect import GalleryItem
from .document import Gallery, Strip, Thumb

THUMB_PX = 32
PER_STRIP = 8
MAX_CLASSES = 20  # classes shown (the first ones, in class order)
GAP_PX = 2
KIND_TITLES = {"most": "most confident", "least": "least confident kept", "dropped": "dropped by the threshold"}

ImageLoader = Callable[[str], "object"]  # key -> PIL.Image.Image


def pool_loader(pool, galleries: Sequence[Mapping[str, Mapping[int, Sequence[GalleryItem]]] | None]) -> ImageLoader:
    """``load(key)`` for the picked images of ``galleries``, read from the unlabeled pool's source
    (a :class:`noisystudent.data.pool.UnlabeledSource`) by random access: ``open_item(shard, index, key)``."""
    from ..data.pool import decode_image

    where = {item.key: (item.shard, item.index) for g in galleries if g
             for per_class in g.values() for items in per_class.values() for item in items}

    def load(key: str):
        shard, index = where[key]
        return decode_image(pool.open_item(shard, index, key))

    return load


def thumbnail(image, size: int = THUMB_PX):
    """``image`` fitted into ``size`` x ``size`` (aspect kept), centred on a white square, RGB."""
    from PIL import Image

    img = image.convert("RGB")
    scale = size / max(img.size)
    new = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    img = img.resize(new, Image.NEAREST if scale >= 1 else Image.LANCZOS)
    canvas = Image.new("RGB", (size, size), "white")
    canvas.paste(img, ((size - new[0]) // 2, (size - new[1]) // 2))
    return canvas


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _strip_png(images: list, size: int) -> bytes:
    """The strip's thumbnails side by side (a light grey square for an unreadable one)."""
    from PIL import Image

    n = max(1, len(images))
    canvas = Image.new("RGB", (n * size + (n - 1) * GAP_PX, size), "white")
    for i, im in enumerate(images):
        canvas.paste(im if im is not None else Image.new("RGB", (size, size), "#d1d9e0"), (i * (size + GAP_PX), 0))
    return _png(canvas)


def pseudo_label_gallery(picks: Mapping[str, Mapping[int, Sequence[GalleryItem]]], load: ImageLoader, *,
                         classes: Sequence[str], iteration: int, threshold: float | None = None,
                         per_strip: int = PER_STRIP, max_classes: int = MAX_CLASSES,
                         size: int = THUMB_PX) -> Gallery | None:
    """Thumbnail strips of one iteration's pseudo labels (see the module docstring).

    ``picks``: kind (``"most"``, ``"least"``, ``"dropped"``) -> class index -> items
    (:class:`~.collect.GalleryItem`) in the order to show; ``load(item.key)`` reads each image.
    Returns None when there is nothing to show.
    """
    shown = sorted({c for per_class in picks.values() for c in per_class})
    if not shown:
        return None
    rows: list[tuple[str, list[Strip]]] = []
    unreadable = 0
    for c in shown[:max_classes]:
        name = classes[c] if 0 <= c < len(classes) else str(c)
        strips: list[Strip] = []
        most = list((picks.get("most") or {}).get(c, ()))[:per_strip]
        for kind in ("most", "least", "dropped"):
            items = list((picks.get(kind) or {}).get(c, ()))[:per_strip]
            if kind == "least":  # a class with few images: do not show the most confident twice
                items = [it for it in items if it not in most]
            if not items or (kind == "dropped" and threshold is None):
                continue
            thumbs, images = [], []
            for key, conf, _, _ in items:
                try:
                    im = thumbnail(load(key), size)
                except Exception:  # noqa: BLE001 - any loader failure is a gap in the strip
                    im = None
                    unreadable += 1
                images.append(im)
                shown_conf = f"{math.floor(conf * 100) / 100:.2f}"  # floored: 0.299 is not shown as 0.30
                thumbs.append(Thumb(_png(im) if im is not None else None,
                                    shown_conf if im is not None else f"{shown_conf} (unreadable)",
                                    f"{key}: pseudo label {name}, confidence {conf:.3f}"))
            strips.append(Strip(KIND_TITLES[kind], thumbs, f"gallery-{iteration}-{c}-{kind}", _strip_png(images, size)))
        if strips:
            rows.append((f"class {name}", strips))
    if not rows:
        return None
    note = (f"Unlabeled images by pseudo label (the teacher's top-1 class), at most {per_strip} per strip, "
            f"captioned with the teacher's confidence: the most confident, the least confident the threshold "
            f"kept" + (f", and the most confident ones it dropped (just below {threshold:g})" if threshold is not None
                       else "") + ".")
    if len(shown) > max_classes:
        note += f" The first {max_classes} of {len(shown)} classes are shown."
    if unreadable:
        note += f" {unreadable} image(s) could not be read and are left blank."
    return Gallery(rows, note)
