"""A small synthetic HEST-layout corpus whose H&E images and counts come from the same latent tissue programmes.

Each sample is a patch of "tissue" on a slide. Over the tissue lie K = 5 smooth latent programme fields
(:data:`PROGRAMMES`: Gaussian blobs plus a linear gradient per programme, turned into proportions by a softmax).
The same proportions drive both modalities:

- **counts**: spot s, gene g ~ NegativeBinomial(mean = depth_s * softmax_g(a_g + sum_k p_sk B_kg + organ_g + patient_g),
  dispersion :data:`NB_THETA`), where ``B`` is a gene x programme loading matrix (most genes mark one programme
  strongly) shared by every sample, ``organ_g`` switches organ-specific genes on in their organ, and each organ
  leaves some genes unmeasured, so the gene vocabularies' union and intersection differ;
- **image**: the stain densities (hematoxylin, eosin, red blood cells) and the density and size of round nuclei-like
  dark blobs are the programme proportions times per-programme constants (:class:`Programme`), rendered through
  Beer-Lambert optical density with fine grain; glass outside the tissue mask is white.

So expression is genuinely predictable from the patch, and a model that does better than chance has learnt the
programme -> appearance link. The true proportions are stored in ``obsm["programmes"]`` for tests and heads.

Samples follow :func:`corpus_plan`: two organs (breast, human; brain, mouse), patient 0 with two sections, then one
section per patient, two technologies (a Visium-like hexagonal lattice at 100 um pitch and a legacy-ST-like square
lattice at 200 um pitch). Every sample is a pure function of (seed, its index, the gene model options), so the same
seed writes the same counts and images whatever ``n_samples`` is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.ndimage import gaussian_filter
from scipy.special import softmax

from spfm import __version__
from spfm.data.hest import write_sample
from spfm.errors import DataError

PathLike = str | os.PathLike

SOURCE = "spfm synthetic corpus"
LICENSE = "CC0-1.0"
GENERATOR = "spfm.data.synthetic.make_synthetic_corpus"

#: Ruifrok & Johnston optical-density vectors (R, G, B) of hematoxylin (purple) and eosin (pink), and that of
#: red blood cells (eosin-bright, orange-red: about RGB (230, 120, 130) at unit density).
HEMATOXYLIN_OD = np.array([0.650, 0.704, 0.286], np.float32)
EOSIN_OD = np.array([0.072, 0.990, 0.105], np.float32)
ERYTHROCYTE_OD = np.array([0.096, 0.744, 0.667], np.float32)
#: Extra hematoxylin optical density inside a nucleus.
NUCLEUS_OD = 1.2
#: Gaussian sigma (um) of small (lymphocyte-like) and large (epithelial-like) nuclei; a nucleus is the disc where
#: its bump exceeds half its peak, radius 1.18 sigma (about 3 and 5 um).
NUCLEUS_SIGMA_UM = (2.5, 4.0)
#: Negative-binomial dispersion of the counts (variance = mu + mu^2 / theta).
NB_THETA = 8.0
#: Off-tissue spots get this fraction of an in-tissue spot's depth (ambient RNA).
AMBIENT_DEPTH = 0.03
#: Off-tissue spots lie at least this far outside the tissue, so their 112 um default patch is glass only.
OFF_TISSUE_MIN_UM = 95.0
#: Blank border between the outermost lattice position and the slide edge: less than half the default patch field
#: (56 um), so patches of border spots reach past the slide edge and get padded.
SLIDE_MARGIN_UM = 40.0
#: Programme fields and stain maps are evaluated on a grid this coarse and interpolated; they vary over >= 100 um.
FIELD_CELL_UM = 8.0
#: Slides are rendered in bands of this many rows.
RENDER_ROWS = 512


@dataclass(frozen=True)
class Programme:
    """A latent tissue programme and how it looks.

    Attributes:
        name: a name describing the look (the programmes are abstract, not real cell types).
        hematoxylin: background hematoxylin optical density (purple) where the programme is pure.
        eosin: eosin optical density (pink).
        erythrocyte: red-blood-cell optical density (orange-red).
        nuclear_fraction: fraction of the area covered by nuclei (before overlaps).
        nuclear_size: fraction of nuclei that are large (:data:`NUCLEUS_SIGMA_UM`); the rest are small.
    """

    name: str
    hematoxylin: float
    eosin: float
    erythrocyte: float
    nuclear_fraction: float
    nuclear_size: float


PROGRAMMES: tuple[Programme, ...] = (
    Programme("epithelial", hematoxylin=0.15, eosin=0.40, erythrocyte=0.0, nuclear_fraction=0.25, nuclear_size=1.0),
    Programme("stromal", hematoxylin=0.03, eosin=0.70, erythrocyte=0.0, nuclear_fraction=0.05, nuclear_size=0.2),
    Programme("immune", hematoxylin=0.35, eosin=0.05, erythrocyte=0.0, nuclear_fraction=0.45, nuclear_size=0.0),
    Programme("sparse", hematoxylin=0.03, eosin=0.14, erythrocyte=0.0, nuclear_fraction=0.02, nuclear_size=0.5),
    Programme("haemorrhagic", hematoxylin=0.08, eosin=0.20, erythrocyte=0.55, nuclear_fraction=0.06,
              nuclear_size=0.0),
)


@dataclass(frozen=True)
class Technology:
    """A spot lattice.

    Attributes:
        name: HEST's ``st_technology``.
        lattice: ``"hex"`` (Visium: rows 0.866 pitch apart, odd rows shifted by half a pitch, array_col = 2 * column
            + row parity) or ``"square"`` (legacy ST: array_col = x, array_row = y).
        pitch_um: centre-to-centre distance of neighbouring spots.
        spot_diameter_um: spot diameter.
        depth: median UMIs of an in-tissue spot.
    """

    name: str
    lattice: Literal["hex", "square"]
    pitch_um: float
    spot_diameter_um: float
    depth: float


TECHNOLOGIES: dict[str, Technology] = {
    "visium": Technology("Visium", "hex", 100.0, 55.0, 6000.0),
    "st": Technology("Spatial Transcriptomics", "square", 200.0, 100.0, 3000.0),
}


@dataclass(frozen=True)
class Organ:
    """An organ of the corpus.

    Attributes:
        name: HEST's ``organ``.
        species: HEST's ``species``.
        programme_bias: (K,) added to the programme logits: how common each programme is in this organ.
    """

    name: str
    species: str
    programme_bias: tuple[float, ...]


ORGANS: tuple[Organ, ...] = (
    Organ("Breast", "Homo sapiens", (0.6, 0.4, 0.1, -0.3, -0.6)),
    Organ("Brain", "Mus musculus", (-0.6, 0.2, -0.2, 0.6, 0.3)),
)


@dataclass(frozen=True)
class SampleSpec:
    """Which organ, technology and patient sample ``index`` of a corpus is."""

    index: int
    sample_id: str
    organ: Organ
    technology: Technology
    patient_index: int

    @property
    def patient(self) -> str:
        return f"SYN-P{self.patient_index}"


@dataclass
class SyntheticSample:
    """One generated sample, in memory.

    Attributes:
        sample_id: the sample id.
        adata: spots x genes raw counts (CSR float32) in ``X``; ``obsm["spatial"]`` (N, 2) pixel (x, y);
            ``obsm["programmes"]`` (N, K) true programme proportions (rows sum to 1 under tissue, 0 off tissue);
            ``obs`` in_tissue, array_row, array_col; ``var`` programme (the programme a gene marks, or ""),
            organ_specific (the organ a gene is specific to, or "").
        image: (H, W, 3) uint8 H&E-like slide.
        metadata: HEST metadata (organ, species, st_technology, patient, pixel_size_um_embedded, generator record).
    """

    sample_id: str
    adata: ad.AnnData
    image: np.ndarray
    metadata: dict[str, Any]


@dataclass(frozen=True)
class _GeneModel:
    names: np.ndarray  # (G,) gene names
    baseline: np.ndarray  # (G,) log abundance a_g
    loadings: np.ndarray  # (K, G) programme effects B_kg on log abundance
    marker: np.ndarray  # (G,) programme index the gene marks, -1 for none
    organ_effect: np.ndarray  # (n_organs, G) organ-specific log offsets
    specific_to: np.ndarray  # (G,) organ index the gene is specific to, -1 for none
    measured: np.ndarray  # (n_organs, G) bool: the gene is in that organ's panel


def corpus_plan(n_samples: int) -> list[SampleSpec]:
    """The samples of a corpus of ``n_samples``.

    Patient 0 has two sections (so a patient-level split has a multi-sample patient to keep together); every later
    sample is a new patient. Even patients are breast, odd patients brain; every other breast patient after the first
    is legacy ST, all else Visium. With 4 samples: SYN00, SYN01 (breast, P0, Visium), SYN02 (brain, P1, Visium),
    SYN03 (breast, P2, legacy ST).
    """
    if n_samples < 1:
        raise DataError(f"n_samples must be at least 1, got {n_samples}", field="n_samples")
    specs = []
    for i in range(n_samples):
        patient = max(0, i - 1)
        organ = ORGANS[patient % 2]
        technology = TECHNOLOGIES["st" if patient % 4 == 2 else "visium"]
        specs.append(SampleSpec(i, f"SYN{i:02d}", organ, technology, patient))
    return specs


def _gene_model(seed: int, n_genes: int) -> _GeneModel:
    """The gene x programme model shared by every sample of a corpus (depends on the seed and n_genes only)."""
    rng = np.random.default_rng([seed, 0])
    k, n_org = len(PROGRAMMES), len(ORGANS)
    baseline = rng.normal(0.0, 0.8, n_genes)
    loadings = rng.normal(0.0, 0.25, (k, n_genes))
    # 80% of genes mark one programme strongly; the rest are housekeeping-like
    marker = np.where(rng.random(n_genes) < 0.8, rng.integers(0, k, n_genes), -1)
    has = marker >= 0
    loadings[marker[has], np.flatnonzero(has)] += rng.uniform(1.5, 3.0, int(has.sum()))
    # disjoint gene sets: per organ, 5% specific to it and 10% left out of its panel
    perm = rng.permutation(n_genes)
    n_spec, n_miss = max(1, round(0.05 * n_genes)), max(1, round(0.10 * n_genes))
    specific_to = np.full(n_genes, -1)
    organ_effect = np.zeros((n_org, n_genes))
    measured = np.ones((n_org, n_genes), bool)
    for o in range(n_org):
        spec = perm[o * n_spec : (o + 1) * n_spec]
        specific_to[spec] = o
        organ_effect[:, spec] = -2.5
        organ_effect[o, spec] = 2.5
        start = n_org * n_spec + o * n_miss
        measured[o, perm[start : start + n_miss]] = False
    names = np.array([f"SG{g:04d}" for g in range(n_genes)])
    return _GeneModel(names, baseline, loadings, marker, organ_effect, specific_to, measured)


@dataclass(frozen=True)
class _Layout:
    """Spot lattice, tissue shape and programme fields of one sample (lengths in micrometres)."""

    xy_um: np.ndarray  # (M, 2) lattice positions
    array_row: np.ndarray  # (M,)
    array_col: np.ndarray  # (M,)
    width_um: float
    height_um: float
    centre: np.ndarray  # (2,) tissue ellipse centre
    axes: np.ndarray  # (2,) semi-axes
    angle: float
    wobble: np.ndarray  # (J, 3) boundary harmonics: order, amplitude, phase
    blobs: np.ndarray  # (K, B, 4) programme blobs: x, y, radius, amplitude
    gradient: np.ndarray  # (K, 2) programme logit slope per extent
    bias: np.ndarray  # (K,) organ programme bias

    def inside_um(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Approximate signed distance (um, positive inside) to the tissue boundary at points x, y (any shape)."""
        c, s = np.cos(self.angle), np.sin(self.angle)
        u = ((x - self.centre[0]) * c + (y - self.centre[1]) * s) / self.axes[0]
        v = (-(x - self.centre[0]) * s + (y - self.centre[1]) * c) / self.axes[1]
        rho, theta = np.hypot(u, v), np.arctan2(v, u)
        radius = 1.0 + sum(a * np.cos(j * theta + phi) for j, a, phi in self.wobble)
        return (radius - rho) * float(self.axes.min())

    def logits(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Programme logits (K, *x.shape) at points x, y (um)."""
        extent = max(self.width_um, self.height_um)
        out = np.empty((len(self.blobs),) + np.shape(x))
        for k, blobs in enumerate(self.blobs):
            field = self.bias[k] + (self.gradient[k, 0] * (x - self.width_um / 2)
                                    + self.gradient[k, 1] * (y - self.height_um / 2)) / extent
            for bx, by, radius, amp in blobs:
                field = field + amp * np.exp(-((x - bx) ** 2 + (y - by) ** 2) / (2 * radius**2))
            out[k] = field
        return out

    def proportions(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Programme proportions (K, *x.shape), summing to 1 over K."""
        # a temperature of 1/2 keeps regions distinct with mixed borders between them
        return softmax(2.0 * self.logits(x, y), axis=0)


def _layout(spec: SampleSpec, rng: np.random.Generator, target_spots: int) -> _Layout:
    tech = spec.technology
    fill = 0.62  # expected fraction of lattice positions under tissue (ellipse in the box, partly cut by the edge)
    n_grid = target_spots / fill
    if tech.lattice == "hex":
        dy = tech.pitch_um * np.sqrt(3) / 2
        n_rows = int(round(np.sqrt(n_grid * tech.pitch_um / dy)))
        n_cols = int(round(n_grid / n_rows))
        r, c = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
        r, c = r.ravel(), c.ravel()
        x = (c + 0.5 * (r % 2)) * tech.pitch_um
        y = r * dy
        array_row, array_col = r, 2 * c + r % 2
    else:
        n_rows = n_cols = int(round(np.sqrt(n_grid)))
        r, c = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
        r, c = r.ravel(), c.ravel()
        x, y = c * tech.pitch_um, r * tech.pitch_um
        # legacy ST arrays count from 1 (HER2ST spot ids run from 2x2 up)
        array_row, array_col = r + 1, c + 1
    x = x + SLIDE_MARGIN_UM
    y = y + SLIDE_MARGIN_UM
    width = float(x.max() + SLIDE_MARGIN_UM + 1)
    height = float(y.max() + SLIDE_MARGIN_UM + 1)
    size = np.array([width, height])
    # the tissue is off-centre and a little larger than half the slide, so it runs off one or two edges
    centre = size / 2 + rng.uniform(-0.12, 0.12, 2) * size
    axes = size * rng.uniform(0.40, 0.50, 2)
    wobble = np.column_stack([np.arange(2, 6), rng.uniform(0.0, 0.07, 4), rng.uniform(0, 2 * np.pi, 4)])
    k, n_blobs = len(PROGRAMMES), 4
    blobs = np.stack([
        rng.uniform(0, width, (k, n_blobs)),
        rng.uniform(0, height, (k, n_blobs)),
        rng.uniform(150, 450, (k, n_blobs)),
        rng.normal(1.5, 0.6, (k, n_blobs)),
    ], axis=-1)
    gradient = rng.normal(0.0, 1.0, (k, 2))
    return _Layout(np.column_stack([x, y]), array_row, array_col, width, height, centre, axes,
                   float(rng.uniform(0, np.pi)), wobble, blobs, gradient, np.asarray(spec.organ.programme_bias))


def _barcodes(spec: SampleSpec, layout: _Layout, keep: np.ndarray, rng: np.random.Generator) -> list[str]:
    if spec.technology.lattice == "square":
        return [f"{c}x{r}" for r, c in zip(layout.array_row[keep], layout.array_col[keep])]
    # Visium-like: 16 random nucleotides and "-1"; 4^16 codes, but draw until unique rather than hope
    codes: list[str] = []
    seen: set[str] = set()
    letters = np.array(list("ACGT"))
    while len(codes) < int(keep.sum()):
        code = "".join(letters[rng.integers(0, 4, 16)]) + "-1"
        if code not in seen:
            seen.add(code)
            codes.append(code)
    return codes


def _bilinear_weights(n_px: int, n_cells: int, cell_px: float) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``n_px`` pixels, the lower of the two coarse cells (sampled at cell centres) around it and the
    weight of the upper one: (index (n_px,) int, weight (n_px,) float32). Edges clamp."""
    pos = np.clip((np.arange(n_px) + 0.5) / cell_px - 0.5, 0.0, n_cells - 1.0)
    lower = np.minimum(np.floor(pos).astype(np.int64), max(n_cells - 2, 0))
    return lower, (pos - lower).astype(np.float32)


def _lerp(maps: np.ndarray, axis: int, where: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Linear interpolation of float32 ``maps`` along ``axis`` at the positions from :func:`_bilinear_weights`."""
    lower, weight = where
    upper = np.minimum(lower + 1, maps.shape[axis] - 1)
    shape = [1] * maps.ndim
    shape[axis] = -1
    weight = weight.reshape(shape)
    return np.take(maps, lower, axis=axis) * (1 - weight) + np.take(maps, upper, axis=axis) * weight


def _render(layout: _Layout, rng: np.random.Generator, pixel_size_um: float) -> np.ndarray:
    """The (H, W, 3) uint8 H&E-like slide of a layout.

    Rendered in bands of :data:`RENDER_ROWS` rows (with a halo for the blur), so memory stays near the size of the
    image itself rather than a dozen full-size float maps; the result does not depend on the band size.
    """
    width, height = int(np.ceil(layout.width_um / pixel_size_um)), int(np.ceil(layout.height_um / pixel_size_um))
    # stain and nucleus maps are linear in the programme proportions, so compute them on a coarse grid
    cell_px = FIELD_CELL_UM / pixel_size_um
    gx = (np.arange(int(np.ceil(width / cell_px))) + 0.5) * FIELD_CELL_UM
    gy = (np.arange(int(np.ceil(height / cell_px))) + 0.5) * FIELD_CELL_UM
    x, y = np.meshgrid(gx, gy)
    p = layout.proportions(x, y)  # (K, Hc, Wc)
    look = np.array([[g.hematoxylin, g.eosin, g.erythrocyte, g.nuclear_fraction, g.nuclear_size] for g in PROGRAMMES])
    hem, eos, red, frac, size = np.tensordot(look.T, p, axes=1)
    # a soft tissue edge about one coarse cell wide
    mask = np.clip(layout.inside_um(x, y) / FIELD_CELL_UM + 0.5, 0.0, 1.0)
    stain = rng.uniform(0.9, 1.1, 2)  # per-slide staining strength, as between real batches
    coarse = np.stack([hem * mask * stain[0], eos * mask * stain[1], red * mask, frac * mask, size])
    # interpolate along x once for the whole slide (M, Hc, W), along y band by band
    wide = _lerp(coarse.astype(np.float32), 2, _bilinear_weights(width, len(gx), cell_px))
    # nuclei: a Poisson point process whose intensity is the nuclear area fraction over the disc area, split into
    # large and small nuclei by `size`; one uniform draw per pixel decides both (u < rate * size: large centre,
    # rate * size <= u < rate: small centre), and each set of centres is blurred into discs of its own size.
    # One draw for the whole slide, so the image does not depend on the band size.
    u = rng.random((height, width), dtype=np.float32)
    sigmas = [s / pixel_size_um for s in NUCLEUS_SIGMA_UM]
    areas = [np.float32(np.pi * (1.18 * s) ** 2) for s in sigmas]  # px^2
    halo = int(3.0 * max(sigmas) + 0.5) + 1  # gaussian_filter's radius at truncate=3, plus one
    rows, row_weight = _bilinear_weights(height, len(gy), cell_px)
    image = np.empty((height, width, 3), np.uint8)
    for top in range(0, height, RENDER_ROWS):
        bottom = min(height, top + RENDER_ROWS)
        lo, hi = max(0, top - halo), min(height, bottom + halo)
        band_u = u[lo:hi]
        hem_b, eos_b, red_b, frac_b, size_b = _lerp(wide, 1, (rows[lo:hi], row_weight[lo:hi]))
        large_rate = frac_b * size_b / areas[1]
        rate = large_rate + frac_b * (1 - size_b) / areas[0]
        centres = [(band_u >= large_rate) & (band_u < rate), band_u < large_rate]
        # scaled so a lone nucleus's bump is 1 at its centre; the disc is where it exceeds 1/2, with a soft rim
        bumps = [gaussian_filter(c.astype(np.float32), s, truncate=3.0) * np.float32(2 * np.pi * s**2)
                 for c, s in zip(centres, sigmas)]
        nuclei = np.clip((np.maximum(*bumps) - 0.5) * 4.0 + 0.5, 0.0, 1.0)
        # fine eosin grain (cytoplasm, fibres) from the same uniform draw: mean zero, so the stain is unbiased
        eos_b = eos_b * (1.0 + 0.4 * (band_u - 0.5))
        od_h = hem_b + NUCLEUS_OD * nuclei
        keep = slice(top - lo, top - lo + bottom - top)
        for ch in range(3):
            total = od_h[keep] * HEMATOXYLIN_OD[ch] + eos_b[keep] * EOSIN_OD[ch] + red_b[keep] * ERYTHROCYTE_OD[ch]
            image[top:bottom, :, ch] = np.clip(255.0 * np.exp(-total), 0, 255).round()
    return image


def _check_options(seed: int, n_genes: int, pixel_size_um: float, spots_per_sample: tuple[int, int]) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}", field="seed")
    if n_genes < 20:
        raise DataError(f"n_genes must be at least 20 (organ-specific and unmeasured gene sets), got {n_genes}",
                        field="n_genes")
    # finer than 0.5 um/px the legacy-ST slides pass 10^8 pixels; coarser than 2 um/px nuclei are under a pixel
    if not 0.5 <= pixel_size_um <= 2.0:
        raise DataError(f"pixel_size_um must be in [0.5, 2] um/px, got {pixel_size_um}", field="pixel_size_um")
    lo, hi = spots_per_sample
    if not 10 <= lo <= hi <= 5000:
        raise DataError(f"spots_per_sample must be (low, high) with 10 <= low <= high <= 5000, got {spots_per_sample}",
                        field="spots_per_sample")


