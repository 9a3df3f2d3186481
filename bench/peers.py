"""One adapter per library: save or load one rank's part of a state.

Each adapter runs on every rank of a phase (inside the timed region) and returns
a small dict of facts about what it did. What each one does, exactly:

- ``distcp``: ``distcp.save`` / ``distcp.load`` with ``FileSystemWriter(thread_count=T,
  sync_files=True)`` / ``FileSystemReader(thread_count=T)``; returns the reader's report.
- ``torch-dcp``: the same calls on ``torch.distributed.checkpoint`` (its writer takes
  ``thread_count=T``; its reader has no thread option and reads on one thread).
- ``torch.save``: each rank ``torch.save``s ``{key: local tensor}`` with the boxes
  they cover to its own file, then fsyncs it (as distcp and DCP do); for replicated
  state only rank 0 saves, as DDP code does. A load ``torch.load(mmap=True,
  weights_only=True)``s every rank's file and copies the overlap of each saved box
  with each requested box into the caller's tensors (so it can reshard).
- ``raw``: the hardware limit. A save writes each rank's tensor bytes with
  ``os.write`` into T files per rank (one per thread), starting each file's
  writeback every ``knobs.WRITEBACK_EVERY`` bytes as distcp's writer does, and
  fsyncs them (replicated state is split across ranks by bytes, written once).
  A load ``preadv``s on T threads straight into the caller's tensors when every
  needed piece is one contiguous run of a file and of the tensor (same layout,
  1-rank full load, replicated); otherwise (resharding into Shard(1)) it reads the same number of
  bytes sequentially from the raw files into the tensors: the time to move the
  bytes needed, not a correct load, and it is not verified.
- ``memcpy`` (loads only): copies the bytes a rank needs from one in-memory buffer
  into its tensors on T threads.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from bench.scenarios import (
    ITEMSIZE,
    Box,
    Layout,
    TensorSpec,
    box_slices,
    contiguous_run,
    intersect,
    local_tensor,
)
from distcp import knobs
from distcp.filesystem.writeback import start_writeback

#: Reads and copies are cut into pieces of at most this many bytes so T threads
#: share the work evenly.
PIECE_BYTES = 8 << 20


@dataclass(frozen=True)
class OpContext:
    """What an adapter needs to save or load one rank's part of a state."""

    rank: int
    path: Path
    threads: int
    specs: list[TensorSpec]
    layout: Layout  # the layout of ``state``: saved from, or loaded into
    save_layout: Layout  # the layout the checkpoint was saved from
    state: dict[str, Any]  # this rank's tensors (DTensors or plain tensors)
    no_dist: bool  # a one-rank phase: run without collectives
    memcpy_source: torch.Tensor | None = None


class Peer(ABC):
    name: str
    ops: frozenset[str] = frozenset({"save", "load"})

    @abstractmethod
    def save(self, ctx: OpContext) -> dict[str, Any]: ...

    @abstractmethod
    def load(self, ctx: OpContext) -> dict[str, Any]: ...


class Distcp(Peer):
    name = "distcp"

    def save(self, ctx: OpContext) -> dict[str, Any]:
        import distcp

        writer = distcp.FileSystemWriter(ctx.path, thread_count=ctx.threads, sync_files=True)
        distcp.save(ctx.state, storage_writer=writer, no_dist=ctx.no_dist)
        return {}

    def load(self, ctx: OpContext) -> dict[str, Any]:
        import distcp

        reader = distcp.FileSystemReader(ctx.path, thread_count=ctx.threads)
        distcp.load(ctx.state, storage_reader=reader, no_dist=ctx.no_dist)
        report = reader.report
        return {
            "bytes_needed": report.bytes_needed,
            "bytes_read": report.bytes_read,
            "bytes_verified": report.bytes_verified,
        }


class DistcpAsync(Peer):
    """``distcp.async_save`` writing from a background thread: reports the
    blocking part (planning and staging) and waits for the commit before
    returning, so the op's total time is the whole save."""

    name = "distcp-async"
    ops = frozenset({"save"})
    kind = "thread"

    def save(self, ctx: OpContext) -> dict[str, Any]:
        import distcp

        writer = distcp.FileSystemWriter(ctx.path, thread_count=ctx.threads, sync_files=True)
        kind = distcp.AsyncCheckpointerType(self.kind)
        start = time.perf_counter()
        future = distcp.async_save(
            ctx.state, storage_writer=writer, no_dist=ctx.no_dist, async_checkpointer_type=kind
        )
        blocking = time.perf_counter() - start
        future.result()
        return {"blocking_s": blocking}

    def load(self, ctx: OpContext) -> dict[str, Any]:
        raise NotImplementedError("distcp-async only saves")


