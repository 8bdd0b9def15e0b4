"""Subspot image features from a registry backbone: one patch centred on each subspot, embedded.

The paper cuts, around each subspot, a region of radius 5x the spot radius, resizes it to 299 px and takes
Inception-v3 pool features (2048). spfm takes any backbone of :func:`spfm.models.backbones.create_backbone`
(patch side and input size are arguments); rows come back in the subspot order given.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from spfm.errors import DataError


def _load_image(image: np.ndarray | str | os.PathLike) -> np.ndarray:
    if isinstance(image, np.ndarray):
        arr = image
    else:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None
        with Image.open(image) as im:
            arr = np.asarray(im.convert("RGB"))
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise DataError(f"expected an (H, W, 3) RGB image, got shape {arr.shape}", field="image")
    return arr[:, :, :3]


def _crop(img: np.ndarray, cx: float, cy: float, side: int) -> np.ndarray:
    """(side, side, 3) patch centred at (cx, cy), white where it leaves the image."""
    H, W = img.shape[:2]
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    out = np.full((side, side, 3), 255, dtype=np.uint8)
    xs, ys = max(x0, 0), max(y0, 0)
    xe, ye = min(x0 + side, W), min(y0 + side, H)
    if xe > xs and ye > ys:
        out[ys - y0:ye - y0, xs - x0:xe - x0] = img[ys:ye, xs:xe]
    return out


@torch.no_grad()
def subspot_image_features(image: np.ndarray | str | os.PathLike, sub_xy: np.ndarray, patch_px: int, *,
                           backbone: str = "vit_tiny_patch16_224", img_size: int = 224, pretrained: bool = False,
                           checkpoint: str | None = None, batch_size: int = 64, device: str = "cpu",
                           backbone_kwargs: dict[str, Any] | None = None) -> np.ndarray:
    """(M, D) features of square patches of ``patch_px`` pixels centred on the (M, 2) subspot centres (x, y).

    Args:
        image: (H, W, 3) uint8 array or an image file (full resolution, the frame of ``obsm["spatial"]``).
        sub_xy: subspot centres in that image's pixels (e.g. ``SoScope(...).subspot_positions(adata)``).
        patch_px: patch side in image pixels.
        backbone: registry name; ``img_size`` is its input size (patches are resized to it).
        pretrained, checkpoint: weights (default: random init, as offline tests have no weights).
    """
    from spfm.models.backbones import create_backbone

    img = _load_image(image)
    xy = np.asarray(sub_xy, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise DataError(f"subspot centres must be (M, 2), got {xy.shape}", field="sub_xy")
    if patch_px < 4:
        raise DataError(f"patch side must be at least 4 pixels, got {patch_px}", field="patch_px")
    kw = dict(backbone_kwargs or {})
    if "img_size" not in kw and img_size != 224:
        kw["img_size"] = img_size
    net = create_backbone(backbone, pretrained=pretrained, checkpoint=checkpoint, **kw).to(device).eval()
    feats = []
    for s in range(0, len(xy), batch_size):
        patches = np.stack([_crop(img, cx, cy, int(patch_px)) for cx, cy in xy[s:s + batch_size]])
        t = torch.as_tensor(patches).permute(0, 3, 1, 2).float() / 255.0
        t = F.interpolate(t, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)
        # The backbone's own input normalisation (timm's augreg ViTs and spfm checkpoints use 0.5 / 0.5, not
        # ImageNet's mean / std).
        feats.append(net(net.normalize(t.to(device))).float().cpu())
    return torch.cat(feats).numpy()
