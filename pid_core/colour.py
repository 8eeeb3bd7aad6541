"""Colour against a colour reference (docs/DESIGN.md §15): how far a decode's colours are from a reference
image's, and a match that gives the decode the reference's low-frequency colour while keeping its detail.

The reference is an image of the same scene with trusted colours, usually smaller: the VAE decode of the
same latent, or the source image of an upscale. Everything here takes [B, 3, H, W] tensors in [0, 1]
(sRGB-encoded, as decoders output them), on any device, and works in float32 whatever the input's dtype.

    colour_error(image, reference)            mean CIEDE2000 and channel-mean offset, per image
    match_colour(image, reference, strength)  local colour transfer; strength 0 returns the input itself
    check_colour_reference(reference, ...)    the one check of a reference against a decode's output
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .checks import all_finite, whole_number
from .errors import ArgumentError, ColourReferenceError

ASPECT_TOLERANCE = 0.01  # a reference's width / height may differ from the output's by 1%
RANGE_SLACK = 0.05  # values this far outside [0, 1] are clipped; further out, the image has another scale

# Rows of a canvas handled at once: about this many pixels per image (a few of the chunk's temporaries
# hold 12 float32 values per pixel: 48 MiB at 2^20 pixels).
CHUNK_PIXELS = 1 << 20

# The space the colours are fitted in, chosen by measurement (docs/DESIGN.md §15): "srgb" (the values as
# they are), "linear" (linear-light RGB) or "lab" (CIELAB / 100).
SPACES = ("srgb", "linear", "lab")
DEFAULT_SPACE = "srgb"

# The fit (docs/DESIGN.md §15): cells of about 1/CELLS of the shorter side (at least MIN_CELL reference
# pixels), each fitted over the 3 x 3 cells around it from CELL_SAMPLES x CELL_SAMPLES area means per
# cell: colours at the scale of objects, where a cast shows and where the reference and the image agree
# even when the reference is softer than the image (a VAE decode is); finer samples would read the
# reference's softness as a contrast loss and take detail away.
CELLS = 16
CELL_SAMPLES = 2
MIN_CELL = 4
# Ridge of the fit toward the identity, in squared units of the space (0.01^2: a standard deviation of
# about 2.5 levels): along colour directions in which a window varies less than that, its transform
# stays a shift of the colours (a plain low-band swap) instead of guessing a gain from noise.
RIDGE = 0.01**2

# sRGB (IEC 61966-2-1) primaries to CIE XYZ, D65 white; the white point is the matrix's row sums.
_RGB_TO_XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)
_WHITE_D65 = (0.95047, 1.0, 1.08883)


# --------------------------------------------------------------------------------------------------
# The reference check


def check_colour_reference(reference, output_hw: tuple[int, int], batch: int) -> None:
    """Refuse a colour reference that cannot serve a decode of `batch` images of output_hw = (H, W):
    not a [B, 3, h, w] floating-point tensor, another aspect ratio (beyond ASPECT_TOLERANCE), a batch
    that is neither 1 (one reference for every image) nor `batch`, values that are not finite or not on
    the 0..1 scale. Any size is fine. Raises ColourReferenceError with a one-line message; returns None
    when the reference fits."""
    H, W = (int(s) for s in output_hw)
    if not isinstance(reference, torch.Tensor):
        raise ColourReferenceError(f"The colour reference must be an image tensor, got {type(reference).__name__}.")
    if reference.dim() == 3:
        reference = reference[None]
    if reference.dim() != 4:
        raise ColourReferenceError(
            f"The colour reference must be an image of shape [batch, 3, height, width], got shape "
            f"{list(reference.shape)}.")
    b, c, h, w = reference.shape
    if c != 3:
        raise ColourReferenceError(
            f"The colour reference has {c} colour channel{'' if c == 1 else 's'}; it must have 3 (RGB): "
            f"convert it to RGB first.")
    if h < 1 or w < 1:
        raise ColourReferenceError(f"The colour reference is empty ({w}x{h} pixels).")
    if not reference.is_floating_point():
        raise ColourReferenceError(
            f"The colour reference holds {str(reference.dtype).replace('torch.', '')} values; it must hold "
            f"floating-point values from 0 to 1.")
    if abs((w / h) / (W / H) - 1) > ASPECT_TOLERANCE:
        raise ColourReferenceError(
            f"The colour reference is {w}x{h} (aspect ratio {w / h:.3f}) but the decoded image is {W}x{H} "
            f"({W / H:.3f}): give a reference of the same scene with the image's aspect ratio (within "
            f"{ASPECT_TOLERANCE:.0%}), e.g. {W // 4}x{H // 4}.")
    if b not in (1, batch):
        raise ColourReferenceError(
            f"The colour reference holds {b} images but the decode makes {batch}: give one reference for "
            f"all images or one per image.")
    if not all_finite(reference):
        raise ColourReferenceError("The colour reference holds NaN or infinite values: it is damaged; "
                                   "use another reference image.")
    low, high = (float(v) for v in torch.aminmax(reference.float()))
    if low < -RANGE_SLACK or high > 1 + RANGE_SLACK:
        raise ColourReferenceError(
            f"The colour reference holds values from {low:g} to {high:g}; it must hold values from 0 to 1 "
            f"(8-bit images divided by 255).")


# --------------------------------------------------------------------------------------------------
# Colour spaces (float math; values outside [0, 1] are clipped where a power needs it)


def srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.where(x <= 0.0031308, x * 12.92, 1.055 * x ** (1 / 2.4) - 0.055)


def _mix(x: torch.Tensor, matrix) -> torch.Tensor:
    """Per-pixel 3x3 matrix on the channel dimension (dim 1) of [B, 3, ...]."""
    m = torch.tensor(matrix, dtype=x.dtype, device=x.device)
    return torch.einsum("ij,bj...->bi...", m, x)


def srgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, ...] sRGB in [0, 1] -> CIELAB (D65): L 0..100, a and b about -128..127."""
    xyz = _mix(srgb_to_linear(x), _RGB_TO_XYZ)
    white = torch.tensor(_WHITE_D65, dtype=x.dtype, device=x.device).view(1, 3, *([1] * (x.dim() - 2)))
    t = xyz / white
    delta = 6 / 29
    f = torch.where(t > delta**3, t.clamp(min=0) ** (1 / 3), t / (3 * delta**2) + 4 / 29)
    fx, fy, fz = f.unbind(1)
    return torch.stack((116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)), 1)