class DistcpAsyncProcess(DistcpAsync):
    """``distcp.async_save`` writing from its writer process (shared-memory staging)."""

    name = "distcp-async-proc"
    kind = "process"


class TorchDcp(Peer):
    name = "torch-dcp"

    def save(self, ctx: OpContext) -> dict[str, Any]:
        from torch.distributed.checkpoint.filesystem import FileSystemWriter
        from torch.distributed.checkpoint.state_dict_saver import save

        writer = FileSystemWriter(ctx.path, thread_count=ctx.threads, sync_files=True)
        save(ctx.state, storage_writer=writer, no_dist=ctx.no_dist)
        return {}

    def load(self, ctx: OpContext) -> dict[str, Any]:
        from torch.distributed.checkpoint.filesystem import FileSystemReader
        from torch.distributed.checkpoint.state_dict_loader import load

        load(ctx.state, storage_reader=FileSystemReader(ctx.path), no_dist=ctx.no_dist)
        return {}


class TorchSave(Peer):
    name = "torch.save"

    def save(self, ctx: OpContext) -> dict[str, Any]:
        if ctx.layout.kind == "replicate" and ctx.rank != 0:
            return {}  # DDP code saves the replicated state from rank 0 alone
        boxes: dict[str, list[list[int]]] = {}
        tensors: dict[str, torch.Tensor] = {}
        for spec in ctx.specs:
            box = ctx.layout.box(spec, ctx.rank)
            if box is not None:
                boxes[spec.key] = [list(box[0]), list(box[1])]
                tensors[spec.key] = local_tensor(ctx.state[spec.key])
        with open(ctx.path / f"rank{ctx.rank:05d}.pt", "wb") as file:
            torch.save({"boxes": boxes, "tensors": tensors}, file)
            file.flush()
            os.fsync(file.fileno())
        return {}

    def load(self, ctx: OpContext) -> dict[str, Any]:
        wanted = [
            (spec.key, box, local_tensor(ctx.state[spec.key]))
            for spec in ctx.specs
            if (box := ctx.layout.box(spec, ctx.rank)) is not None
        ]
        for file in sorted(ctx.path.glob("rank*.pt")):
            saved = torch.load(file, mmap=True, weights_only=True)
            boxes, tensors = saved["boxes"], saved["tensors"]
            for key, box, destination in wanted:
                if key not in boxes:
                    continue
                source_box: Box = (tuple(boxes[key][0]), tuple(boxes[key][1]))
                overlap = intersect(box, source_box)
                if overlap is not None:
                    destination[box_slices(overlap, box)].copy_(
                        tensors[key][box_slices(overlap, source_box)]
                    )
            del saved, boxes, tensors
        return {}


# --- raw ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RawPiece:
    key: str
    box: Box
    offset: int  # in its file
    nbytes: int


