"""Picture of what the augmentation flags do: original images, augmented images and one mixed batch.

Used by `python train.py --preview_aug`; drawn with matplotlib's Agg canvas (no display, no pyplot state).
"""
import torch


def _show(ax, img, title):
    img = img.detach().cpu()
    img = (img.float() / 255 if img.dtype == torch.uint8 else img.float()).clamp(0, 1)
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img.permute(1, 2, 0).numpy())
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def _mixed_title(row, class_names, k=2):
    """The classes with the largest weights, e.g. 'Shirt .62 / Bag .38'."""
    w, idx = row.topk(min(k, row.numel()))
    return " / ".join(f"{class_names[i]} {v:.2f}" for v, i in zip(w.tolist(), idx.tolist()) if v > 0)


def save_aug_preview(images_uint8, labels, class_names, augment, mix, path, n=8):
    """Write a PNG grid: n originals, the same n augmented (augment: uint8 NCHW -> uint8 NCHW or None),
    and, with a mixer, one mixed batch titled with its label weights."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = min(n, images_uint8.shape[0])
    x, y = images_uint8[:n], labels[:n]
    rows = [("original", x, [class_names[i] for i in y.tolist()])]
    x_aug = augment(x) if augment is not None else x
    rows.append(("augmented", x_aug, [class_names[i] for i in y.tolist()]))
    if mix is not None:
        xf = x_aug.float().div(255)
        for _ in range(20):  # mix_prob < 1 may leave a batch unmixed; show one that is mixed
            x_mix, y_soft = mix(xf, y)
            if (y_soft.max(1).values < 1).any():
                break
        rows.append(("mixed", x_mix, [_mixed_title(r, class_names) for r in y_soft]))

    fig = Figure(figsize=(1.4 * n, 1.6 * len(rows)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), n, squeeze=False)
    for r, (name, imgs, titles) in enumerate(rows):
        for c in range(n):
            _show(axes[r][c], imgs[c], titles[c])
        axes[r][0].text(-0.1, 0.5, name, transform=axes[r][0].transAxes, rotation=90, ha="right",
                        va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
