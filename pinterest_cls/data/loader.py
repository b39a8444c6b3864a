"""Dataset, collate and loader that stream pins from files to uint8 batches.

A file that fails to decode (changed since the scan) is reported as failed for its own row, with the
reason; it is never replaced by a neighbour and never stops the run.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from itertools import accumulate

import torch
from torch.utils.data import DataLoader, Dataset

from pinterest_cls.core.fileio import available_cpus, mp_context
from pinterest_cls.data.gpu_decode import decode_opencv, gpu_decodable, plain_jpeg
from pinterest_cls.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, draft_scale, load_rgb, load_rgb_variants


class PinDataset(Dataset):
    """Items ``(row, pixels | None, reason)`` for ``rows`` (global row numbers) of ``paths``.

    ``transforms``: one transform, or a list of them (one per backbone: the pin is decoded once and each
    transform resizes that image for its backbone); ``min_size``: the shorter side each transform resizes to
    (an int, or a list matching ``transforms``), the JPEG draft target. With several transforms the file is
    decoded once per distinct draft reduction among them (``load_rgb_variants``), so each backbone gets
    exactly the pixels a run of its own would. Backbones with the same preprocessing (same transform and draft
    target, e.g. the ConvNeXt family) share one resized tensor.
    """

    def __init__(self, paths: Sequence[str], rows: Sequence[int], transforms, min_size,
                 draft: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS, encoded: bool = False,
                 opencv: bool = False):
        self.paths = paths
        # opencv (extract.decode=opencv): plain JPEGs (gpu_decode.plain_jpeg) are decoded by OpenCV at the draft
        # scale, the same pixels as Pillow's in less time; every other file by Pillow, as usual
        self.opencv = opencv
        # encoded (extract.decode=gpu): items carry the bytes of the JPEGs nvJPEG decodes to what this path
        # gives (gpu_decode.gpu_decodable); every other file is decoded here as usual
        self.encoded = encoded
        self.rows = rows
        self.multi = isinstance(transforms, (list, tuple))
        self.transforms = list(transforms) if self.multi else [transforms]
        sizes = list(min_size) if isinstance(min_size, (list, tuple)) else [min_size] * len(self.transforms)
        if len(sizes) != len(self.transforms):
            raise ValueError(f"{len(sizes)} min_size values for {len(self.transforms)} transforms")
        self.min_sizes = sizes if draft else [None] * len(sizes)
        self.max_pixels = max_pixels
        # transforms identical in every parameter (their repr) and draft target are computed once
        keys = [(repr(t), m) for t, m in zip(self.transforms, self.min_sizes)]
        self.first_of = [keys.index(k) for k in keys]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        if self.encoded:
            try:
                data = gpu_decodable(self.paths[row], self.max_pixels)
            except ImageDecodeError as exc:
                return row, None, str(exc)
            if data is not None:
                return row, Encoded(torch.frombuffer(bytearray(data), dtype=torch.uint8)), ""
        return self.decode_row(row)

    def decode_row(self, row: int):
        """``(row, pixels | None, reason)``: the file decoded and transformed on the CPU."""
        try:
            images = self._opencv_images(row) if self.opencv else None
            if images is None and self.multi:
                images = load_rgb_variants(self.paths[row], self.min_sizes, max_pixels=self.max_pixels)
            elif images is None:
                images = [load_rgb(self.paths[row], min_size=self.min_sizes[0], max_pixels=self.max_pixels)]
            pixels = []
            for k, (t, image) in enumerate(zip(self.transforms, images)):
                pixels.append(t(image) if self.first_of[k] == k else pixels[self.first_of[k]])
        except ImageDecodeError as exc:
            return row, None, str(exc)
        except Exception as exc:  # a transform failing on odd input is still this row's failure
            return row, None, f"{type(exc).__name__}: {exc}"
        return row, pixels if self.multi else pixels[0], ""

    def _opencv_images(self, row: int):
        """The file decoded by OpenCV once per distinct draft scale of the transforms (RGB arrays, one per
        transform), or None when it is not a plain JPEG (or OpenCV refuses it): then Pillow decodes it."""
        plain = plain_jpeg(self.paths[row], self.max_pixels)
        if plain is None:
            return None
        data, size = plain
        decoded: dict[int, object] = {}
        images = []
        for m in self.min_sizes:
            scale = draft_scale(size, m)
            if scale not in decoded:
                decoded[scale] = decode_opencv(data, scale)
            if decoded[scale] is None:
                return None
            images.append(decoded[scale])
        return images


class Encoded:
    """A file's bytes for the GPU decoder, in place of its pixels."""

    def __init__(self, data: torch.Tensor):
        self.data = data


