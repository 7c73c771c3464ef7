import gzip
import shutil

import pytest
import torch

from study.engine import data
from tests.conftest import make_idx_dir, real_data_present


def test_tiny_files_load_through_the_real_loader(tiny_data):
    assert tiny_data.train_x.shape == (600, 784) and tiny_data.test_x.shape == (200, 784)
    assert tiny_data.train_x.dtype == torch.float32
    assert 0.0 <= float(tiny_data.train_x.min()) and float(tiny_data.train_x.max()) <= 1.0
    assert tiny_data.train_y.dtype == torch.int64
    assert set(tiny_data.train_y.tolist()) == set(range(10))


def test_pixels_survive_the_round_trip(tmp_path):
    src = tmp_path / "src"
    sums = make_idx_dir(src, n_train=20, n_test=10, seed=3)
    raw = gzip.decompress((src / "train-images-idx3-ubyte.gz").read_bytes())[16:]
    ds = data.load(src, cache=tmp_path / "cache", checksums=sums)
    assert torch.equal((ds.train_x[0] * 255).round().to(torch.uint8),
                       torch.tensor(list(raw[:784]), dtype=torch.uint8))


def test_corrupt_file_is_named_with_what_to_do(tmp_path):
    src = tmp_path / "src"
    sums = make_idx_dir(src, n_train=20, n_test=10)
    sums["train-labels-idx1-ubyte"] = "0" * 32
    with pytest.raises(data.DataError) as err:
        data.load(src, cache=tmp_path / "cache", checksums=sums)
    assert "train-labels-idx1-ubyte" in str(err.value) and "corrupt or partial" in str(err.value)


def test_truncated_archive_is_reported(tmp_path):
    src = tmp_path / "src"
    sums = make_idx_dir(src, n_train=20, n_test=10)
    packed = src / "t10k-images-idx3-ubyte.gz"
    packed.write_bytes(packed.read_bytes()[:50])
    with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte.gz.*corrupt or partial"):
        data.load(src, cache=tmp_path / "cache", checksums=sums)


def test_search_order_prefers_study_data_dir(tmp_path, monkeypatch):
    src = tmp_path / "mine"
    make_idx_dir(src, n_train=20, n_test=10)
    monkeypatch.setenv("STUDY_DATA_DIR", str(src))
    assert data.candidates()[0] == src
    assert data.locate(download_to=None) == src


def test_missing_data_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "candidates", lambda: [tmp_path / "nowhere"])
    # The next step depends on the machine; the CLI test covers the one without apt-get.
    fix = "apt-get install dataset-fashion-mnist" if shutil.which("apt-get") else "not available"
    with pytest.raises(data.DataError, match=f"nowhere.*{fix}"):
        data.locate(download_to=None)


def test_subset_takes_the_first_images(tiny_data):
    sub = tiny_data.subset(100)
    assert torch.equal(sub.train_x, tiny_data.train_x[:100])
    assert torch.equal(sub.test_x, tiny_data.test_x)
    with pytest.raises(data.DataError, match="train_subset"):
        tiny_data.subset(10_000)


@pytest.mark.skipif(not real_data_present(), reason="Fashion-MNIST not installed (CI installs it)")
def test_real_fashion_mnist_matches_published_checksums():
    ds = data.load()
    assert ds.train_x.shape == (60000, 784) and ds.test_x.shape == (10000, 784)
    assert torch.bincount(ds.test_y).tolist() == [1000] * 10


def test_workers_staging_the_same_files_at_once_all_succeed(tiny_files, tmp_path):
    # Ray tasks on one node load the data at the same moment into one cache: each must end
    # with the verified files, none with a rename of a temporary file another one moved.
    from concurrent.futures import ThreadPoolExecutor

    folder, checksums = tiny_files
    for attempt in range(5):
        cache = tmp_path / f"cache{attempt}"
        with ThreadPoolExecutor(8) as pool:
            done = list(pool.map(lambda _: data.stage(folder, cache, checksums), range(8)))
        assert done == [cache] * 8
        raw = cache / "FashionMNIST" / "raw"
        assert sorted(p.name for p in raw.iterdir()) == sorted(checksums)  # no .part left