def synthesize_sample(
    spec: SampleSpec,
    *,
    seed: int = 0,
    n_genes: int = 200,
    pixel_size_um: float = 1.0,
    spots_per_sample: tuple[int, int] = (200, 350),
) -> SyntheticSample:
    """Generate one sample in memory (see the module docstring for the model).

    Args:
        spec: which sample (from :func:`corpus_plan`).
        seed: corpus seed; the sample draws from the random stream (seed, 1, spec.index).
        n_genes: genes in the corpus gene universe (each organ measures 90% of them).
        pixel_size_um: micrometres per slide pixel (0.5 to 2).
        spots_per_sample: range of the target number of in-tissue spots (the actual number varies around it).

    Returns:
        A :class:`SyntheticSample`.
    """
    _check_options(seed, n_genes, pixel_size_um, spots_per_sample)
    genes = _gene_model(seed, n_genes)
    rng = np.random.default_rng([seed, 1, spec.index])
    target = int(rng.integers(spots_per_sample[0], spots_per_sample[1] + 1))
    layout = _layout(spec, rng, target)
    inside = layout.inside_um(layout.xy_um[:, 0], layout.xy_um[:, 1])
    in_tissue = inside > 0
    # a few spots on bare glass (as in a real array's off-tissue positions) give the tissue filter work
    far = np.flatnonzero(inside < -OFF_TISSUE_MIN_UM)
    n_off = min(len(far), max(3, int(round(0.03 * in_tissue.sum()))))
    keep = in_tissue.copy()
    keep[rng.choice(far, n_off, replace=False)] = True
    xy_um = layout.xy_um[keep]
    in_tissue = in_tissue[keep]
    n = len(xy_um)

    props = layout.proportions(xy_um[:, 0], xy_um[:, 1]).T * in_tissue[:, None]  # (N, K)
    o = ORGANS.index(spec.organ)
    cols = np.flatnonzero(genes.measured[o])
    patient_rng = np.random.default_rng([seed, 2, spec.patient_index])
    patient_effect = patient_rng.normal(0.0, 0.1, n_genes)  # shared by a patient's sections
    log_rate = (genes.baseline + genes.organ_effect[o] + patient_effect)[cols] + props @ genes.loadings[:, cols]
    # off-tissue spots carry ambient RNA: the sample's mean in-tissue composition
    composition = softmax(log_rate, axis=1)
    composition[~in_tissue] = composition[in_tissue].mean(axis=0)
    depth = spec.technology.depth * np.exp(rng.normal(0.0, 0.3, n)) * np.where(in_tissue, 1.0, AMBIENT_DEPTH)
    mu = depth[:, None] * composition
    counts = rng.poisson(rng.gamma(NB_THETA, mu / NB_THETA)).astype(np.float32)  # gamma-Poisson = NB

    image = _render(layout, rng, pixel_size_um)
    barcodes = _barcodes(spec, layout, keep, rng)
    obs = pd.DataFrame({"in_tissue": in_tissue.astype(np.int64), "array_row": layout.array_row[keep].astype(np.int64),
                        "array_col": layout.array_col[keep].astype(np.int64)}, index=pd.Index(barcodes))
    names = [g.name for g in PROGRAMMES]
    var = pd.DataFrame({
        "programme": [names[m] if m >= 0 else "" for m in genes.marker[cols]],
        "organ_specific": [ORGANS[s].name if s >= 0 else "" for s in genes.specific_to[cols]],
    }, index=pd.Index(genes.names[cols]))
    adata = ad.AnnData(sp.csr_matrix(counts), obs=obs, var=var)
    adata.obsm["spatial"] = xy_um / pixel_size_um
    adata.obsm["programmes"] = props.astype(np.float32)
    generator = dict(name=GENERATOR, version=__version__, seed=int(seed), sample_index=spec.index,
                     n_genes=int(n_genes), pixel_size_um=float(pixel_size_um),
                     spots_per_sample=[int(v) for v in spots_per_sample], programmes=names)
    adata.uns["source"] = SOURCE
    adata.uns["synthetic"] = generator
    tech = spec.technology
    metadata = dict(
        dataset_title=SOURCE,
        source=SOURCE,
        license=LICENSE,
        organ=spec.organ.name,
        tissue=spec.organ.name,
        species=spec.organ.species,
        patient=spec.patient,
        st_technology=tech.name,
        disease_state="Synthetic",
        preservation_method="Synthetic",
        inter_spot_dist=tech.pitch_um,
        spot_diameter=tech.spot_diameter_um,
        pixel_size_um_embedded=float(pixel_size_um),
        synthetic=generator,
    )
    return SyntheticSample(spec.sample_id, adata, image, metadata)


