import gzip
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from repro import data


@pytest.mark.parametrize("name,shape,n_classes", [
    ("mnist", (1, 28, 28), 10), ("cifar10", (3, 32, 32), 10), ("cifar100", (3, 32, 32), 100)])
def test_prepared_root_gives_nchw_uint8_splits(data_root, name, shape, n_classes):
    ds = data.load(name, data_root, val_size=1000)
    assert ds.x_train.dtype == torch.uint8 and ds.x_train.shape[1:] == shape
    assert ds.x_test.shape == (10_000, *shape)
    assert len(ds.x_train) + len(ds.x_val) == (60_000 if name == "mnist" else 50_000)
    assert len(ds.x_val) == 1000 and ds.num_classes == n_classes
    assert ds.y_train.dtype == torch.int64 and int(ds.y_train.max()) == n_classes - 1
    # Validation images are held out of train: their positions in the stored order are disjoint.
    assert not set(ds.extras["train_index"]) & set(ds.extras["val_index"])


def test_validation_split_is_deterministic(mnist, data_root):
    again = data.load("mnist", data_root)
    assert torch.equal(mnist.x_val, again.x_val) and torch.equal(mnist.y_val, again.y_val)
    other = data.load("mnist", data_root, seed=1)
    assert not torch.equal(mnist.y_val, other.y_val)


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(data.DataNotFoundError) as e:
        data.load("cifar10", tmp_path / "nowhere")
    msg = str(e.value)
    assert "cifar10.npz" in msg and "cifar-10-batches-py" in msg and "To get it" in msg


def test_download_without_torchvision_is_still_a_clear_error(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def broken(name, *a, **k):
        if name.startswith("torchvision"):
            raise ImportError("libcudart.so.12: cannot open shared object file")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", broken)
    with pytest.raises(data.DataNotFoundError, match="torchvision does not import"):
        data.load("mnist", tmp_path, download=True)


def test_env_var_sets_the_root(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_DATA", str(tmp_path))
    assert data.data_root() == tmp_path
    with pytest.raises(data.DataNotFoundError, match=str(tmp_path)):
        data.load("mnist")


def _nhwc(ds, n):
    return ds.x_test[:n].permute(0, 2, 3, 1).numpy(), ds.y_test[:n].numpy()


def test_torchvision_cifar10_layout_is_read_without_torchvision(cifar10, tmp_path):
    x, y = _nhwc(cifar10, 60)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rows = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
    for i in range(1, 6):  # five train batches of 10 images, as torchvision's pickles
        sl = slice((i - 1) * 10, i * 10)
        pickle.dump({"data": rows[sl], "labels": y[sl].tolist()}, open(folder / f"data_batch_{i}", "wb"))
    pickle.dump({"data": rows[50:], "labels": y[50:].tolist()}, open(folder / "test_batch", "wb"))
    pickle.dump({"label_names": cifar10.classes}, open(folder / "batches.meta", "wb"))
    ds = data.load("cifar10", tmp_path, val_size=5)
    assert ds.source.endswith("cifar-10-batches-py") and ds.classes == cifar10.classes
    assert torch.equal(ds.x_test, cifar10.x_test[50:60])
    both = torch.cat([ds.x_train, ds.x_val])
    assert both.shape == (50, 3, 32, 32)
    assert sorted(map(bytes, both.numpy())) == sorted(map(bytes, cifar10.x_test[:50].numpy()))


def test_torchvision_cifar100_layout(cifar100, tmp_path):
    x, y = _nhwc(cifar100, 30)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rows = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
    pickle.dump({"data": rows[:20], "fine_labels": y[:20].tolist()}, open(folder / "train", "wb"))
    pickle.dump({"data": rows[20:], "fine_labels": y[20:].tolist()}, open(folder / "test", "wb"))
    pickle.dump({"fine_label_names": cifar100.classes}, open(folder / "meta", "wb"))
    ds = data.load("cifar100", tmp_path, val_size=2)
    assert torch.equal(ds.x_test, cifar100.x_test[20:30]) and ds.num_classes == 100


def _write_idx(path, arr):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_torchvision_mnist_raw_layout(mnist, tmp_path):
    x, y = mnist.x_test[:40, 0].numpy(), mnist.y_test[:40].numpy()
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _write_idx(raw / "train-images-idx3-ubyte.gz", x[:30])
    _write_idx(raw / "train-labels-idx1-ubyte.gz", y[:30])
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", x[30:])
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", y[30:])
    ds = data.load("mnist", tmp_path, val_size=3)
    assert ds.x_test.shape == (10, 1, 28, 28)
    assert torch.equal(ds.x_test, mnist.x_test[30:40]) and torch.equal(ds.y_test, mnist.y_test[30:40])


def test_augment_is_a_padded_crop_or_flip_of_the_image(cifar10):
    x = cifar10.x_train[:64]
    out = data.augment(x, generator=torch.Generator().manual_seed(3))
    again = data.augment(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, again) and out.dtype == torch.uint8 and out.shape == x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(len(x)):
        windows = [padded[i, :, r:r + 32, c:c + 32] for r in range(9) for c in range(9)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)
    assert not torch.equal(out, x)  # some image moved


def test_augment_crops_where_its_cpu_draws_say(cifar10):
    # The draws (x offsets, y offsets, flips) come from the CPU generator in this order on any
    # device, so a GPU run crops exactly as a CPU run (and a resumed one) does.
    x = cifar10.x_train[:16]
    out = data.augment(x, generator=torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    dx, dy = torch.randint(0, 9, (16,), generator=g), torch.randint(0, 9, (16,), generator=g)
    flips = torch.rand(16, generator=g) < 0.5
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(16):
        want = padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        assert torch.equal(out[i], want.flip(-1) if flips[i] else want)
    assert flips.any() and not flips.all()


def test_train_batches_resume_exactly_mid_epoch(mnist):
    x, y = mnist.x_train[:256], mnist.y_train[:256]
    full = list(data.train_batches(x, y, 32, seed=5, epoch=2))
    tail = list(data.train_batches(x, y, 32, seed=5, epoch=2, start_step=3))
    assert len(full) == 8 and len(tail) == 5
    for (a, ya), (b, yb) in zip(full[3:], tail):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    assert 0.0 <= float(full[0][0].min()) and float(full[0][0].max()) <= 1.0
    other_epoch = next(data.train_batches(x, y, 32, seed=5, epoch=3))
    assert not torch.equal(other_epoch[1], full[0][1])


def test_limit_and_to(mnist):
    small = mnist.limit(100, 10, 20)
    assert len(small.y_train) == 100 and len(small.y_val) == 10 and len(small.y_test) == 20
    assert small.to("cpu").x_train.device.type == "cpu"
