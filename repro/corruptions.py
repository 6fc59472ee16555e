"""Common corruptions in the spirit of CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019), computed
on the fly from the CIFAR-10 test set: no download, deterministic given a seed.

    x_c = corrupt(x, "gaussian_noise", severity=3, seed=0)   # float NCHW in [0, 1]

``x``: uint8 or float NCHW images in [0, 1] (any device; Pillow-based corruptions run on the
CPU). The result is quantised to 1/255 steps, as CIFAR-10-C stores uint8 images.

Severity parameters (levels 1-5) follow the CIFAR-10-C generation script
(``make_cifar_c.py`` in hendrycks/robustness) as we know it; the implementations are ours
(torch ops and Pillow instead of scikit-image / Wand / OpenCV), so pixel values differ from the
released CIFAR-10-C files and accuracies are comparable within this book, not with published
CIFAR-10-C tables:

- ``gaussian_noise``: x + N(0, c²), c = .04 .06 .08 .09 .10
- ``shot_noise``: Poisson(x·c)/c, c = 500 250 100 75 50
- ``impulse_noise``: salt & pepper on a fraction c of values, c = .01 .02 .03 .05 .07
- ``speckle_noise``: x + x·N(0, c²), c = .06 .10 .12 .16 .20
- ``gaussian_blur``: Gaussian filter σ = .4 .6 .7 .8 1 (truncated at 4σ, edges replicated)
- ``contrast``: (x − m)·c + m with m the per-image channel mean, c = .75 .5 .4 .3 .15
- ``brightness``: HSV value + c (clipped), c = .05 .10 .15 .20 .30
- ``jpeg_compression``: Pillow JPEG at quality 80 65 58 50 40
- ``pixelate``: box-downsample to 32·c pixels and box-upsample back, c = .95 .9 .85 .75 .65

Weather corruptions (fog, frost, snow) need texture assets and are left out.
"""
from __future__ import annotations

import io
import zlib

import numpy as np
import torch
import torch.nn.functional as F

from repro.attacks import check_images

SEVERITIES = (1, 2, 3, 4, 5)

PARAMS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "brightness": (0.05, 0.10, 0.15, 0.20, 0.30),
    "jpeg_compression": (80, 65, 58, 50, 40),
    "pixelate": (0.95, 0.90, 0.85, 0.75, 0.65),
}
NAMES = tuple(PARAMS)
FAMILIES = {"noise": ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"),
            "blur": ("gaussian_blur",),
            "digital": ("contrast", "brightness", "jpeg_compression", "pixelate")}


def _generator(name: str, severity: int, seed: int, device) -> torch.Generator:
    # A stable seed per (corruption, severity, seed): zlib.crc32, not Python's salted hash().
    s = zlib.crc32(f"{name}/{severity}/{seed}".encode())
    return torch.Generator(device=device).manual_seed(s)


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


def _gaussian_noise(x, c, g):
    return x + c * torch.randn(x.shape, generator=g, device=x.device)


def _shot_noise(x, c, g):
    return torch.poisson(x * c, generator=g) / c


def _impulse_noise(x, c, g):
    u = torch.rand(x.shape, generator=g, device=x.device)
    salt = torch.rand(x.shape, generator=g, device=x.device) < 0.5
    hit = u < c
    return torch.where(hit, salt.to(x.dtype), x)


def _speckle_noise(x, c, g):
    return x + x * c * torch.randn(x.shape, generator=g, device=x.device)


def _gaussian_blur(x, sigma, g):
    radius = int(4.0 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    n, ch, h, w = x.shape
    y = x.reshape(n * ch, 1, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    return y.reshape(n, ch, h, w)


def _contrast(x, c, g):
    m = x.mean(dim=(2, 3), keepdim=True)
    return (x - m) * c + m


def _brightness(x, c, g):
    # HSV with hue and saturation fixed: RGB scales with V; black pixels (S = 0) become grey.
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + c).clamp(max=1.0)
    scale = torch.where(v > 0, v_new / v.clamp(min=1e-12), torch.zeros_like(v))
    return torch.where(v > 0, x * scale, v_new.expand_as(x))


def _pil_map(x, fn):
    from PIL import Image
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty_like(arr)
    for i, im in enumerate(arr):
        out[i] = np.asarray(fn(Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im)))\
            .reshape(im.shape)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div(255).to(x.device)


def _jpeg(x, quality, g):
    from PIL import Image

    def f(im):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=int(quality))
        buf.seek(0)
        return Image.open(buf).convert(im.mode)
    return _pil_map(x, f)


def _pixelate(x, c, g):
    from PIL import Image
    h, w = x.shape[2:]

    def f(im):
        return im.resize((int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.BOX)
    return _pil_map(x, f)


_FUNCS = {"gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise,
          "impulse_noise": _impulse_noise, "speckle_noise": _speckle_noise,
          "gaussian_blur": _gaussian_blur, "contrast": _contrast, "brightness": _brightness,
          "jpeg_compression": _jpeg, "pixelate": _pixelate}


def corrupt(x: torch.Tensor, name: str, severity: int, seed: int = 0, *,
            quantize: bool = True) -> torch.Tensor:
    """``x`` (uint8 or float NCHW in [0, 1]) under corruption ``name`` at ``severity`` (1-5):
    float images in [0, 1], the same for the same (x, name, severity, seed)."""
    if name not in PARAMS:
        raise ValueError(f"unknown corruption {name!r}; choose one of {', '.join(NAMES)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    if x.dim() != 4:
        raise ValueError(f"expected NCHW images, got shape {tuple(x.shape)}")
    check_images(x, "corruptions.corrupt", allow_uint8=True)
    xf = _to_float(x)
    g = _generator(name, severity, seed, xf.device)
    out = _FUNCS[name](xf, PARAMS[name][severity - 1], g).clamp(0, 1)
    if quantize:
        out = (out * 255).round() / 255
    return out


def corrupt_uint8(x: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """As ``corrupt``, stored as uint8 (a quarter of the memory; exact, since quantised)."""
    return (corrupt(x, name, severity, seed) * 255).round().to(torch.uint8)


def distortion(x: torch.Tensor, name: str, severity: int, seed: int = 0) -> float:
    """Mean absolute pixel change of a corruption, on the [0, 1] scale."""
    return float((corrupt(x, name, severity, seed) - _to_float(x)).abs().mean())


def severity_stats(x: torch.Tensor, names=NAMES, seed: int = 0) -> dict[str, list[float]]:
    """``distortion`` for every corruption and severity (a table of the suite's strength)."""
    return {n: [distortion(x, n, s, seed) for s in SEVERITIES] for n in names}