def collate_encoded(items):
    """extract.decode=gpu -> (rows of usable items: LongTensor, payload or None, failures: [(row, reason)]).

    ``payload["encoded"]``: the JPEGs' bytes packed into one uint8 tensor (one shared-memory transfer from the
    worker, not one per file) with ``rows`` and ``offsets``; ``payload["decoded"]``: {row: [pixels per
    transform]} for the files decoded on the CPU path."""
    failures = [(row, reason) for row, px, reason in items if px is None]
    ok = [(row, px) for row, px, _ in items if px is not None]
    rows = torch.tensor([row for row, _ in ok], dtype=torch.long)
    if not ok:
        return rows, None, failures
    encoded = [(row, px.data) for row, px in ok if isinstance(px, Encoded)]
    offsets = [0, *accumulate(len(data) for _, data in encoded)]
    buffer = torch.cat([data for _, data in encoded]) if encoded else torch.zeros(0, dtype=torch.uint8)
    return rows, {"encoded": {"rows": [row for row, _ in encoded], "buffer": buffer, "offsets": offsets},
                  "decoded": {row: px for row, px in ok if not isinstance(px, Encoded)}}, failures


def collate_pins(items):
    """-> (rows of decoded items: LongTensor, pixels: uint8 tensor(s) or None, failures: [(row, reason)])."""
    ok = [(row, px) for row, px, _ in items if px is not None]
    failures = [(row, reason) for row, px, reason in items if px is None]
    rows = torch.tensor([row for row, _ in ok], dtype=torch.long)
    if not ok:
        return rows, None, failures
    first = ok[0][1]
    if isinstance(first, list):
        pixels = []
        for k in range(len(first)):  # a tensor shared by several backbones is stacked (and sent) once
            same = next(j for j in range(k + 1) if first[j] is first[k])
            pixels.append(pixels[same] if same < k else torch.stack([px[k] for _, px in ok]))
    else:
        pixels = torch.stack([px for _, px in ok])
    return rows, pixels, failures


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers ignore SIGTERM and SIGUSR2, which SLURM sends to every process of a job it cancels, requeues or is
    about to time out: the main process stops them once it has committed what they decoded (a worker killed
    by the signal would fail the main process first)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def make_loader(dataset: Dataset, batch_size: int, workers: int, pin_memory: bool, prefetch_factor: int = 4,
                shuffle: bool = False, generator: torch.Generator | None = None, drop_last: bool = False
                ) -> DataLoader:
    """The package's one DataLoader factory. Worker processes (started with ``core.fileio.mp_context``, kept
    between epochs) decode and resize; the main process only runs the model. A ``PinDataset`` gets its own
    collate (failed rows travel beside the batch); other datasets (finetune's) PyTorch's default. In order
    unless ``shuffle``, whose order ``generator`` seeds."""
    workers = max(0, int(workers))
    kwargs = {}
    if workers > 0:
        kwargs = dict(persistent_workers=True, prefetch_factor=prefetch_factor, multiprocessing_context=mp_context(),
                      worker_init_fn=_ignore_stop_signals)
    if isinstance(dataset, PinDataset):
        kwargs["collate_fn"] = collate_encoded if dataset.encoded else collate_pins
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=workers,
                      pin_memory=pin_memory, drop_last=drop_last, **kwargs)


def default_workers() -> int:
    """One worker per CPU of this process (its affinity mask: a SLURM allocation), at most 32. On a 16-core H100
    machine CPU decoding scaled with the workers up to 16 (experiments/throughput/gpu_results.csv); beyond 32
    it is unmeasured."""
    return max(1, min(32, available_cpus()))