def make_synthetic_corpus(
    out: PathLike,
    *,
    n_samples: int = 4,
    seed: int = 0,
    n_genes: int = 200,
    pixel_size_um: float = 1.0,
    spots_per_sample: tuple[int, int] = (200, 350),
    overwrite: bool = False,
) -> Path:
    """Write the synthetic corpus as a HEST-layout root (``st/``, ``wsis/``, ``metadata/``).

    Samples are laid out by :func:`corpus_plan` and generated by :func:`synthesize_sample`; each is written with
    :func:`spfm.data.hest.write_sample` (atomic files, metadata last). The same seed gives the same counts and
    images; sample ``i`` does not depend on ``n_samples``.

    Args:
        out: the HEST root to create.
        n_samples: number of samples (default 4: two organs, three patients, two technologies).
        seed: corpus seed.
        n_genes: size of the gene universe.
        pixel_size_um: micrometres per slide pixel, 0.5 to 2 (1.0 renders the default corpus in a few seconds;
            patches at the default 0.5 um/px are then upsampled 2x; 0.5 is HEST's patch resolution, 4x the pixels).
        spots_per_sample: range of the target number of in-tissue spots per sample.
        overwrite: replace samples of the same ids already under ``out`` (other samples there are left alone).

    Returns:
        The HEST root.
    """
    _check_options(seed, n_genes, pixel_size_um, spots_per_sample)
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise DataError("output exists and is not a directory", path=root)
    specs = corpus_plan(n_samples)
    if not overwrite:
        for spec in specs:
            existing = root / "metadata" / f"{spec.sample_id}.json"
            if existing.exists():
                raise DataError(f"sample {spec.sample_id!r} already exists (pass overwrite=True to replace it)",
                                path=existing)
    for spec in specs:
        sample = synthesize_sample(spec, seed=seed, n_genes=n_genes, pixel_size_um=pixel_size_um,
                                   spots_per_sample=spots_per_sample)
        write_sample(root, sample.sample_id, sample.adata, sample.image, sample.metadata, overwrite=overwrite)
    return root
