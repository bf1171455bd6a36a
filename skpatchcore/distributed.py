"""Fit and score on a ``dask.distributed`` cluster, with the results of one machine.

Three functions and a way to connect (``pip install "skpatchcore[dask]"``; dask is imported
only when one of them is called):

* :func:`connect`: a :class:`distributed.Client` for a scheduler address, or for a new
  cluster of worker processes on this machine; an unreachable scheduler fails within the
  connect timeout, with a message naming the address.
* :func:`score_images`: a fitted model (pipeline or model file) and image paths (a list, a
  folder, a ``dask.bag`` or a ``dask.dataframe`` column of paths) -> a ``dask.bag`` of one
  record per image (index, path, score, decision, label), optionally with each image's
  anomaly map written by the workers as a ``.npy`` file. :func:`iter_score_and_grids` gives
  the same scores with patch grids, in order, a part at a time (``skpatchcore predict
  --scheduler``).
* :func:`fit`: a PatchCore pipeline (features -> coreset -> detector) fitted on the cluster,
  identical to ``pipe.fit(images)`` on one machine with the same ``random_state``: the same
  bank rows, ``sample_index``, ``offset_`` and so the same scores.

How the work is split, and why the results are the same bits
------------------------------------------------------------
The model is sent to each worker once (as the result of a task, which each worker fetches
once and keeps, and which dask can make again if the workers holding it die) and every task
refers to that copy; tasks carry only file paths, and workers read the images. Images
are cut into parts of ``partition_size`` images (default
:func:`~skpatchcore.pipeline.score_chunk_size`: the chunk in which one machine already runs
the network and the nearest-neighbour search, 40 images at the defaults), so every network
batch, projection block and search chunk on a worker holds the same images as on one
machine, and each part runs the very code one machine runs:
:meth:`PatchCorePipeline.iter_score_and_grids` to score,
:meth:`FeatureExtractor.transform`, :func:`~skpatchcore.coreset.iter_projections`,
:meth:`PatchFeatures.take_rows` and the detector's leave-one-out scoring to fit.

A fit runs in four rounds; what travels is, per training image of ``h x w`` cells:

1. features: each worker extracts the grids of its parts and keeps them (``h w d`` float32,
   in worker memory, spilled to disk by dask beyond its memory limit); nothing comes back.
2. projection: the client draws the seeded projection matrix (d x 128) exactly as
   :class:`CoresetSampler` does and sends it once; workers return ``h w x 128`` float32 per
   image (512 bytes per cell; 0.8 MB per 320 px image), which the client stacks as the
   one-machine fit does, and runs the exact greedy k-center on it (the only step that is
   not distributed).
3. bank rows: the selected rows (``m x d`` float32 in all) come back from the workers that
   hold them.
4. leave-one-out scores: the detector with its bank goes to each worker once; each part's
   training scores (8 bytes per image) come back and set ``offset_``.

Memory on the client is that of the streamed one-machine fit: the projected rows
(``n h w x 128`` float32), the bank and one float per image; never a full feature grid.
The greedy step is exact and single-node: its time grows with (number of patches) x (bank
size) and its memory with the number of patches (6.6 GB of projections for 8,000 images at
320 px with the default 1,600 cells each), which is where the distributed fit stops scaling
(docs/distributed.md).

Failures
--------
A worker that dies mid-run has its tasks run again by dask (features that were lost with it
are recomputed from the paths); every task is deterministic, so the result is unchanged. An
image that cannot be read raises on the client the ValueError (or FileNotFoundError) one
machine raises, naming the image's place in the input and its file.
"""

from __future__ import annotations

import collections
import hashlib
import os
import pickle
import threading
from pathlib import Path

import numpy as np
import torch
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted

from ._containers import PatchFeatures
from ._geometry import check_sigma
from ._images import ImageList, list_images
from ._utils import labels_from_decision, progress, resolve_device
from ._validation import normal_mask
from .coreset import CoresetSampler, iter_projections
from .detector import PatchCoreDetector
from .features import FeatureExtractor
from .persistence import load_model
from .pipeline import PatchCorePipeline, score_chunk_size

