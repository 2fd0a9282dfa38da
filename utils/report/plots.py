"""Figures: density plots of stage 4, the top-image contact sheet, the best-rho score curve, the feature
visualizations (Figure-1 panels and the raw images)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from torchvision import transforms  # noqa: E402

from utils.files import atomic  # noqa: E402

CURVE_LABELS = ("Original", "Disentangled 1", "Disentangled 2")


def curve_labels(k):
    """Legend of a density plot of a k-way split: "Original", "Disentangled 1", ..., "Disentangled k"."""
    return ("Original",) + tuple(f"Disentangled {j}" for j in range(1, k + 1))


def density_plot(path, curves, title):
    """curves: list of (label, (xs, ys) or None) drawn as lines; saved as PNG."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curve in curves:
        if curve is not None:
            ax.plot(curve[0], curve[1], label=label)
    ax.set_xlabel("Activation")
    ax.set_ylabel("Density")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    atomic.save_figure(path, fig, dpi=120)
    plt.close(fig)


def rho_score_plot(path, rhos, scores, best, title, ylabel="score = mean q1 + mean q2"):
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(rhos, scores, marker="o")
    ax.axvline(best, color="gray", linestyle="--", label=f"best rho = {best}")
    ax.set_xlabel("rho (f)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    atomic.save_figure(path, fig, dpi=120)
    plt.close(fig)


def contact_sheet(path, rows, thumb=112, caption_h=28, label_w=130, title=None, resize=256, crop_size=224):
    """A grid of images. rows: list of (row label, [(image path, caption), ...]); saved as PNG. Each image as the
    model sees it (shorter side to ``resize``, centre crop ``crop_size``: the evaluation transform), shrunk."""
    crop = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(crop_size), transforms.Resize(thumb)])
    ncols = max((len(items) for _, items in rows), default=1)
    top = 24 if title else 0
    sheet = Image.new("RGB", (label_w + ncols * thumb, top + len(rows) * (thumb + caption_h)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((6, 6), title, fill="black")
    for r, (label, items) in enumerate(rows):
        y0 = top + r * (thumb + caption_h)
        draw.text((6, y0 + thumb // 2 - 6), label, fill="black")
        for col, (img_path, caption) in enumerate(items):
            with Image.open(img_path) as im:
                tile = crop(im.convert("RGB"))
            x0 = label_w + col * thumb
            sheet.paste(tile, (x0, y0))
            for line, text in enumerate(_wrap(caption, thumb // 6)[:2]):
                draw.text((x0 + 2, y0 + thumb + 2 + 12 * line), text, fill="black")
    with atomic.atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")


def _wrap(text, width):
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = (cur + " " + w).strip()
    lines.append(cur)
    return [line[:width] for line in lines]


def _tile(array, size):
    """(H, W, 3) float array in [0, 1] -> a PIL image of size x size."""
    import numpy as np
    a = (np.clip(np.asarray(array, dtype=np.float64), 0, 1) * 255).round().astype("uint8")
    return Image.fromarray(a).resize((size, size), Image.BILINEAR)


def _font(size=13):
    """Pillow's built-in scalable font at ``size`` px (its bitmap font, whose spaces are one pixel wide, where
    Pillow has no FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):
        return ImageFont.load_default()


def feature_vis_figure(path, panels, title=None, cell=96, frame=4, gap=16, title_h=22):
    """Figure-1 layout: per panel a 4 x 4 grid of cells, the visualization in the central 2 x 2 and up to
    12 val crops in the ring around it, each framed in its colour.
    panels: list of (panel title, visualization (H, W, 3) in [0, 1], [(crop (h, w, 3) in [0, 1], (r, g, b)), ...])."""
    ring = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 3), (2, 3), (3, 3), (3, 2), (3, 1), (3, 0), (2, 0), (1, 0)]
    side = 4 * cell
    top = 24 if title else 0
    sheet = Image.new("RGB", (len(panels) * side + (len(panels) - 1) * gap, top + title_h + side), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font()
    if title:
        draw.text((6, 5), title, fill="black", font=font)
    for p, (name, vis, crops) in enumerate(panels):
        x0, y0 = p * (side + gap), top + title_h
        draw.text((x0 + (side - draw.textlength(name, font=font)) // 2, top + 4), name, fill="black", font=font)
        sheet.paste(_tile(vis, 2 * cell - 2 * frame), (x0 + cell + frame, y0 + cell + frame))
        for (r, c), (crop, colour) in zip(ring, crops):
            cx, cy = x0 + c * cell, y0 + r * cell
            draw.rectangle([cx + 1, cy + 1, cx + cell - 2, cy + cell - 2], fill=tuple(colour))
            sheet.paste(_tile(crop, cell - 2 * frame - 2), (cx + frame + 1, cy + frame + 1))
    with atomic.atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")


def image_row(path, images, titles, title=None, size=256, gap=8, title_h=20):
    """Images side by side with a title above each. images: list of (H, W, 3) arrays in [0, 1]."""
    top = 24 if title else 0
    sheet = Image.new("RGB", (len(images) * (size + gap) - gap, top + title_h + size), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font()
    if title:
        draw.text((6, 5), title, fill="black", font=font)
    for i, (im, name) in enumerate(zip(images, titles)):
        x0 = i * (size + gap)
        draw.text((x0 + 4, top + 4), name, fill="black", font=font)
        sheet.paste(_tile(im, size), (x0, top + title_h))
    with atomic.atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
