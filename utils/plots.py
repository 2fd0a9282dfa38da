"""Figures: density plots of stage 4, the top-image contact sheet, the best-rho score curve."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from torchvision import transforms  # noqa: E402

from . import fileio  # noqa: E402

CURVE_LABELS = ("Original", "Disentangled 1", "Disentangled 2")


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
    fileio.save_figure(path, fig, dpi=120)
    plt.close(fig)


def rho_score_plot(path, rhos, scores, best, title):
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(rhos, scores, marker="o")
    ax.axvline(best, color="gray", linestyle="--", label=f"best rho = {best}")
    ax.set_xlabel("rho (f)")
    ax.set_ylabel("score = mean q1 + mean q2")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fileio.save_figure(path, fig, dpi=120)
    plt.close(fig)


def contact_sheet(path, rows, thumb=112, caption_h=28, label_w=130, title=None):
    """A grid of images. rows: list of (row label, [(image path, caption), ...]); saved as PNG."""
    crop = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.Resize(thumb)])
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
    with fileio.atomic_path(path) as tmp:
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
