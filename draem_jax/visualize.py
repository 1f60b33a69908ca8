"""Pictures of anomaly maps (PIL and NumPy only): heatmap overlays and labelled, titled panels.

* ``heat_colormap``: a jet-like colormap, float (H, W) in [0, 1] -> uint8 RGB.
* ``heat_overlay``: the image with its heatmap blended in, at the image's size.
* ``labelled_panels``: image | heatmap | ground truth | prediction side by side, each panel labelled and
  the whole titled (used by the evaluation overlays and the report's gallery).
* ``save_png``: a PNG with a ``Title`` (and ``Description``) text chunk, so viewers and file browsers
  show what a heatmap or mask is without changing its pixels or size.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

# Marks of the gallery: false positives and false negatives at the normal-only image threshold.
MARK_COLOURS = {"FP": (230, 120, 0), "FN": (220, 0, 0), "TP": (0, 150, 0), "TN": (90, 90, 90)}


def heat_colormap(values: np.ndarray) -> np.ndarray:
  """A jet-like colormap: float (H, W) in [0, 1] -> uint8 (H, W, 3)."""
  v = np.clip(np.asarray(values, np.float32), 0.0, 1.0)[..., None]
  r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
  g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
  b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
  return (255 * np.concatenate([r, g, b], -1) + 0.5).astype(np.uint8)


def to_uint8(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
  return image


def heat_overlay(image: np.ndarray, amap: np.ndarray) -> np.ndarray:
  """uint8 (H, W, 3): half image, half colormap of ``amap`` (same H, W)."""
  return (0.5 * to_uint8(image) + 0.5 * heat_colormap(amap)).astype(np.uint8)


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1: the fixed bitmap font
    return ImageFont.load_default()


def labelled_panels(image: np.ndarray, amap: np.ndarray, gt: np.ndarray | None, pred: np.ndarray,
                    title: str, mark: str | None = None, min_panel: int = 160) -> np.ndarray:
  """image | heatmap | ground truth | prediction, labelled and titled.

  Args:
    image: uint8 (H, W, 3) (or float in [0, 1]).
    amap: float (H, W) anomaly map in [0, 1].
    gt: bool (H, W) ground truth, or None (no panel).
    pred: bool (H, W) predicted defect pixels.
    title: the line above the panels (e.g. file, score, threshold).
    mark: "FP", "FN", "TP" or "TN": a coloured frame and tag (``MARK_COLOURS``).
    min_panel: panels smaller than this are enlarged (nearest) so labels fit.

  Returns:
    uint8 (h, w, 3).
  """
  image = to_uint8(image)
  panels = [("image", image), ("anomaly map", heat_overlay(image, amap))]
  if gt is not None:
    panels.append(("ground truth", np.repeat((np.asarray(gt) > 0).astype(np.uint8)[..., None] * 255, 3, -1)))
  panels.append(("prediction", np.repeat(np.asarray(pred).astype(np.uint8)[..., None] * 255, 3, -1)))
  h, w = image.shape[:2]
  zoom = max(1, int(np.ceil(min_panel / max(h, w))))
  ph, pw = h * zoom, w * zoom
  pad, label_h, title_h = 6, 18, 24
  frame = 4 if mark else 0
  width = len(panels) * pw + (len(panels) + 1) * pad + 2 * frame
  height = title_h + label_h + ph + 2 * pad + 2 * frame
  canvas = Image.new("RGB", (width, height), (255, 255, 255))
  if mark:
    ImageDraw.Draw(canvas).rectangle([0, 0, width - 1, height - 1], outline=MARK_COLOURS[mark], width=frame)
  draw = ImageDraw.Draw(canvas)
  x = frame + pad
  text = f"[{mark}] {title}" if mark else title
  draw.text((x, frame + 4), text, fill=MARK_COLOURS.get(mark, (0, 0, 0)) if mark else (0, 0, 0),
            font=_font(14))
  for label, panel in panels:
    big = Image.fromarray(panel).resize((pw, ph), Image.Resampling.NEAREST)
    draw.text((x, frame + title_h), label, fill=(40, 40, 40), font=_font(12))
    canvas.paste(big, (x, frame + title_h + label_h))
    x += pw + pad
  return np.asarray(canvas)


def save_png(path, pixels: np.ndarray, title: str, description: str = "") -> None:
  """Writes ``pixels`` (uint8 (H, W) or (H, W, 3)) as PNG with Title/Description text chunks."""
  info = PngImagePlugin.PngInfo()
  info.add_text("Title", title)
  if description:
    info.add_text("Description", description)
  mode = "L" if np.asarray(pixels).ndim == 2 else "RGB"
  Image.fromarray(np.asarray(pixels, np.uint8), mode=mode).save(path, pnginfo=info)