__all__ = ["connect", "fit", "iter_score_and_grids", "score_images"]

_INSTALL = 'pip install "skpatchcore[dask]"'


def _distributed():
    try:
        import distributed
    except ImportError:
        raise ImportError(f"skpatchcore.distributed needs dask.distributed: {_INSTALL}."
                          ) from None
    return distributed


# ------------------------------------------------------------------------------- connecting
def connect(scheduler=None, *, timeout=None, n_workers=None, threads_per_worker=1):
    """A Dask client: for the scheduler at ``scheduler``, or a new cluster on this machine.

    Parameters
    ----------
    scheduler : str or None, default=None
        Address of a running ``dask scheduler``, e.g. ``"tcp://10.0.0.5:8786"``. None starts
        a :class:`distributed.LocalCluster` of worker processes on this machine (loopback
        only, no dashboard), closed with the client.
    timeout : float or None, default=None
        Seconds to keep trying to reach ``scheduler`` before giving up; None uses dask's
        ``distributed.comm.timeouts.connect`` setting (30 s unless configured).
    n_workers : int or None, default=None
        Worker processes of the local cluster (None: dask's choice, one per core group).
        Ignored with ``scheduler``.
    threads_per_worker : int, default=1
        Threads of each local worker. Ignored with ``scheduler``.

    Returns
    -------
    client : distributed.Client
        Use it as a context manager, or call ``client.close()``.

    Raises
    ------
    OSError
        The scheduler could not be reached within ``timeout``; the message names the address.
    """
    distributed = _distributed()
    if scheduler is None:
        return distributed.Client(n_workers=n_workers, threads_per_worker=threads_per_worker,
                                  processes=True, host="127.0.0.1", dashboard_address=None)
    if not isinstance(scheduler, str) or not scheduler.strip():
        raise ValueError(f"scheduler={scheduler!r} is not a scheduler address; give one such "
                         "as 'tcp://10.0.0.5:8786', or None for a cluster on this machine.")
    if timeout is None:
        import dask

        timeout = dask.utils.parse_timedelta(
            dask.config.get("distributed.comm.timeouts.connect"), default="s")
    try:
        return distributed.Client(scheduler, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise OSError(
            f"Could not reach a Dask scheduler at {scheduler!r} within {timeout:g} s "
            f"({type(exc).__name__}: {exc}). Check the address and that 'dask scheduler' is "
            "running there and reachable from this machine (docs/distributed.md shows how to "
            "start one and its workers), or leave the scheduler out to work on this machine."
        ) from None


def _client(client):
    distributed = _distributed()
    if client is None:
        try:
            return distributed.get_client()
        except ValueError:
            raise ValueError("No Dask client: pass client=, e.g. client=skpatchcore."
                             "distributed.connect('tcp://host:8786'), or create one first."
                             ) from None
    if not isinstance(client, distributed.Client):
        raise TypeError(f"client must be a distributed.Client, got {type(client).__name__}; "
                        "skpatchcore.distributed.connect(address) makes one.")
    return client


# Objects sent by _ship, unpickled once per worker process: token -> object (the latest few).
_LOADED = collections.OrderedDict()
_LOADED_LOCK = threading.Lock()
_LOADED_MAX = 2


def _value(obj):
    return obj


def _ship(client, obj):
    """``(token, future)`` of ``obj``, for tasks to take as ``_load(token, blob)``: pickled
    once here, sent once to each worker that needs it, unpickled once per worker process and
    kept there (never per task; the token is the pickle's digest, so a model used again
    while its future lives is neither sent nor unpickled again). The pickle is the result
    of a task rather than scattered data, so if every worker holding it dies, dask makes it
    again. Workers only ever serialise these bytes, never the live object a task is using."""
    blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    token = hashlib.blake2b(blob, digest_size=16).hexdigest()  # equal models: sent once
    return token, client.submit(_value, blob, key=f"skpatchcore-object-{token}")


def _load(token, blob):
    """Worker: the object of a :func:`_ship` (its token and pickle)."""
    with _LOADED_LOCK:
        if token not in _LOADED:
            _LOADED[token] = pickle.loads(blob)
            while len(_LOADED) > _LOADED_MAX:
                _LOADED.popitem(last=False)
        return _LOADED[token]


# ----------------------------------------------------------------------------------- inputs
def _image_paths(images):
    """A folder, a path list (or 1-D string array) -> list of str, in order. Files are not
    checked here: they are read, and checked, on the workers."""
    if isinstance(images, str | os.PathLike):
        path = Path(images)
        if path.is_dir():
            return [os.fspath(p) for p in list_images(path)]
        return [os.fspath(images)]
    if isinstance(images, np.ndarray) and images.dtype.kind in "OU" and images.ndim == 1:
        images = images.tolist()
    if not isinstance(images, list | tuple):
        raise TypeError(
            f"images of type {type(images).__name__}: give image file paths (a list, a folder, "
            "a dask.bag or a dask.dataframe column of paths). The workers read the images; "
            "score images held in memory with model.score_and_map on this machine.")
    if len(images) == 0:
        raise ValueError("images is empty: no image paths were given.")
    for i, item in enumerate(images):
        if not isinstance(item, str | os.PathLike):
            raise TypeError(
                f"images[{i}] is a {type(item).__name__}, not a file path: the workers read "
                "the images, so give their paths (score in-memory images with "
                "model.score_and_map on this machine).")
    return [os.fspath(p) for p in images]


def _worker_images(items, start):
    """The images ``start`` ... of the whole input, named as one machine names them
    (``X[start + i] ('path')``)."""
    return ImageList([os.fspath(p) for p in items], "list", None, int(start))


def _partition_size(partition_size, extractor):
    if partition_size is None:
        return score_chunk_size(extractor)
    if isinstance(partition_size, bool) or not isinstance(partition_size, int | np.integer) \
            or partition_size < 1:
        raise ValueError(f"partition_size={partition_size!r} must be a positive int (images "
                         "per task), or None for the model's scoring chunk.")
    return int(partition_size)


# ---------------------------------------------------------------------------------- scoring
def _scoring_model(model):
    """A fitted PatchCorePipeline that scores raw images, from a pipeline or a model file."""
    if isinstance(model, str | os.PathLike):
        model = load_model(model, require_detector=True)
    if isinstance(model, Pipeline) and not isinstance(model, PatchCorePipeline):
        model = PatchCorePipeline(model.steps)
    if not isinstance(model, PatchCorePipeline) or not hasattr(model, "score_and_map"):
        raise TypeError(f"model must be a fitted pipeline from images to a detector with "
                        f"score_and_map (make_patchcore(...).fit(...)) or its model file, "
                        f"got {type(model).__name__}.")
    check_is_fitted(model)
    try:
        model._extractor()
    except AttributeError as exc:
        raise TypeError(f"model: {exc}") from None
    return model


def _score_part(token, blob, items, start):
    """Worker: scores (b,) and patch grids (b, h, w) of the images ``start`` ... ``start +
    len(items) - 1``, by the one-machine path in the one-machine chunks."""
    model = _load(token, blob)
    parts = list(model.iter_score_and_grids(_worker_images(items, start)))
    return (np.concatenate([scores for _, scores, _ in parts]),
            np.concatenate([grids for _, _, grids in parts]))


def iter_score_and_grids(model, images, *, client=None, partition_size=None):
    """:meth:`PatchCorePipeline.iter_score_and_grids` on a cluster: the same scores and
    patch grids, a part at a time, in order.

    A few parts per worker thread are in flight at once, so memory on the client does not
    grow with the number of images.

    Parameters
    ----------
    model : PatchCorePipeline, Pipeline or path
        A fitted model from images to scores, or its model file (read here, then sent to
        each worker once).
    images : list of paths, or a folder
        Image files, read by the workers (they must see the same paths).
    client : distributed.Client or None, default=None
        None uses the current client (:func:`distributed.get_client`).
    partition_size : int or None, default=None
        Images per task; None: :func:`~skpatchcore.pipeline.score_chunk_size`.

    Yields
    ------
    start : int
        Index of the part's first image.
    scores : ndarray of shape (b,), float64
        ``score_samples`` (lower = more abnormal).
    grids : ndarray of shape (b, h, w), float32
        Patch-score grids (higher = more anomalous).
    """
    client = _client(client)
    model = _scoring_model(model)
    paths = _image_paths(images)
    size = _partition_size(partition_size, model._extractor())
    model_f = _ship(client, model)
    window = max(2, 2 * sum(client.nthreads().values()))
    starts = iter(range(0, len(paths), size))
    pending = collections.deque()

    def submit():
        start = next(starts, None)
        if start is not None:
            pending.append((start, client.submit(_score_part, *model_f,
                                                 paths[start:start + size], start, pure=False)))

    for _ in range(window):
        submit()
    try:
        while pending:
            start, future = pending.popleft()
            scores, grids = future.result()
            future.release()
            submit()
            yield start, scores, grids
    finally:
        client.cancel([f for _, f in pending])


def _partition_length(part):
    return [len(list(part))]


def _score_records(items, offset, token, blob, maps_dir, sigma):
    """Worker: one record per image of a bag partition (and its map file)."""
    items = [os.fspath(p) for p in items]
    if not items:
        return []
    start = int(offset[0])
    scores, grids = _score_part(token, blob, items, start)
    model = _load(token, blob)
    detector = model[-1]
    decision = scores - detector.offset_
    labels = labels_from_decision(decision)
    records = [{"index": start + i, "path": p, "score": float(s), "decision": float(d),
                "label": int(lab)}
               for i, (p, s, d, lab) in enumerate(zip(items, scores, decision, labels,
                                                      strict=True))]
    if maps_dir is not None:
        folder = Path(maps_dir)
        folder.mkdir(parents=True, exist_ok=True)
        images = _worker_images(items, start)
        maps = model._extractor().maps_to_images(grids, images.sizes(), sigma)
        for record, anomaly_map in zip(records, maps, strict=True):
            target = folder / f"{record['index']:08d}_{Path(record['path']).stem}.npy"
            tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
            with open(tmp, "wb") as fh:  # whole files only, also when a task is rerun
                np.save(fh, anomaly_map)
            tmp.replace(target)
            record["map"] = os.fspath(target)
    return records


def score_images(model, images, *, client=None, partition_size=None, maps_dir=None,
                 sigma=4.0):
    """Score images on a cluster: a lazy ``dask.bag`` of one record per image.

    Scores, decisions and maps equal those of ``model.score_and_map(images)`` on one machine.
    Nothing runs until the bag is computed (``.compute()``, ``client.compute(bag)``,
    ``bag.to_textfiles(...)`` to have the workers write the table, ``bag.to_dataframe()``
    with pandas installed); ``distributed.progress(client.persist(bag))`` shows progress.

    Parameters
    ----------
    model : PatchCorePipeline, Pipeline or path
        A fitted model from images to scores, or its model file; sent to each worker once
        when this function is called.
    images : list of paths, folder, dask.bag.Bag or dask.dataframe.Series of paths
        The images; the workers read them (they must see these paths). A list or folder is
        cut into parts of ``partition_size`` images; a bag or series keeps its partitions
        (their lengths are counted first, reading no image).
    client : distributed.Client or None, default=None
        None uses the current client (:func:`distributed.get_client`).
    partition_size : int or None, default=None
        Images per task for a list or folder; None:
        :func:`~skpatchcore.pipeline.score_chunk_size` (40 at the defaults).
    maps_dir : str, path or None, default=None
        When given, each worker writes each image's anomaly map at the image's own pixels,
        as :meth:`PatchCorePipeline.score_and_map` gives it (float32 (H, W), higher = more
        anomalous) to ``maps_dir/{index:08d}_{stem}.npy``; the folder must be writable by
        the workers (a shared file system, or each machine's own disk).
    sigma : float, default=4.0
        Gaussian smoothing of the maps, as in :meth:`PatchCorePipeline.score_and_map`.

    Returns
    -------
    records : dask.bag.Bag
        One dict per image, in input order: ``index`` (position in ``images``), ``path``,
        ``score`` (``score_samples``: lower = more abnormal), ``decision`` (``score -
        offset_``: negative for outliers), ``label`` (+1 normal, -1 anomalous) and, with
        ``maps_dir``, ``map`` (the file written).
    """
    import dask.bag as db

    client = _client(client)
    model = _scoring_model(model)
    check_sigma(sigma)
    if isinstance(images, db.Bag) or (hasattr(images, "to_bag")
                                       and hasattr(images, "npartitions")):  # a dask Series
        bag = images if isinstance(images, db.Bag) else images.to_bag()
        lengths = client.compute(bag.map_partitions(_partition_length)).result()
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int).tolist()
    else:
        size = _partition_size(partition_size, model._extractor())
        paths = _image_paths(images)
        bag = db.from_sequence(paths, partition_size=size)
        offsets = list(range(0, len(paths), size))
    offsets_bag = db.from_sequence(offsets, partition_size=1)
    model_f = _ship(client, model)
    maps_dir = None if maps_dir is None else os.fspath(maps_dir)
    return bag.map_partitions(_score_records, offsets_bag, *model_f, maps_dir, sigma)


