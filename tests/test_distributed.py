"""skpatchcore.distributed on a LocalCluster of 2 single-threaded worker processes: the fit
and the scores equal one machine's, bit for bit, also when a worker dies mid-run."""

import os
import signal
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

distributed = pytest.importorskip("distributed")
db = pytest.importorskip("dask.bag")

from skpatchcore import distributed as skd  # noqa: E402
from skpatchcore import make_patchcore  # noqa: E402
from skpatchcore.datasets import make_defect_images  # noqa: E402


@pytest.fixture(scope="module")
def client():
    with skd.connect(n_workers=2, threads_per_worker=1) as c:
        c.wait_for_workers(2)
        yield c


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """36 PNG paths: 24 normal textures, then 12 with defects; their labels (+1 / -1)."""
    X, y, _ = make_defect_images(24, 12, image_size=64, random_state=0)
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, x in enumerate(X):
        paths.append(str(folder / f"{i:02d}.png"))
        Image.fromarray(x).save(paths[-1])
    return paths, y


def _pipe():
    return make_patchcore(image_size=64, sampling_ratio=0.1, random_state=0)


@pytest.fixture(scope="module")
def local_fit(images):
    paths, _ = images
    return _pipe().fit(paths[:16])


def _assert_same_model(a, b):
    assert np.array_equal(a["detector"].memory_bank_, b["detector"].memory_bank_)
    assert np.array_equal(a["detector"].bank_sample_index_, b["detector"].bank_sample_index_)
    assert np.array_equal(a["coreset"].sample_indices_, b["coreset"].sample_indices_)
    assert a["coreset"].coverage_radius_ == b["coreset"].coverage_radius_
    assert a["detector"].offset_ == b["detector"].offset_
    assert a["detector"].n_features_in_ == b["detector"].n_features_in_


def test_distributed_fit_equals_local_fit(client, images, local_fit):
    paths, _ = images
    fitted = skd.fit(_pipe(), paths[:16], client=client, partition_size=8)
    _assert_same_model(fitted, local_fit)
    assert fitted["detector"].memory_bank_.shape == (103, 168)
    assert np.array_equal(fitted.score_samples(paths[16:]), local_fit.score_samples(paths[16:]))