@dataclass(frozen=True, slots=True)
class RawFile:
    name: str
    rank: int
    pieces: tuple[RawPiece, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


def raw_files(specs: list[TensorSpec], layout: Layout, threads: int) -> list[RawFile]:
    """Where the raw peer writes each piece of a state saved from ``layout``: T files
    per rank in rank order (a pure function, so loading ranks recompute it)."""
    ranks = 1 if layout.kind == "single" else layout.ranks
    per_rank: list[list[tuple[TensorSpec, Box]]] = [[] for _ in range(ranks)]
    if layout.kind == "replicate":  # written once, balanced by bytes, largest first
        load = [0] * ranks
        owner: dict[str, int] = {}
        for spec in sorted(specs, key=lambda s: -s.nbytes):
            owner[spec.key] = rank = load.index(min(load))
            load[rank] += spec.nbytes
        for spec in specs:
            full: Box = (tuple(0 for _ in spec.shape), spec.shape)
            per_rank[owner[spec.key]].append((spec, full))
    else:
        for rank in range(ranks):
            for spec in specs:
                box = layout.box(spec, rank)
                if box is not None:
                    per_rank[rank].append((spec, box))
    files = []
    for rank, pieces in enumerate(per_rank):
        sizes = [_box_bytes(box) for _, box in pieces]
        for thread, group in enumerate(
            _split_evenly(list(zip(pieces, sizes, strict=True)), threads)
        ):
            offset, placed = 0, []
            for (spec, box), size in group:
                placed.append(RawPiece(spec.key, box, offset, size))
                offset += size
            files.append(RawFile(f"raw-r{rank:03d}-t{thread:02d}.bin", rank, tuple(placed)))
    return files


@dataclass(frozen=True, slots=True)
class _Read:
    file: int  # index into the file list
    offset: int
    destination: int  # index into the destination buffers
    start: int
    nbytes: int


class Raw(Peer):
    name = "raw"

    def save(self, ctx: OpContext) -> dict[str, Any]:
        mine = [f for f in raw_files(ctx.specs, ctx.layout, ctx.threads) if f.rank == ctx.rank]

        def write(file: RawFile) -> None:
            fd = os.open(ctx.path / file.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                written = started = 0
                for piece in file.pieces:
                    view = _bytes_view(local_tensor(ctx.state[piece.key]))
                    written += len(view)
                    while view:
                        view = view[os.write(fd, view) :]
                    if written - started >= knobs.WRITEBACK_EVERY:  # as distcp does: the limit
                        start_writeback(fd, started, written - started)
                        started = written
                os.fsync(fd)
            finally:
                os.close(fd)

        _each_on_threads(mine, ctx.threads, write)
        return {"files": len(mine)}

    def load(self, ctx: OpContext) -> dict[str, Any]:
        files = raw_files(ctx.specs, ctx.save_layout, ctx.threads)
        wanted = [
            (spec.key, box, local_tensor(ctx.state[spec.key]))
            for spec in ctx.specs
            if (box := ctx.layout.box(spec, ctx.rank)) is not None
        ]
        buffers = [_bytes_view(t) for _, _, t in wanted]
        reads = _exact_reads(files, wanted)
        exact = reads is not None
        if reads is None:
            reads = _sequential_reads(files, ctx, buffers)
        reads = [part for read in reads for part in _cut(read)]
        paths = [ctx.path / f.name for f in files]

        def read_group(group: list[_Read]) -> None:
            fds: dict[int, int] = {}
            try:
                for read in group:
                    if read.file not in fds:
                        fds[read.file] = os.open(paths[read.file], os.O_RDONLY)
                    view = buffers[read.destination][read.start : read.start + read.nbytes]
                    offset = read.offset
                    while view:
                        got = os.preadv(fds[read.file], [view], offset)
                        if got <= 0:
                            raise OSError(f"short read in {paths[read.file]} at {offset}")
                        view, offset = view[got:], offset + got
            finally:
                for fd in fds.values():
                    os.close(fd)

        groups = _split_evenly([(r, r.nbytes) for r in reads], ctx.threads)
        _each_on_threads([[r for r, _ in g] for g in groups], ctx.threads, read_group)
        return {"exact": exact}


def _exact_reads(
    files: list[RawFile], wanted: list[tuple[str, Box, torch.Tensor]]
) -> list[_Read] | None:
    """One read per (saved piece, requested box) overlap, if every overlap is one
    contiguous run of both; None otherwise."""
    by_key: dict[str, list[tuple[int, RawPiece]]] = {}
    for index, file in enumerate(files):
        for piece in file.pieces:
            by_key.setdefault(piece.key, []).append((index, piece))
    reads = []
    for destination, (key, box, _) in enumerate(wanted):
        for index, piece in by_key.get(key, []):
            overlap = intersect(box, piece.box)
            if overlap is None:
                continue
            source_run, destination_run = (
                contiguous_run(overlap, piece.box),
                contiguous_run(overlap, box),
            )
            if source_run is None or destination_run is None:
                return None
            reads.append(
                _Read(
                    index,
                    piece.offset + source_run[0] * ITEMSIZE,
                    destination,
                    destination_run[0] * ITEMSIZE,
                    source_run[1] * ITEMSIZE,
                )
            )
    return reads


def _sequential_reads(
    files: list[RawFile], ctx: OpContext, buffers: list[memoryview]
) -> list[_Read]:
    """Reads filling ``buffers`` in order from the raw files taken as one stream,
    this rank starting where the lower ranks' share of the stream ends."""
    stream = sum(f.nbytes for f in files)
    if stream == 0:
        return []
    below = sum(ctx.layout.bytes_on(ctx.specs, r) for r in range(ctx.rank))
    position = below % stream
    starts, total = [], 0
    for file in files:
        starts.append(total)
        total += file.nbytes
    reads = []
    for destination, buffer in enumerate(buffers):
        done = 0
        while done < len(buffer):
            index = max(i for i, s in enumerate(starts) if s <= position and files[i].nbytes)
            within = position - starts[index]
            size = min(len(buffer) - done, files[index].nbytes - within)
            reads.append(_Read(index, within, destination, done, size))
            done += size
            position = (position + size) % stream
    return reads


def _cut(read: _Read) -> Iterable[_Read]:
    for start in range(0, read.nbytes, PIECE_BYTES):
        size = min(PIECE_BYTES, read.nbytes - start)
        yield _Read(read.file, read.offset + start, read.destination, read.start + start, size)


# --- memcpy -------------------------------------------------------------------------


class Memcpy(Peer):
    name = "memcpy"
    ops = frozenset({"load"})

    def save(self, ctx: OpContext) -> dict[str, Any]:
        raise NotImplementedError("memcpy is a limit for loads only")

    def load(self, ctx: OpContext) -> dict[str, Any]:
        source = ctx.memcpy_source
        assert source is not None, "the phase set-up prepares the memcpy source"
        copies: list[tuple[tuple[torch.Tensor, int, int, int], int]] = []
        position = 0
        for spec in ctx.specs:
            if ctx.layout.box(spec, ctx.rank) is None:
                continue
            flat = local_tensor(ctx.state[spec.key]).view(torch.uint8).reshape(-1)
            for start in range(0, flat.numel(), PIECE_BYTES):
                size = min(PIECE_BYTES, flat.numel() - start)
                copies.append(((flat, start, position + start, size), size))
            position += flat.numel()

        def copy(group: list[tuple[tuple[torch.Tensor, int, int, int], int]]) -> None:
            for (flat, start, at, size), _ in group:
                flat[start : start + size].copy_(source[at : at + size])

        _each_on_threads(_split_evenly(copies, ctx.threads), ctx.threads, copy)
        return {}


def memcpy_source(specs: list[TensorSpec], layout: Layout, rank: int) -> torch.Tensor:
    """The bytes ``rank`` needs in ``layout``, concatenated in key order."""
    from bench.scenarios import expected

    parts = [
        expected(spec, box).contiguous().view(torch.uint8).reshape(-1)
        for spec in specs
        if (box := layout.box(spec, rank)) is not None
    ]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Distcp(),
        DistcpAsync(),
        DistcpAsyncProcess(),
        TorchDcp(),
        TorchSave(),
        Raw(),
        Memcpy(),
    )
}