def lab_to_srgb(lab: torch.Tensor) -> torch.Tensor:
    L, a, b = lab.unbind(1)
    fy = (L + 16) / 116
    f = torch.stack((fy + a / 500, fy, fy - b / 200), 1)
    delta = 6 / 29
    t = torch.where(f > delta, f**3, 3 * delta**2 * (f - 4 / 29))
    white = torch.tensor(_WHITE_D65, dtype=lab.dtype, device=lab.device).view(1, 3, *([1] * (lab.dim() - 2)))
    inverse = torch.linalg.inv(torch.tensor(_RGB_TO_XYZ, dtype=torch.float64)).tolist()
    return linear_to_srgb(_mix(t * white, inverse))


def _to_space(x: torch.Tensor, space: str) -> torch.Tensor:
    if space == "srgb":
        return x
    if space == "linear":
        return srgb_to_linear(x)
    return srgb_to_lab(x) / 100


def _from_space(x: torch.Tensor, space: str) -> torch.Tensor:
    if space == "srgb":
        return x
    if space == "linear":
        return linear_to_srgb(x)
    return lab_to_srgb(x * 100)


def ciede2000(lab1: torch.Tensor, lab2: torch.Tensor) -> torch.Tensor:
    """CIEDE2000 colour difference (kL = kC = kH = 1) of CIELAB colours along dim 1 ([B, 3, ...] -> [B, ...])."""
    L1, a1, b1 = lab1.unbind(1)
    L2, a2, b2 = lab2.unbind(1)
    c_mean = (torch.hypot(a1, b1) + torch.hypot(a2, b2)) / 2
    g = 0.5 * (1 - torch.sqrt(c_mean**7 / (c_mean**7 + 25.0**7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = torch.hypot(a1p, b1), torch.hypot(a2p, b2)
    h1p = torch.rad2deg(torch.atan2(b1, a1p)) % 360  # atan2(0, 0) = 0, as the formula asks
    h2p = torch.rad2deg(torch.atan2(b2, a2p)) % 360
    chroma = c1p * c2p
    dh = h2p - h1p
    dh = torch.where(dh > 180, dh - 360, torch.where(dh < -180, dh + 360, dh))
    dh = torch.where(chroma == 0, torch.zeros_like(dh), dh)
    dL, dC = L2 - L1, c2p - c1p
    dH = 2 * torch.sqrt(chroma) * torch.sin(torch.deg2rad(dh) / 2)
    L_mean, cp_mean = (L1 + L2) / 2, (c1p + c2p) / 2
    h_sum = h1p + h2p
    h_mean = torch.where((h1p - h2p).abs() <= 180, h_sum / 2, torch.where(h_sum < 360, (h_sum + 360) / 2, (h_sum - 360) / 2))
    h_mean = torch.where(chroma == 0, h_sum, h_mean)
    rad = torch.deg2rad
    T = (1 - 0.17 * torch.cos(rad(h_mean - 30)) + 0.24 * torch.cos(rad(2 * h_mean))
         + 0.32 * torch.cos(rad(3 * h_mean + 6)) - 0.20 * torch.cos(rad(4 * h_mean - 63)))
    d_theta = 30 * torch.exp(-(((h_mean - 275) / 25) ** 2))
    rc = 2 * torch.sqrt(cp_mean**7 / (cp_mean**7 + 25.0**7))
    sl = 1 + 0.015 * (L_mean - 50) ** 2 / torch.sqrt(20 + (L_mean - 50) ** 2)
    sc = 1 + 0.045 * cp_mean
    sh = 1 + 0.015 * cp_mean * T
    rt = -torch.sin(rad(2 * d_theta)) * rc
    tl, tc, th = dL / sl, dC / sc, dH / sh
    return torch.sqrt((tl**2 + tc**2 + th**2 + rt * tc * th).clamp(min=0))


# --------------------------------------------------------------------------------------------------
# Resampling by taps (index, weight) per output row, so that any chunk of output rows is computed from
# exactly the input rows it needs, the same way as the whole: chunked results equal unchunked ones.
# Widths go through the same taps on transposed rows (interpolation: torch's own 1-D kernel).


def _area_taps(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Area downsampling n_in -> n_out <= n_in: output i is the mean of the input over the interval
    [i, i + 1) n_in / n_out, pixels cut by its ends weighted by the part inside (PIL's BOX, OpenCV's
    INTER_AREA; for whole ratios the block mean, which is also torch's "area"). So an image and its
    reference, resampled to one grid, average exactly the same part of the scene whatever their sizes.
    (index [n_out, k], weight [n_out, k]); unused taps have weight 0."""
    if not 1 <= n_out <= n_in:
        raise ValueError(f"area resampling shrinks: {n_in} -> {n_out}")
    i = torch.arange(n_out, dtype=torch.int64)
    lo, hi = i * n_in, (i + 1) * n_in  # the output pixel's interval, in units of 1 / n_out input pixels
    first, end = lo // n_out, (hi + n_out - 1) // n_out  # the input pixels it touches: [first, end)
    j = first[:, None] + torch.arange(int((end - first).max()))
    cover = (torch.minimum((j + 1) * n_out, hi[:, None]) - torch.maximum(j * n_out, lo[:, None])).clamp(min=0)
    return j.clamp(max=n_in - 1), (cover.double() / n_in).float()


def _linear_taps(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear interpolation n_in -> n_out on pixel centres, edges held: torch's "linear" / "bilinear"
    with align_corners=False."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w1 = src - i0
    return torch.stack((i0, i1), 1), torch.stack((1 - w1, w1), 1).float()


class _Rows:
    """Resampling along the height (dim 2 of [B, C, H, W]) by taps, on a device."""

    def __init__(self, taps: tuple[torch.Tensor, torch.Tensor], device):
        index, weight = taps
        self.first = index.min(1).values.tolist()  # (kept on the CPU: no device sync per chunk)
        self.last = index.max(1).values.tolist()
        self.index, self.weight = index.to(device), weight.to(device)

    def span(self, o0: int, o1: int) -> tuple[int, int]:
        """The input rows [r0, r1) that output rows [o0, o1) read."""
        return min(self.first[o0:o1]), max(self.last[o0:o1]) + 1

    def apply(self, x: torch.Tensor, o0: int, o1: int, offset: int) -> torch.Tensor:
        """Output rows [o0, o1) from x, whose row 0 is input row `offset`."""
        index, weight = self.index[o0:o1] - offset, self.weight[o0:o1]
        out = None
        for k in range(index.shape[1]):  # one gathered slab at a time, no [.., rows, k, W] temporary
            term = x.index_select(2, index[:, k]) * weight[:, k, None]
            out = term if out is None else out.add_(term)
        return out


def _area_width(x: torch.Tensor, columns: "_Rows") -> torch.Tensor:
    """Area downsampling along the width with the taps of `columns` (on the transposed rows)."""
    return columns.apply(x.transpose(2, 3).contiguous(), 0, len(columns.first), 0).transpose(2, 3)


def _linear_width(x: torch.Tensor, W: int) -> torch.Tensor:
    B, C, rows, w = x.shape
    return F.interpolate(x.reshape(B * C * rows, 1, w), size=W, mode="linear", align_corners=False).view(B, C, rows, W)


def _rows_per_chunk(batch: int, width: int, chunk_pixels: int) -> int:
    return max(1, chunk_pixels // max(1, batch * width))


def area_resize(x: torch.Tensor, size: tuple[int, int], *, chunk_pixels: int = CHUNK_PIXELS) -> torch.Tensor:
    """Area downsampling (`_area_taps`) of [B, C, H, W] to size (h, w) <= (H, W), in float32, in chunks
    of about chunk_pixels input pixels per image."""
    B, _, H, W = x.shape
    h, w = size
    whole = H % h == 0 and W % w == 0  # block means: one pooling per chunk (PiD's 4x and 8x outputs)
    rows = _Rows(_area_taps(H, h), x.device)
    columns = None if whole or w == W else _Rows(_area_taps(W, w), x.device)
    step = max(1, _rows_per_chunk(B, W, chunk_pixels) * h // H)
    pieces = []
    for o0 in range(0, h, step):
        o1 = min(h, o0 + step)
        r0, r1 = rows.span(o0, o1)
        slab = x[:, :, r0:r1].float()
        if whole:
            pieces.append(F.avg_pool2d(slab, (H // h, W // w)))
        else:
            pieces.append(rows.apply(slab if columns is None else _area_width(slab, columns), o0, o1, offset=r0))
    return torch.cat(pieces, 2)


# --------------------------------------------------------------------------------------------------
# The colour error


class ColourError(NamedTuple):
    """Per image (float64 [B] on the CPU): mean CIEDE2000 over the reference's pixels, and the mean over
    R, G, B of |image mean - reference mean| in 8-bit levels."""

    delta_e: torch.Tensor
    levels: torch.Tensor

    def describe(self) -> str:
        de = ", ".join(f"{v:.2f}" for v in self.delta_e.tolist())
        lv = ", ".join(f"{v:.1f}" for v in self.levels.tolist())
        return f"mean CIEDE2000 {de}; channel means off by {lv} levels"


def describe_match(before: ColourError, after: ColourError, strength: float) -> str:
    """A colour match in words: the error before and after it, and its strength."""
    return f"{before.describe()} before, {after.describe()} after matching (strength {strength:g})"


def _common_grid(image_hw, reference_hw) -> tuple[int, int]:
    """Where image and reference are compared: the reference's pixels, or the image's where the reference
    is larger."""
    return min(image_hw[0], reference_hw[0]), min(image_hw[1], reference_hw[1])


def _on_grid(x: torch.Tensor, size, chunk_pixels: int) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x.float()
    return area_resize(x, size, chunk_pixels=chunk_pixels)


def colour_error(image: torch.Tensor, reference: torch.Tensor, *, chunk_pixels: int = CHUNK_PIXELS) -> ColourError:
    """The image area-downsampled to the reference's size (in sRGB values), then per image the mean
    CIEDE2000 (sRGB -> CIELAB, D65) against the reference and the mean absolute difference of the R, G, B
    means in 8-bit levels. reference: [1 or B, 3, h, w] (check_colour_reference refuses what does not
    fit); a reference larger than the image is area-downsampled to the image's size instead."""
    image = _as_batch(image)
    check_colour_reference(reference, image.shape[-2:], image.shape[0])
    reference = _as_batch(reference)
    B = image.shape[0]
    size = _common_grid(image.shape[-2:], reference.shape[-2:])
    x = _on_grid(image, size, chunk_pixels)
    y = _on_grid(reference.to(x.device), size, chunk_pixels).expand(B, -1, -1, -1)
    h, w = size
    exact = x.device if x.device.type != "mps" else torch.device("cpu")  # (MPS has no float64)
    total = torch.zeros(B, dtype=torch.float64, device=exact)
    step = _rows_per_chunk(B, w, chunk_pixels)
    for r0 in range(0, h, step):  # float64 for the formula's hue angles; chunks bound its temporaries
        lab_x = srgb_to_lab(x[:, :, r0 : r0 + step].to(exact, torch.float64))
        lab_y = srgb_to_lab(y[:, :, r0 : r0 + step].to(exact, torch.float64))
        total += ciede2000(lab_x, lab_y).sum((1, 2))
    means = (x.to(exact, torch.float64).mean((2, 3)) - y.to(exact, torch.float64).mean((2, 3))).abs().mean(1) * 255
    return ColourError((total / (h * w)).cpu(), means.cpu())


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    return x[None] if x.dim() == 3 else x


# --------------------------------------------------------------------------------------------------
# The match
#
# A local colour transfer. A coarse grid of cells lies over the scene (about 16 along the shorter side).
# For each cell, the affine colour transform y = A x + b that best maps the image's colours to the
# reference's over the 3 x 3 cells around it: least squares over area means (CELL_SAMPLES^2 per cell, in
# the chosen space) with a ridge toward A = I. Its b moves the window's mean colour onto the reference's
# (the low band is swapped); its A maps the colours inside the window the way the reference shows they
# should go, which also restores the contrast and saturation a cast took from the detail. Along colour
# directions in which the window hardly varies, A stays I: the detail is left as it is. The transforms
# are averaged over neighbouring cells, interpolated bilinearly to every pixel and applied to the
# full-resolution image in chunks of rows: the whole canvas at once, so neighbouring tiles of a tiled
# decode get one smooth transform and cannot disagree.


def _cell_grid(h: int, w: int, cells: int) -> tuple[int, int]:
    cell = max(MIN_CELL, min(h, w) / cells)
    return max(1, min(h, round(h / cell))), max(1, min(w, round(w / cell)))


_PAIRS = [(i, j) for i in range(3) for j in range(i, 3)]  # the 6 distinct entries of a symmetric 3x3


def _moments(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B, 21, h, w]: x (3), y (3), x_i x_j (6), y_i x_j (9) per pixel."""
    xx = torch.stack([x[:, i] * x[:, j] for i, j in _PAIRS], 1)
    yx = (y[:, :, None] * x[:, None]).flatten(1, 2)
    return torch.cat((x, y, xx, yx), 1)


def _fit(stats: torch.Tensor, ridge: float) -> torch.Tensor:
    """Window moments [B, 21, gh, gw] -> affine transforms [B, 12, gh, gw] (A row-major, then b)."""
    # the 3x3 solves in float64 on the CPU: a few hundred of them, every device has float64 there
    s = stats.permute(0, 2, 3, 1).cpu().double()
    mx, my, xx, yx = s[..., 0:3], s[..., 3:6], s[..., 6:12], s[..., 12:21]
    exx = torch.empty(*s.shape[:-1], 3, 3, dtype=s.dtype, device=s.device)
    for k, (i, j) in enumerate(_PAIRS):
        exx[..., i, j] = exx[..., j, i] = xx[..., k]
    eye = torch.eye(3, dtype=s.dtype, device=s.device)
    cxx = exx - mx[..., :, None] * mx[..., None, :] + ridge * eye
    cyx = yx.reshape(*s.shape[:-1], 3, 3) - my[..., :, None] * mx[..., None, :] + ridge * eye
    a = torch.linalg.solve(cxx, cyx.transpose(-1, -2)).transpose(-1, -2)  # A = Cyx Cxx^-1 (Cxx symmetric)
    b = my - (a @ mx[..., None])[..., 0]
    return torch.cat((a.flatten(-2), b), -1).permute(0, 3, 1, 2).float().to(stats.device)


def _box3(x: torch.Tensor) -> torch.Tensor:
    """Mean over the 3 x 3 cells around each cell (fewer at the borders)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _affine(coeffs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-pixel y = A x + b; coeffs [B, 12, ...] (A row-major, then b), x [B, 3, ...]."""
    out = torch.empty_like(x)
    for i in range(3):
        y = torch.addcmul(coeffs[:, 9 + i], coeffs[:, 3 * i], x[:, 0], out=out[:, i])
        y.addcmul_(coeffs[:, 3 * i + 1], x[:, 1]).addcmul_(coeffs[:, 3 * i + 2], x[:, 2])
    return out


def colour_transforms(image: torch.Tensor, reference: torch.Tensor, *, space: str = DEFAULT_SPACE,
                      cells: int = CELLS, cell_samples: int = CELL_SAMPLES, ridge: float = RIDGE,
                      chunk_pixels: int = CHUNK_PIXELS) -> torch.Tensor:
    """The per-cell affine transforms [B, 12, gh, gw] (float32, in `space`) that match_colour applies."""
    B = image.shape[0]
    size = _common_grid(image.shape[-2:], reference.shape[-2:])
    grid = _cell_grid(*size, cells)
    samples = _common_grid((grid[0] * cell_samples, grid[1] * cell_samples), size)
    # The image as the reference shows a scene (area means on the reference's pixels), then both on the
    # sample grid by the same steps: an image that already matches its reference gives exactly its
    # colours, whatever the sizes. Means are taken of the sRGB values, as colour_error takes them.
    x = _on_grid(_on_grid(image, size, chunk_pixels), samples, chunk_pixels)
    y = _on_grid(reference.to(x.device), size, chunk_pixels)
    y = _on_grid(y, samples, chunk_pixels).expand(B, -1, -1, -1)
    x, y = _to_space(x, space), _to_space(y, space)
    # moments about each image's mean colour, so that float32 sums do not cancel
    centre_x, centre_y = x.mean((2, 3), keepdim=True), y.mean((2, 3), keepdim=True)
    stats = area_resize(_moments(x - centre_x, y - centre_y), grid)
    coeffs = _box3(_fit(_box3(stats), ridge))
    # back from the centred colours: y = A (x - cx) + b + cy
    a = coeffs[:, :9].unflatten(1, (3, 3))
    b = coeffs[:, 9:] + centre_y - (a * centre_x[:, None]).sum(2)
    return torch.cat((coeffs[:, :9], b), 1)


def match_colour(image: torch.Tensor, reference: torch.Tensor, strength: float = 1.0, *, space: str = DEFAULT_SPACE,
                 cells: int = CELLS, cell_samples: int = CELL_SAMPLES, ridge: float = RIDGE,
                 chunk_pixels: int = CHUNK_PIXELS) -> torch.Tensor:
    """The image with the reference's low-frequency colour and its own detail (module notes above).

    image [B, 3, H, W] in [0, 1]; reference [1 or B, 3, h, w] of the same scene, any size with the image's
    aspect ratio (check_colour_reference refuses the others). strength in [0, 1] blends from the image
    (0) to the matched image (1); strength 0 returns `image` itself, untouched. The result has the
    image's dtype and device, clamped to [0, 1]. space, cells, cell_samples and ridge are the method's
    settings, chosen by measurement (module constants; docs/DESIGN.md §15). Memory: the result, the
    image at the reference's size, and chunks of about chunk_pixels pixels per image.
    """
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise ArgumentError(f"The colour match strength must be a number from 0 to 1, got {strength!r}.")
    if space not in SPACES:
        raise ArgumentError(f"Unknown colour space {space!r}: use one of {', '.join(SPACES)}.")
    cells, cell_samples = whole_number(cells, "cells", 1, 4096), whole_number(cell_samples, "cell_samples", 1, 4096)
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not 0 < ridge < math.inf:
        raise ArgumentError(f"The ridge must be a positive number, got {ridge!r}.")
    batched = image.dim() == 4
    check_colour_reference(reference, image.shape[-2:], image.shape[0] if batched else 1)
    if strength == 0:
        return image
    image, reference = _as_batch(image), _as_batch(reference)
    B, _, H, W = image.shape
    coeffs = colour_transforms(image, reference, space=space, cells=cells, cell_samples=cell_samples, ridge=ridge,
                               chunk_pixels=chunk_pixels)
    gh, gw = coeffs.shape[-2:]
    rows = _Rows(_linear_taps(gh, H), image.device)
    out = torch.empty_like(image)
    step = _rows_per_chunk(B, W, chunk_pixels)
    for r0 in range(0, H, step):
        r1 = min(H, r0 + step)
        g0, g1 = rows.span(r0, r1)
        c = _linear_width(rows.apply(coeffs[:, :, g0:g1], r0, r1, offset=g0), W)
        x = image[:, :, r0:r1].float()
        matched = _from_space(_affine(c, _to_space(x, space)), space)
        if strength != 1:
            matched = torch.lerp(x, matched, float(strength))
        out[:, :, r0:r1] = matched.clamp_(0, 1)
    return out if batched else out[0]