# -------------------------------------------------------------------------------------- fit
def _fit_steps(model):
    steps = [step for _, step in getattr(model, "steps", [])]
    types = (FeatureExtractor, CoresetSampler, PatchCoreDetector)
    if (not isinstance(model, Pipeline) or len(steps) != 3
            or not all(isinstance(s, t) for s, t in zip(steps, types, strict=True))):
        raise TypeError(
            "skpatchcore.distributed.fit fits a pipeline of FeatureExtractor -> "
            "CoresetSampler -> PatchCoreDetector (make_patchcore(...)); got "
            f"{type(model).__name__}" + (f" of {[type(s).__name__ for s in steps]}"
                                         if steps else "") + ".")
    return steps


class _Part:
    """Images ``a:b`` of the training input; ``keep``: positions in the part of its normal
    images (None: all); ``first``: how many normal images come before it."""

    def __init__(self, a, b, keep, first):
        self.a, self.b, self.keep, self.first = a, b, keep, first

    @property
    def n_kept(self):
        return self.b - self.a if self.keep is None else len(self.keep)


def _extract(token, blob, items, start):
    """Worker: feature grids (b, h, w, d) of images ``start`` ..., by
    :meth:`FeatureExtractor.transform` (the batches of ``fit_transform``)."""
    return _load(token, blob).transform(_worker_images(items, start))