def test_distributed_fit_with_labels_and_unaligned_parts(client, images):
    paths, y = images
    local = _pipe().fit(paths, y)
    fitted = skd.fit(_pipe(), paths, y, client=client, partition_size=5)
    _assert_same_model(fitted, local)
    assert (y[fitted["coreset"].sample_indices_ // 64] == 1).all()


def test_distributed_scores_and_maps_equal_local(client, images, local_fit, tmp_path):
    paths, y = images
    scores, maps = local_fit.score_and_map(paths)
    bag = skd.score_images(local_fit, paths, client=client, partition_size=8,
                           maps_dir=tmp_path / "maps")
    assert isinstance(bag, db.Bag) and bag.npartitions == 5
    records = bag.compute()
    assert [r["index"] for r in records] == list(range(len(paths)))
    assert [r["path"] for r in records] == paths
    assert np.array_equal([r["score"] for r in records], scores)
    decision = local_fit.decision_function(paths)
    assert np.array_equal([r["decision"] for r in records], decision)
    assert [r["label"] for r in records] == local_fit.predict(paths).tolist()
    for r, m in zip(records, maps, strict=True):
        assert np.array_equal(np.load(r["map"]), m)
    assert sorted(os.listdir(tmp_path / "maps"))[0] == "00000000_00.npy"
    # the defects are found (the scores are real scores)
    assert np.mean(scores[y == -1]) < np.mean(scores[:16])


def test_ordered_parts_and_bag_partitions_equal_local(client, images, local_fit, tmp_path):
    paths, _ = images
    expected = list(local_fit.iter_score_and_grids(paths))
    got = list(skd.iter_score_and_grids(local_fit, paths, client=client, partition_size=8))
    assert [s for s, _, _ in got] == [0, 8, 16, 24, 32]
    assert np.array_equal(np.concatenate([s for _, s, _ in got]),
                          np.concatenate([s for _, s, _ in expected]))
    assert np.array_equal(np.concatenate([g for _, _, g in got]),
                          np.concatenate([g for _, _, g in expected]))
    # a user's bag with partitions of its own (7, 7, ...), and a model file
    from skpatchcore import save_model

    model_file = save_model(local_fit, tmp_path / "model.npz")
    bag = db.from_sequence(paths, npartitions=5)
    records = skd.score_images(model_file, bag, client=client).compute()
    assert [r["index"] for r in records] == list(range(len(paths)))
    assert np.array_equal([r["score"] for r in records], local_fit.score_samples(paths))


def test_a_dataframe_column_of_paths_scores_as_local(client, images, local_fit):
    dd = pytest.importorskip("dask.dataframe")
    pd = pytest.importorskip("pandas")
    paths, _ = images
    frame = dd.from_pandas(pd.DataFrame({"path": paths, "line": 3}), npartitions=3)
    bag = skd.score_images(local_fit, frame["path"], client=client)
    table = bag.to_dataframe().compute()
    assert table["index"].tolist() == list(range(len(paths)))
    assert table["path"].tolist() == paths
    assert np.array_equal(table["score"].to_numpy(), local_fit.score_samples(paths))


def _kill_a_worker_while(client, prefixes, run):
    """Run ``run()`` while a thread SIGKILLs the first worker seen processing a task whose
    key holds one of ``prefixes``; return run's result once the worker is back."""
    pids = client.run(os.getpid)
    killed = []

    def kill_one_busy_worker():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for address, keys in client.processing().items():
                if address in pids and any(p in str(k) for k in keys for p in prefixes):
                    os.kill(pids[address], signal.SIGKILL)
                    killed.append(address)
                    return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_one_busy_worker)
    killer.start()
    result = run()
    killer.join()
    assert killed, "no worker was killed while the work ran"
    client.wait_for_workers(2, timeout=60)  # the nanny starts a new worker process
    assert set(client.run(os.getpid).values()) != set(pids.values())
    return result


def test_a_worker_killed_mid_fit_does_not_change_the_model(client, images, local_fit):
    paths, _ = images
    fitted = _kill_a_worker_while(
        client, ("_extract", "_project", "_leave_one_out"),
        lambda: skd.fit(_pipe(), paths[:16], client=client, partition_size=2))
    _assert_same_model(fitted, local_fit)


def test_a_worker_killed_mid_scoring_does_not_change_the_scores(client, images, local_fit):
    paths, _ = images
    records = _kill_a_worker_while(
        client, ("_score_records",),
        lambda: skd.score_images(local_fit, paths, client=client, partition_size=2).compute())
    assert [r["index"] for r in records] == list(range(len(paths)))
    assert np.array_equal([r["score"] for r in records], local_fit.score_samples(paths))


def test_an_unreadable_image_gives_the_local_error(client, images, local_fit, tmp_path):
    paths, _ = images
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    inputs = paths[:10] + [str(bad)] + paths[10:12]
    with pytest.raises(ValueError) as local:
        local_fit.score_and_map(inputs)
    with pytest.raises(ValueError) as remote:
        skd.score_images(local_fit, inputs, client=client, partition_size=4).compute()
    assert str(remote.value) == str(local.value)
    assert "X[10]" in str(remote.value) and str(bad) in str(remote.value)
    with pytest.raises(ValueError) as remote_fit:
        skd.fit(_pipe(), inputs, client=client, partition_size=4)
    with pytest.raises(ValueError) as local_fit_error:
        _pipe().fit(inputs)
    assert str(remote_fit.value) == str(local_fit_error.value)
    missing = str(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        list(skd.iter_score_and_grids(local_fit, paths[:3] + [missing], client=client))


def test_an_unreachable_scheduler_fails_fast_naming_it():
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    start = time.monotonic()
    with pytest.raises(OSError, match=f"Could not reach a Dask scheduler at '{address}'"):
        skd.connect(address, timeout=1)
    assert time.monotonic() - start < 10


def test_inputs_and_models_are_checked_before_any_work(client, images, local_fit):
    paths, _ = images
    with pytest.raises(TypeError, match="The workers read the images"):
        skd.score_images(local_fit, np.zeros((2, 64, 64, 3), np.uint8), client=client)
    with pytest.raises(TypeError, match=r"images\[1\] is a ndarray"):
        skd.score_images(local_fit, [paths[0], np.zeros((8, 8))], client=client)
    with pytest.raises(TypeError, match="FeatureExtractor -> CoresetSampler"):
        skd.fit(make_patchcore().steps[-1][1], paths, client=client)
    with pytest.raises(ValueError, match="partition_size=0"):
        skd.fit(_pipe(), paths, client=client, partition_size=0)
    with pytest.raises(ValueError, match="needs at least 2"):
        skd.fit(_pipe(), paths[:1], client=client)
    with pytest.raises(TypeError, match="distributed.Client"):
        skd.fit(_pipe(), paths, client="tcp://127.0.0.1:8786")
