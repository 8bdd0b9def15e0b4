"""H&E patch augmentations: dihedral flips/rotations and stain-aware colour jitter, on (C, H, W) tensors.

:class:`Augment` is one small callable applied per patch by the training loader (``make_loader(augment=True)``).
Every random draw comes from the ``torch.Generator`` passed in, so a seeded generator gives the same output twice.

Defaults (chosen for H&E spot patches, whose orientation carries no meaning and whose colour varies by lab):

- ``flip=True``, ``rot90=True``: a horizontal flip with probability 1/2, then a rotation by k * 90 degrees with k
  uniform in {0, 1, 2, 3}. Together these draw uniformly from the 8 symmetries of the square.
- ``hed_jitter=0.05``: stain-aware colour jitter (Tellez et al. 2018, "HED-light"). The RGB image is unmixed into
  haematoxylin, eosin and DAB stain amounts with Ruifrok & Johnston's stain matrix (as ``skimage.color.rgb2hed``),
  in optical-density units as in Tellez et al. (skimage >= 0.19 divides by -log(1e-6) ~ 13.8, which would make the
  same sigma 14x stronger); each stain channel ``s`` becomes ``s * alpha + beta`` with
  ``alpha ~ U(1 - sigma, 1 + sigma)`` and ``beta ~ U(-sigma, sigma)``; the result is mixed back to RGB.
- ``color_jitter=None``: optional torchvision-style jitter ``(brightness, contrast, saturation, hue)``; factors are
  drawn as ``U(1 - b, 1 + b)`` (brightness, contrast, saturation) and ``U(-h, h)`` (hue), applied in that order.
- ``p=0.8``: each colour operation (HED jitter, colour jitter) is applied to a patch with this probability.
"""

from __future__ import annotations

import torch
from torchvision.transforms.v2 import functional as TF

# Ruifrok & Johnston's H&E-DAB stain vectors (rows: haematoxylin, eosin, DAB) in optical-density space, the matrix
# skimage.color.rgb2hed uses. Stain amounts are OD @ inv(RGB_FROM_HED), with OD = -log(RGB intensity in [0, 1]).
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
# rgb2hed clamps intensities at 1e-6 before the log, so the optical density of a black pixel stays finite.
_MIN_INTENSITY = 1e-6