# --- helpers ------------------------------------------------------------------------

_T = TypeVar("_T")


def _box_bytes(box: Box) -> int:
    size = ITEMSIZE
    for extent in box[1]:
        size *= extent
    return size


def _bytes_view(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous tensor's memory (no copy)."""
    if not tensor.is_contiguous():
        raise ValueError("the benchmark's tensors are contiguous")
    if tensor.numel() == 0:
        return memoryview(bytearray())
    array: Any = tensor.view(torch.uint8).reshape(-1).numpy()
    return memoryview(array).cast("B")


def _split_evenly(items: Sequence[tuple[_T, int]], parts: int) -> list[list[tuple[_T, int]]]:
    """``items`` (with their sizes) cut, in order, into at most ``parts`` groups
    of about equal total size."""
    total = sum(size for _, size in items)
    groups: list[list[tuple[_T, int]]] = [[]]
    done = 0
    for item, size in items:
        if groups[-1] and len(groups) < parts and done >= total * len(groups) / parts:
            groups.append([])
        groups[-1].append((item, size))
        done += size
    return [g for g in groups if g]


def _each_on_threads(work: Sequence[_T], threads: int, function: Callable[[_T], None]) -> None:
    if len(work) <= 1 or threads <= 1:
        for item in work:
            function(item)
        return
    with ThreadPoolExecutor(min(threads, len(work))) as pool:
        for _ in pool.map(function, work):
            pass