def _normal(features, keep):
    return PatchFeatures.from_array(features if keep is None else features[keep])


def _project(features, keep, token, blob, device):
    """Worker: the part's projected rows, block by block as :class:`CoresetSampler`."""
    matrix = _load(token, blob)
    blocks = iter_projections(_normal(features, keep), matrix, resolve_device(device))
    return np.concatenate([block.cpu().numpy() for block in blocks])


def _take_rows(features, keep, rows):
    """Worker: full feature rows ``rows`` of the part's normal images."""
    return _normal(features, keep).take_rows(rows)


def _leave_one_out(token, blob, features, keep, first):
    """Worker: leave-one-out anomaly scores of the part's normal images."""
    return _load(token, blob)._loo_anomaly(_normal(features, keep), first=first)


def _gather(client, futures, desc, verbose):
    """Yield (index, result) as the futures finish, with a progress bar."""
    distributed = _distributed()
    where = {future.key: i for i, future in enumerate(futures)}
    bar = progress(total=len(futures), desc=desc, unit="part", disable=not verbose)
    try:
        for future in distributed.as_completed(futures):
            result = future.result()
            future.release()
            bar.update(1)
            yield where[future.key], result
    finally:
        bar.close()


def fit(model, images, y=None, *, client=None, partition_size=None, verbose=False):
    """Fit a PatchCore pipeline on a cluster; the model equals ``model.fit(images, y)``.

    Feature extraction, the random projection of the features, the gathering of the selected
    rows and the leave-one-out training scores run on the workers, each on the images of
    its parts; the exact greedy k-center selection runs here, on the projected rows (see the
    module docstring for what travels). With the same parameters and ``random_state``, the
    fitted pipeline has the same memory bank (rows, ``bank_sample_index_``,
    ``sample_indices_``), ``coverage_radius_`` and ``offset_`` as a fit on one machine, and
    so scores every image the same, provided the workers compute on the same kind of device
    as this machine would (``device``: the CPU everywhere, or CUDA everywhere).

    Parameters
    ----------
    model : Pipeline
        An unfitted FeatureExtractor -> CoresetSampler -> PatchCoreDetector pipeline, e.g.
        ``make_patchcore(...)``; fitted in place.
    images : list of paths, or a folder
        Good training images, read by the workers (they must see the same paths).
    y : array-like of shape (n,), default=None
        +1 normal, -1 anomalous (left out of the bank), as in ``model.fit``.
    client : distributed.Client or None, default=None
        None uses the current client (:func:`distributed.get_client`).
    partition_size : int or None, default=None
        Images per task; None: :func:`~skpatchcore.pipeline.score_chunk_size`, which keeps
        every network batch, projection block and search chunk whole.
    verbose : bool, default=False
        Progress bars, one per round.

    Returns
    -------
    model : Pipeline
        The same pipeline, fitted.
    """
    client = _client(client)
    extractor, sampler, detector = _fit_steps(model)
    paths = _image_paths(images)
    keep = normal_mask(y, len(paths))
    # every parameter is checked before any image is read
    sampler._validate_params()
    detector._validate_params()
    extractor.fit()
    n_kept = len(paths) if keep is None else int(keep.sum())
    detector._begin_bank_fit(n_kept)
    size = _partition_size(partition_size, extractor)
    d = extractor.feature_dim_
    cells = int(np.prod(extractor.grid_shape_))

    parts, first = [], 0
    for a in range(0, len(paths), size):
        b = min(a + size, len(paths))
        local = None if keep is None else np.flatnonzero(keep[a:b])
        parts.append(_Part(a, b, local, first))
        first += parts[-1].n_kept
    parts = [p for p in parts if p.n_kept]  # a part of anomalous images only is not read

    # 1. features, kept on the workers
    extractor_f = _ship(client, extractor)
    features = [client.submit(_extract, *extractor_f, paths[p.a:p.b], p.a, pure=False)
                for p in parts]
    try:
        # 2. projections -> greedy k-center here
        rng, matrix = sampler._projection(d)
        matrix_f = _ship(client, None if matrix is None else matrix.cpu())
        points = torch.empty((n_kept * cells, d if matrix is None else matrix.shape[1]),
                             dtype=torch.float32, device=resolve_device(sampler.device))
        futures = [client.submit(_project, f, p.keep, *matrix_f, sampler.device, pure=False)
                   for f, p in zip(features, parts, strict=True)]
        for i, block in _gather(client, futures, "features + projection", verbose):
            points[parts[i].first * cells : parts[i].first * cells + len(block)] = (
                torch.from_numpy(block))
        selected = sampler._select_points(points, rng)
        del points
        sampler.n_features_in_ = d
        sampler._set_indices(selected, keep, extractor.grid_shape_)

        # 3. the selected rows, from the workers that hold them
        owner = np.searchsorted([p.first for p in parts], selected // cells, side="right") - 1
        rows = np.empty((len(selected), d), dtype=np.float32)
        wanted = [np.flatnonzero(owner == i) for i in range(len(parts))]
        futures, which = [], []
        for i, at in enumerate(wanted):
            if len(at):
                local_rows = selected[at] - parts[i].first * cells
                futures.append(client.submit(_take_rows, features[i], parts[i].keep,
                                             local_rows, pure=False))
                which.append(at)
        for j, block in _gather(client, futures, "bank rows", verbose):
            rows[which[j]] = block

        # 4. leave-one-out training scores -> offset_
        detector.n_features_in_ = d
        detector._set_bank(rows, selected // cells)
        detector_f = _ship(client, detector)
        futures = [client.submit(_leave_one_out, *detector_f, f, p.keep, p.first, pure=False)
                   for f, p in zip(features, parts, strict=True)]
        anomaly = np.empty(n_kept, dtype=np.float64)
        for i, scores in _gather(client, futures, "train scores", verbose):
            anomaly[parts[i].first : parts[i].first + len(scores)] = scores
        detector._set_offset(anomaly)
    finally:
        client.cancel(features)
    return model