class Augment:
    """Random H&E augmentation of one patch.

    Args:
        flip: flip horizontally with probability 1/2.
        rot90: rotate by a uniform multiple of 90 degrees (only 0 or 180 degrees for non-square patches, so the
            shape never changes).
        hed_jitter: sigma of the stain-space jitter (0 disables it).
        color_jitter: ``(brightness, contrast, saturation, hue)`` jitter strengths, or None to disable.
        p: probability of applying each colour operation to a patch.
    """

    def __init__(
        self,
        flip: bool = True,
        rot90: bool = True,
        hed_jitter: float = 0.05,
        color_jitter: tuple[float, float, float, float] | None = None,
        p: float = 0.8,
    ) -> None:
        if not 0 <= hed_jitter < 1:
            raise ValueError(f"hed_jitter must be in [0, 1), got {hed_jitter}")
        if color_jitter is not None:
            if len(color_jitter) != 4 or any(v < 0 for v in color_jitter) or not color_jitter[3] <= 0.5:
                raise ValueError(
                    f"color_jitter must be (brightness, contrast, saturation, hue) >= 0 with hue <= 0.5, "
                    f"got {color_jitter}"
                )
            color_jitter = tuple(float(v) for v in color_jitter)
        if not 0 <= p <= 1:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.flip = flip
        self.rot90 = rot90
        self.hed_jitter = float(hed_jitter)
        self.color_jitter = color_jitter
        self.p = float(p)

    def __repr__(self) -> str:
        return (
            f"Augment(flip={self.flip}, rot90={self.rot90}, hed_jitter={self.hed_jitter}, "
            f"color_jitter={self.color_jitter}, p={self.p})"
        )

    def __call__(self, image: torch.Tensor, generator: torch.Generator | int | None = None) -> torch.Tensor:
        """Augment one patch.

        Args:
            image: (C, H, W) uint8 in [0, 255] or floating point in [0, 1]; colour operations need C == 3.
            generator: the source of randomness; an int seeds a fresh generator; None uses torch's global RNG.

        Returns:
            (C, H, W) tensor of the input's dtype (and shape).
        """
        if image.ndim != 3:
            raise ValueError(f"Augment expects a (C, H, W) tensor, got shape {tuple(image.shape)}")
        if isinstance(generator, int):
            generator = torch.Generator().manual_seed(generator)
        # Draw every random number up front, the same count whatever the options, so a generator's stream does not
        # depend on which branches run.
        u = torch.rand(14, generator=generator, dtype=torch.float64).tolist()
        out = image
        if self.flip and u[0] < 0.5:
            out = out.flip(-1)
        if self.rot90:
            square = out.shape[-1] == out.shape[-2]
            k = int(u[1] * 4) if square else 2 * int(u[1] * 2)
            if k:
                out = torch.rot90(out, k, dims=(-2, -1))
        do_hed = self.hed_jitter > 0 and u[2] < self.p
        do_jitter = self.color_jitter is not None and u[3] < self.p
        if not (do_hed or do_jitter):
            return out
        if out.shape[-3] != 3:
            raise ValueError(f"colour augmentation needs 3 (RGB) channels, got {out.shape[-3]}")
        x = out.to(torch.float32).div_(255.0) if image.dtype == torch.uint8 else out.to(torch.float32)
        if do_hed:
            x = _hed_jitter(x, self.hed_jitter, u[4:10])
        if do_jitter:
            x = _color_jitter(x, self.color_jitter, u[10:14])
        x = x.clamp_(0.0, 1.0)
        if image.dtype == torch.uint8:
            return x.mul_(255.0).round_().to(torch.uint8)
        return x.to(image.dtype)


def _hed_jitter(x: torch.Tensor, sigma: float, u: list[float]) -> torch.Tensor:
    """Scale and shift each H&E-DAB stain concentration of ``x`` ((3, H, W) float in [0, 1]).

    ``u`` holds six uniform draws: three scales then three shifts. Unmixing, jitter and remixing are linear in
    optical density, so they fold into one 3x3 matrix and a bias: OD' = OD @ (M^-1 diag(alpha) M) + beta @ M,
    with M = RGB_FROM_HED.
    """
    alpha = torch.tensor([1 - sigma + 2 * sigma * v for v in u[:3]], dtype=torch.float64)
    beta = torch.tensor([-sigma + 2 * sigma * v for v in u[3:6]], dtype=torch.float64)
    mix = (_HED_FROM_RGB * alpha) @ _RGB_FROM_HED
    bias = beta @ _RGB_FROM_HED
    od = -torch.log(x.clamp(min=_MIN_INTENSITY))  # (3, H, W)
    od = torch.einsum("chw,cd->dhw", od, mix.to(torch.float32)) + bias.to(torch.float32)[:, None, None]
    return torch.exp(od.neg_())


def _color_jitter(x: torch.Tensor, strengths: tuple[float, float, float, float], u: list[float]) -> torch.Tensor:
    """Brightness, contrast, saturation, then hue jitter of ``x`` ((3, H, W) float in [0, 1]); ``u``: four draws."""
    brightness, contrast, saturation, hue = strengths
    if brightness:
        x = TF.adjust_brightness(x, max(0.0, 1 - brightness + 2 * brightness * u[0]))
    if contrast:
        x = TF.adjust_contrast(x, max(0.0, 1 - contrast + 2 * contrast * u[1]))
    if saturation:
        x = TF.adjust_saturation(x, max(0.0, 1 - saturation + 2 * saturation * u[2]))
    if hue:
        x = TF.adjust_hue(x, -hue + 2 * hue * u[3])
    return x
