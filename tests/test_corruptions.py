"""The corruption suite (repro.corruptions) on real CIFAR-10 test images."""
import pytest
import torch

from repro import corruptions, data


@pytest.fixture(scope="module")
def x():
    return data.load("cifar10").x_test[:64]


@pytest.mark.parametrize("name", corruptions.NAMES)
def test_shape_range_quantised(x, name):
    out = corruptions.corrupt(x, name, 3)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal((out * 255).round() / 255, out)
    assert not torch.equal(out, x.float() / 255)  # it does something


@pytest.mark.parametrize("name", corruptions.NAMES)
def test_severity_monotonic(x, name):
    d = [corruptions.distortion(x, name, s) for s in corruptions.SEVERITIES]
    assert all(a < b for a, b in zip(d, d[1:])), d


@pytest.mark.parametrize("name", corruptions.NAMES)
def test_deterministic(x, name):
    a = corruptions.corrupt(x, name, 2, seed=5)
    b = corruptions.corrupt(x.clone(), name, 2, seed=5)
    assert torch.equal(a, b)
    u = corruptions.corrupt_uint8(x, name, 2, seed=5)
    assert u.dtype == torch.uint8 and torch.equal(u.float() / 255, a)


def test_seed_changes_noise_only(x):
    assert not torch.equal(corruptions.corrupt(x, "gaussian_noise", 1, seed=0),
                           corruptions.corrupt(x, "gaussian_noise", 1, seed=1))
    assert torch.equal(corruptions.corrupt(x, "contrast", 1, seed=0),
                       corruptions.corrupt(x, "contrast", 1, seed=1))


def test_float_and_uint8_inputs_agree(x):
    for name in ("gaussian_blur", "jpeg_compression", "brightness"):
        assert torch.equal(corruptions.corrupt(x, name, 4), corruptions.corrupt(x.float() / 255, name, 4))


def test_known_values():
    # contrast scales deviations from the per-channel mean; brightness keeps hue (RGB ratios)
    x = torch.tensor([0.2, 0.6]).view(1, 1, 1, 2).expand(1, 3, 1, 2).contiguous()
    c = corruptions.corrupt(x, "contrast", 1, quantize=False)
    assert torch.allclose(c[0, 0, 0], torch.tensor([0.4 - 0.2 * 0.75, 0.4 + 0.2 * 0.75]))
    rgb = torch.tensor([0.2, 0.4, 0.8]).view(1, 3, 1, 1)
    b = corruptions.corrupt(rgb, "brightness", 5, quantize=False)  # V 0.8 -> 1.0
    assert torch.allclose(b.flatten(), torch.tensor([0.25, 0.5, 1.0]))
    black = torch.zeros(1, 3, 1, 1)
    assert torch.allclose(corruptions.corrupt(black, "brightness", 1, quantize=False), torch.full((1, 3, 1, 1), 0.05))


def test_bad_arguments(x):
    with pytest.raises(ValueError, match="unknown corruption"):
        corruptions.corrupt(x, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        corruptions.corrupt(x, "contrast", 6)
