"""Extraction: a model's captures over a whole dataset, streamed into one bundle.

Each batch runs under ``no_grad`` inside its own ``capture``; its values are checked against
the first batch's (same keys, same structure, same dtypes, same shapes beyond dim 0) before a
byte is written, then every tensor of every value is appended, as contiguous bytes, to a shard
file of its own. Row-major tensors concatenated along dim 0 are their bytes concatenated, so
when the run ends each shard already holds its whole concatenated tensor: the run writes the
safetensors header into the space reserved at the head of each file and the manifest last, and
``load`` maps every key as one tensor, without a copy or a second pass over the data.

Resuming: after the first batch and then every ``_COMMIT_SECONDS``, the touched files are
fsynced and ``extract-journal.json`` is replaced atomically with the state after the last
completed batch (batches done, each file's length and running CRC-32). A restarted run cuts
every file back to its journaled length and deletes files the journal does not know, so bytes
written after the last journal entry are never seen, then skips the batches already done.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import os
import re
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sized
from os import PathLike
from typing import Any

import torch
from torch import nn

from ._bundle import load
from ._capture import capture
from ._errors import BundleError, TensorSnapError, attr, format_path
from ._manifest import JOURNAL, MANIFEST, Encoder, encode_manifest, read_manifest
from ._ranks import part_name, process_group, write_index
from ._shards import NATIVE, dtype_from_name, dtype_name, fsync_dir, write_all
from ._snapshot import Record, Snapshot
from ._store import parse_size

__all__ = ["extract"]

_JOURNAL_FORMAT = "tensorsnap-extract-journal"
_JOURNAL_VERSION = 1
# Journal (and fsync the files written since the last entry) at most this often: each entry
# costs one fsync per touched file; a restart redoes at most this much work.
_COMMIT_SECONDS = 2.0
# Bytes reserved at the head of each shard for its safetensors header (written at the end).
_DATA_START = 256
# Blobs end on this many bytes, as in every bundle (docs/format.md).
_BLOB_ALIGN = 16
# Shard files kept open between batches; the least recently used beyond it are closed.
_MAX_OPEN = 256
_SHARD_FILE = re.compile(r"shard-\d{5}\.safetensors")
_TEMP = (f".{JOURNAL}.tmp", f".{MANIFEST}.tmp")


def extract(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    out: str | PathLike[str],
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    ops: bool | str = False,
    inputs: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    max_memory: int | str | None = None,
    progress: bool = True,
    resume: bool = False,
) -> Snapshot:
    """Run ``model`` over ``batches`` and stream the selected captures into one bundle.

    Each key's value comes back as one tensor (or one nested value) covering all batches:
    the per-batch values concatenated along dim 0, leaf by leaf (0-dim values are stacked, so
    they give one row per batch). Dim 0 is concatenated whatever it means: a value whose first
    dim is not the batch (a ``(1, S, S)`` mask) gives ``(n_batches, S, S)``, exactly
    ``torch.cat`` of the per-batch values; exclude such keys if that is not wanted. ``#n``
    call counters restart with each batch. The model runs under ``torch.no_grad()``; its
    train/eval mode is left as it is.

    Under a ``torch.distributed`` process group every rank calls ``extract`` with the same
    ``out`` (a shared filesystem) and its own batches (e.g. through a ``DistributedSampler``):
    each rank writes ``out/rank-0000r/``, and ``load(out)`` concatenates the ranks' values in
    rank order (``load(out, rank=r)`` reads one rank's).

    Args:
        model: The module to run.
        batches: Any iterable (a list, a DataLoader, a generator). A Mapping batch is called
            as ``model(**batch)``, a tuple or list as ``model(*batch)``, anything else as
            ``model(batch)``.
        out: Directory of the bundle to write (must not exist, or be empty, unless
            ``resume=True``).
        include: Glob pattern(s) of keys to keep, as in :func:`tensorsnap.capture`.
        exclude: Glob pattern(s) of keys to drop.
        ops: Also capture functional-op outputs (``True`` or ``"aten"``).
        inputs: Also capture module inputs (``P:in``, ``P:kwargs``).
        device: Where copies are made before they are written (default: where produced).
        dtype: Cast floating-point copies to this dtype before writing.
        max_memory: Bytes (or ``"2GB"``) of one batch's copies kept in memory; the rest
            spill to disk until the batch is written. Memory use does not grow with the
            number of batches in any case: each batch is written out before the next runs.
        progress: Show a progress bar (batches, samples/s, bytes written) when stderr is a
            terminal and ``rich`` is installed.
        resume: Continue an interrupted run into ``out`` after its last journaled batch (the
            batches are matched by position: pass the same batches in the same order), or
            return a finished ``out`` written with the same options unchanged. A missing
            ``out`` starts a new run.

    Returns:
        ``tensorsnap.load(out)``.

    Raises:
        TensorSnapError: A key is missing from a batch (or new in it), or its structure,
            dtype or shape beyond dim 0 differs from the first batch's (the message names
            the key and the batch index); ``out`` exists and ``resume`` is False; ``resume``
            meets a run made with other options (the message names the option).

    Example:
        >>> import os, tempfile, torch, tensorsnap
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
        >>> data = [torch.randn(8, 4) for _ in range(5)]
        >>> out = os.path.join(tempfile.mkdtemp(), "acts")
        >>> acts = tensorsnap.extract(model, data, out=out, progress=False)
        >>> acts["0"].shape
        torch.Size([40, 3])
    """
    # validate every option before anything is written (a session checks the capture ones)
    capture(
        model, include=include, exclude=exclude, ops=ops, inputs=inputs, device=device, dtype=dtype
    )
    parse_size(max_memory, "max_memory")
    if isinstance(batches, (torch.Tensor, Mapping)):
        raise TensorSnapError(
            f"batches={type(batches).__name__}: expected an iterable of batches (a list, a "
            "DataLoader, a generator); wrap a single batch in a list: batches=[batch]"
        )

    def run(batch: Any) -> Snapshot:
        with (
            torch.no_grad(),
            capture(
                model,
                include=include,
                exclude=exclude,
                ops=ops,
                inputs=inputs,
                device=device,
                dtype=dtype,
                max_memory=max_memory,
            ) as snap,
        ):
            _call(model, batch)
        return snap

    options = _options(include, exclude, ops, inputs, dtype)
    root = os.path.abspath(os.fspath(out))
    group = process_group()
    if group is not None:
        return _extract_ranks(root, group, options, model, batches, resume, progress, run)
    writer = _prepare(root, options, _model_id(model), resume)
    if writer is None:
        return load(root)

    _run(writer, batches, run, progress)
    return load(root)


def _extract_ranks(
    root: str,
    group: tuple[int, int],
    options: dict[str, Any],
    model: nn.Module,
    batches: Iterable[Any],
    resume: bool,
    progress: bool,
    run: Callable[[Any], Snapshot],
) -> Snapshot:
    """Data-parallel extract: each rank streams its own batches into ``root/rank-0000r/``.

    Each part is an ordinary extract output (journal, resume and all); when every rank has
    finished its part, rank 0 commits the index that makes ``load(root)`` concatenate the
    parts in rank order (so a DistributedSampler's shards come back rank after rank).
    """
    import torch.distributed as dist

    rank, world_size = group
    if os.path.isfile(os.path.join(root, MANIFEST)):  # committed by an earlier run
        if not resume:
            raise TensorSnapError(
                f"out={root} already holds a finished bundle; pass resume=True to get it back "
                "(with the same options), or remove it (shutil.rmtree) to extract again"
            )
    else:
        part = os.path.join(root, part_name(rank))
        writer = _prepare(part, options, _model_id(model), resume, rank, world_size)
        if writer is not None:
            _run(writer, batches, run, progress and rank == 0)
        dist.barrier()
        if rank == 0:
            write_index(root, world_size, concat=True)
        dist.barrier()
    return load(root)


def _run(
    writer: _Writer, batches: Iterable[Any], run: Callable[[Any], Snapshot], progress: bool
) -> None:
    total = len(batches) if isinstance(batches, Sized) else None
    bar = _Bar(progress, total)
    done = writer.batches
    seen = 0
    try:
        for index, batch in enumerate(batches):
            seen = index + 1
            if index < done:  # finished before the interruption: matched by position
                bar.skip()
                continue
            snap = run(batch)
            try:
                written = writer.add(index, snap)
            finally:
                snap.close()
            writer.maybe_commit()
            bar.step(_rows(batch), written)
        if seen < done:
            raise TensorSnapError(
                f"{writer.root}: the batches ended after {seen}, but the interrupted run had "
                f"already done {done}; resume with the same batches in the same order"
            )
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _rows(batch: Any) -> int:
    """Samples in a batch, for the progress bar: dim 0 of its first tensor."""
    items = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(batch, torch.Tensor):
        items = [batch]
    elif not isinstance(batch, (Mapping, tuple, list)):
        return 1
    for item in items:
        if isinstance(item, torch.Tensor):
            return int(item.shape[0]) if item.dim() else 1
    return 1


# -- options and the model: what a resumed run must share ----------------------------------


def _options(
    include: Any, exclude: Any, ops: bool | str, inputs: bool, dtype: torch.dtype | None
) -> dict[str, Any]:
    def patterns(value: Any) -> list[str] | None:
        return None if value is None else [value] if isinstance(value, str) else list(value)

    return {
        "include": patterns(include),
        "exclude": patterns(exclude),
        "ops": ops,
        "inputs": bool(inputs),
        "dtype": dtype_name(dtype) if dtype is not None else None,
    }


def _model_id(model: nn.Module) -> dict[str, str]:
    """The model's class and a digest of its module tree, parameter and buffer shapes."""
    digest = hashlib.sha256()
    for name, module in model.named_modules():
        digest.update(f"m {name} {type(module).__qualname__}\n".encode())
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        digest.update(f"t {name} {tuple(t.shape)} {t.dtype}\n".encode())
    cls = type(model)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "structure": digest.hexdigest()}


def _check_same(root: str, saved: Any, options: dict[str, Any], model: dict[str, str]) -> None:
    if not isinstance(saved, dict) or not isinstance(saved.get("options"), dict):
        raise TensorSnapError(f"{root}: the extract options saved there are missing or damaged")
    for name, value in options.items():
        before = saved["options"].get(name)
        if before != value:
            raise TensorSnapError(
                f"{root} was extracted with {name}={_show(name, before)}, this call passes "
                f"{name}={_show(name, value)}: option {name!r} differs. Use the same options to "
                "resume or reuse it, or write to a new out"
            )
    before = saved.get("model")
    if before != model:
        what = (
            "class"
            if not isinstance(before, dict) or before.get("class") != model["class"]
            else "modules, parameter or buffer shapes"
        )
        raise TensorSnapError(
            f"{root} was extracted from another model (option 'model': its {what} differ; "
            f"saved {before!r}); pass the same model, or write to a new out"
        )


def _show(name: str, value: Any) -> str:
    if name == "dtype" and isinstance(value, str):
        return f"torch.{value}"
    return repr(value)


# -- the output directory ---------------------------------------------------------------------


def _prepare(
    root: str,
    options: dict[str, Any],
    model: dict[str, str],
    resume: bool,
    rank: int | None = None,
    world_size: int | None = None,
) -> _Writer | None:
    """A writer for a new or interrupted run in ``root``; None when it is already finished."""
    if os.path.lexists(root) and not (os.path.isdir(root) and not os.path.islink(root)):
        raise TensorSnapError(f"out={root} exists and is not a directory; choose another out")
    entries = set(os.listdir(root)) if os.path.isdir(root) else set()
    for name in entries & set(_TEMP):  # a commit that a kill interrupted: never complete
        os.unlink(os.path.join(root, name))
    entries -= set(_TEMP)
    if MANIFEST in entries:
        if not resume:
            raise TensorSnapError(
                f"out={root} already holds a finished bundle; pass resume=True to get it back "
                "(with the same options), or remove it (shutil.rmtree) to extract again"
            )
        manifest = read_manifest(os.path.join(root, MANIFEST))
        if "extract" not in manifest:
            raise TensorSnapError(
                f"out={root} is a bundle that tensorsnap.extract did not write; choose another out"
            )
        _check_same(root, manifest["extract"], options, model)
        if JOURNAL in entries:  # the run was killed between the manifest and this cleanup
            os.unlink(os.path.join(root, JOURNAL))
            fsync_dir(root)
        return None
    if JOURNAL in entries:
        state = _read_journal(root)
        if not resume:
            raise TensorSnapError(
                f"out={root} holds an unfinished extract ({state.get('batches')} batches done); "
                "pass resume=True to continue it, or remove it (shutil.rmtree) to start over"
            )
        _check_same(root, state, options, model)
        writer = _Writer(root, options, model, rank, world_size)
        writer.recover(state, entries)
        return writer
    if entries:
        what = "out exists" if not resume else "out exists and holds no extract to resume"
        raise TensorSnapError(
            f"{what}: {root} is not empty and is not an extract output (no {MANIFEST}, no "
            f"{JOURNAL}); choose another out"
        )
    os.makedirs(root, exist_ok=True)
    writer = _Writer(root, options, model, rank, world_size)
    writer.commit()  # from now on the directory is known as an unfinished extract
    return writer


def _read_journal(root: str) -> dict[str, Any]:
    path = os.path.join(root, JOURNAL)
    try:
        with open(path, "rb") as f:
            state = json.loads(f.read())
    except (OSError, ValueError) as err:
        raise BundleError(f"{path} cannot be read ({err}); remove {root} and start over") from err
    if not isinstance(state, dict) or state.get("format") != _JOURNAL_FORMAT:
        raise BundleError(f"{path} is not an extract journal; remove {root} and start over")
    if state.get("version") != _JOURNAL_VERSION:
        raise BundleError(
            f"{path} has journal version {state.get('version')!r}; this tensorsnap resumes "
            f"version {_JOURNAL_VERSION} only: finish it with the tensorsnap that started it"
        )
    return state


# -- writing ----------------------------------------------------------------------------------


class _Leaf:
    """One tensor position in a key's value: a shard file its batches are appended to."""

    __slots__ = ("crc32", "device", "dtype", "file", "nbytes", "rest", "rows")

    def __init__(self, file: str, dtype: torch.dtype, rest: list[int] | None, device: str) -> None:
        self.file = file
        self.dtype = dtype
        self.rest = rest  # the shape beyond dim 0; None for 0-dim values (stacked)
        self.device = device
        self.rows = 0
        self.nbytes = 0
        self.crc32 = 0

    def shape(self) -> list[int]:
        return [self.rows, *(self.rest or [])]

    def state(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "dtype": dtype_name(self.dtype),
            "rest": self.rest,
            "device": self.device,
            "rows": self.rows,
            "nbytes": self.nbytes,
            "crc32": self.crc32,
        }


class _Key:
    __slots__ = ("leaves", "record", "tree")

    def __init__(self, record: Record, tree: Any, leaves: list[_Leaf]) -> None:
        self.record = record
        self.tree = tree
        self.leaves = leaves


class _Writer:
    """Appends batches to the shard files of one output directory, journals, finishes."""

    def __init__(
        self,
        root: str,
        options: dict[str, Any],
        model: dict[str, str],
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.root = root
        self.options = options
        self.model = model
        self.rank = rank
        self.world_size = world_size
        self.keys: dict[str, _Key] = {}
        self.batches = 0
        self.defined = False
        self._fds: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._dirty: set[str] = set()
        self._last_commit = time.monotonic()

    # -- one batch ------------------------------------------------------------------------

    def add(self, index: int, snap: Snapshot) -> int:
        """Check batch ``index``'s values against the first batch's, then append them."""
        values = []
        for record in snap.records:
            encoder = Encoder(f"batch {index}: snap[{record.key!r}]")
            tree = encoder.node(snap[record.key], [])
            values.append((record, tree, encoder.tensors))
        if not self.defined:
            self._define(values)
        else:
            self._check(index, values)
        # every check passed: now write (new sizes are applied only once all bytes are out)
        updates = []
        for record, _, tensors in values:
            for leaf, t in zip(self.keys[record.key].leaves, tensors):
                data = _bytes(t)
                fd = self._fd(leaf.file)
                write_all(fd, data)
                self._dirty.add(leaf.file)
                rows = int(t.shape[0]) if t.dim() else 1
                updates.append((leaf, rows, len(data), zlib.crc32(data, leaf.crc32)))
        written = 0
        for leaf, rows, nbytes, crc in updates:
            leaf.rows += rows
            leaf.nbytes += nbytes
            leaf.crc32 = crc
            written += nbytes
        self.batches = index + 1
        return written

    def _define(self, values: list[tuple[Record, Any, list[torch.Tensor]]]) -> None:
        count = itertools.count()
        for record, tree, tensors in values:
            leaves = []
            for t in tensors:
                leaf = _Leaf(
                    f"shard-{next(count):05d}.safetensors",
                    t.dtype,
                    list(t.shape[1:]) if t.dim() else None,
                    str(t.device),
                )
                _create(os.path.join(self.root, leaf.file))
                leaves.append(leaf)
            self.keys[record.key] = _Key(record, tree, leaves)
        self.defined = True
        fsync_dir(self.root)

    def _check(self, index: int, values: list[tuple[Record, Any, list[torch.Tensor]]]) -> None:
        arrived = {record.key for record, _, _ in values}
        for name in self.keys:
            if name not in arrived:
                raise TensorSnapError(
                    f"key {name!r} is missing from batch {index} (the first batch had it); every "
                    "batch must produce the same keys: exclude it (exclude=[...]) if its module "
                    "does not run for every batch"
                )
        for record, tree, tensors in values:
            key = self.keys.get(record.key)
            if key is None:
                raise TensorSnapError(
                    f"key {record.key!r} appears in batch {index} but not in the first batch; "
                    "every batch must produce the same keys: exclude it (exclude=[...])"
                )
            where = _difference(key.tree, tree, [])
            if where is not None:
                raise TensorSnapError(
                    f"batch {index}: {format_path(f'snap[{record.key!r}]', where)} differs in "
                    "structure or in a non-tensor value from the first batch's; values are "
                    "concatenated leaf by leaf, so they must have the same structure: exclude "
                    "this key"
                )
            paths = _tensor_paths(tree)
            for i, (leaf, t) in enumerate(zip(key.leaves, tensors)):
                rest = list(t.shape[1:]) if t.dim() else None
                if t.dtype == leaf.dtype and rest == leaf.rest:
                    continue
                name = format_path(f"snap[{record.key!r}]", paths.get(i, []))
                expected = f"{leaf.dtype} of shape " + (
                    "() (0-dim)" if leaf.rest is None else f"(*, {', '.join(map(str, leaf.rest))})"
                )
                raise TensorSnapError(
                    f"batch {index}: {name} is {t.dtype} of shape {tuple(t.shape)}, the first "
                    f"batch had {expected}; values are concatenated along dim 0, so their dtype "
                    "and every dim after the first must match in all batches (pad or crop the "
                    "batches to one length, or exclude this key)"
                )

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is not None:
            self._fds.move_to_end(file)
            return fd
        if len(self._fds) >= _MAX_OPEN:
            old, old_fd = self._fds.popitem(last=False)
            if old in self._dirty:
                os.fsync(old_fd)
                self._dirty.discard(old)
            os.close(old_fd)
        fd = os.open(os.path.join(self.root, file), os.O_WRONLY | os.O_APPEND)
        self._fds[file] = fd
        return fd

    # -- journal ----------------------------------------------------------------------------

    def maybe_commit(self) -> None:
        if time.monotonic() - self._last_commit >= _COMMIT_SECONDS or self.batches == 1:
            self.commit()

    def commit(self) -> None:
        """Make the state after the last completed batch durable, then journal it."""
        for file in sorted(self._dirty):
            os.fsync(self._fds[file])
        self._dirty.clear()
        state = {
            "format": _JOURNAL_FORMAT,
            "version": _JOURNAL_VERSION,
            "options": self.options,
            "model": self.model,
            "batches": self.batches,
            "keys": [
                {
                    "record": [
                        k.record.key,
                        k.record.module,
                        k.record.call,
                        k.record.op,
                        k.record.kind,
                    ],
                    "value": k.tree,
                    "leaves": [leaf.state() for leaf in k.leaves],
                }
                for k in self.keys.values()
            ]
            if self.defined
            else None,
        }
        _replace(self.root, JOURNAL, json.dumps(state, separators=(",", ":")).encode())
        self._last_commit = time.monotonic()

    def recover(self, state: dict[str, Any], entries: set[str]) -> None:
        """Continue from a journal: cut files back to it, drop files it does not know."""
        path = os.path.join(self.root, JOURNAL)
        try:
            self.batches = int(state["batches"])
            known = set()
            if state["keys"] is not None:
                for item in state["keys"]:
                    key, module, call, op, kind = item["record"]
                    leaves = []
                    for spec in item["leaves"]:
                        leaf = _Leaf(
                            spec["file"],
                            dtype_from_name(spec["dtype"], path),
                            spec["rest"],
                            spec["device"],
                        )
                        leaf.rows, leaf.nbytes, leaf.crc32 = (
                            int(spec["rows"]),
                            int(spec["nbytes"]),
                            int(spec["crc32"]),
                        )
                        if not _SHARD_FILE.fullmatch(leaf.file):
                            raise ValueError(f"shard name {leaf.file!r}")
                        leaves.append(leaf)
                        known.add(leaf.file)
                    record = Record(key, module, call, op, kind, None, None, 0)
                    self.keys[key] = _Key(record, item["value"], leaves)
                self.defined = True
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(
                f"{path} is damaged ({type(err).__name__}: {err}); remove {self.root} and start "
                "over"
            ) from err
        for key in self.keys.values():
            for leaf in key.leaves:
                file = os.path.join(self.root, leaf.file)
                size = os.path.getsize(file) if os.path.isfile(file) else -1
                if size < _DATA_START + leaf.nbytes:
                    raise BundleError(
                        f"{file} (key {key.record.key!r}) is missing or shorter than {JOURNAL} "
                        f"says ({size} < {_DATA_START + leaf.nbytes} bytes); the directory was "
                        f"damaged: remove {self.root} and start over"
                    )
                if size != _DATA_START + leaf.nbytes:  # bytes of a batch never journaled
                    os.truncate(file, _DATA_START + leaf.nbytes)
        for name in entries:
            if _SHARD_FILE.fullmatch(name) and name not in known:
                os.unlink(os.path.join(self.root, name))
        fsync_dir(self.root)

    def abort(self) -> None:
        """After an error: journal the batches completed so far, close the files."""
        try:
            self.commit()
        except OSError:
            pass  # the error being raised matters more; the last journal entry still holds
        self._close()

    def _close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # -- the end ----------------------------------------------------------------------------

    def finish(self) -> None:
        """Headers into every shard, then the manifest (the commit point), then no journal."""
        from . import __version__

        for fd in self._fds.values():
            os.fsync(fd)
        self._close()
        self._dirty.clear()
        records: list[dict[str, Any]] = []
        shards: list[dict[str, Any]] = []
        for key in self.keys.values():
            blobs: list[dict[str, Any]] = []
            tensors: list[dict[str, Any]] = []
            for leaf in key.leaves:
                shards.append({"file": leaf.file, "nbytes": _seal(self.root, leaf)})
                numel = 1
                for size in leaf.shape():
                    numel *= size
                blob = None
                if numel:
                    blob = len(blobs)
                    blobs.append(
                        {
                            "shard": len(shards) - 1,
                            "name": "data",
                            "dtype": dtype_name(_blob_dtype(leaf.dtype)),
                            "offset": 0,
                            "nbytes": _padded(leaf.nbytes),
                            "crc32": _padded_crc(leaf),
                        }
                    )
                tensors.append(
                    {
                        "dtype": dtype_name(leaf.dtype),
                        "shape": leaf.shape(),
                        "stride": _contiguous(leaf.shape()),
                        "blob": blob,
                        "offset": 0,
                        "device": leaf.device,
                    }
                )
            r = key.record
            lone = key.tree.get("type") == "tensor" and len(key.leaves) == 1
            records.append(
                {
                    "key": r.key,
                    "module": r.module,
                    "call": r.call,
                    "op": r.op,
                    "kind": r.kind,
                    "shape": key.leaves[0].shape() if lone else None,
                    "dtype": dtype_name(key.leaves[0].dtype) if lone else None,
                    "nbytes": sum(leaf.nbytes for leaf in key.leaves),
                    "blobs": blobs,
                    "tensors": tensors,
                    "value": key.tree,
                }
            )
        info = {"options": self.options, "model": self.model, "batches": self.batches}
        manifest = encode_manifest(
            records,
            shards,
            version=__version__,
            rank=self.rank,
            world_size=self.world_size,
            extra={"extract": info},
        )
        _replace(self.root, MANIFEST, manifest)
        os.unlink(os.path.join(self.root, JOURNAL))
        fsync_dir(self.root)


def _create(path: str) -> None:
    """A new shard: a placeholder header (an empty safetensors file) in the reserved space."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, _header(torch.uint8, 0))
    finally:
        os.close(fd)


def _seal(root: str, leaf: _Leaf) -> int:
    """Pad the data to the blob alignment and write the real header; returns the file size."""
    path = os.path.join(root, leaf.file)
    padded = _padded(leaf.nbytes)
    fd = os.open(path, os.O_RDWR)
    try:
        os.ftruncate(fd, _DATA_START + leaf.nbytes)
        if padded > leaf.nbytes:
            os.pwrite(fd, bytes(padded - leaf.nbytes), _DATA_START + leaf.nbytes)
        os.pwrite(fd, _header(_blob_dtype(leaf.dtype), padded), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    return _DATA_START + padded


def _header(dtype: torch.dtype, nbytes: int) -> bytes:
    entry = {
        "dtype": NATIVE[dtype],
        "shape": [nbytes // dtype.itemsize],
        "data_offsets": [0, nbytes],
    }
    header = {"data": entry, "__metadata__": {"format": "pt", "writer": "tensorsnap-bundle"}}
    text = json.dumps(header, separators=(",", ":")).encode()
    if 8 + len(text) > _DATA_START:  # pragma: no cover - 20-digit sizes still fit
        raise BundleError(f"safetensors header of {len(text)} bytes does not fit")
    # pad with spaces (as safetensors does): the header's length covers the padding
    return (_DATA_START - 8).to_bytes(8, "little") + text.ljust(_DATA_START - 8)


def _blob_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in NATIVE else torch.uint8


def _padded(nbytes: int) -> int:
    return nbytes + (-nbytes) % _BLOB_ALIGN


def _padded_crc(leaf: _Leaf) -> int:
    return zlib.crc32(bytes(_padded(leaf.nbytes) - leaf.nbytes), leaf.crc32)


def _contiguous(shape: list[int]) -> list[int]:
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= max(size, 1)
    return stride[::-1]


def _bytes(t: torch.Tensor) -> memoryview:
    """The tensor's elements in row-major order, as bytes (copied only if not already so)."""
    if t.device.type != "cpu":
        t = t.cpu()
    flat = t.contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]


def _replace(root: str, name: str, data: bytes) -> None:
    """Write ``root/name`` atomically: a temp file, fsynced, renamed over it, directory fsynced."""
    temp = os.path.join(root, f".{name}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, os.path.join(root, name))
    fsync_dir(root)


# -- comparing value trees --------------------------------------------------------------------


def _children(node: Any) -> list[tuple[object, Any]]:
    """(path part, child node) pairs of a manifest value node."""
    kind = node.get("type") if isinstance(node, dict) else None
    if kind in ("tuple", "list", "set", "frozenset"):
        return list(enumerate(node["items"]))
    if kind == "namedtuple":
        return [(attr(str(f)), v) for f, v in zip(node["fields"], node["items"])]
    if kind in ("dict", "mapping"):
        return [(k.get("value", "?"), v) for k, v in node["items"]]
    if kind == "dataclass":
        pairs = [(attr(name), v) for name, v in node["fields"]]
        return pairs + [(k.get("value", "?"), v) for k, v in node.get("items", [])]
    if kind == "object":
        return [(attr(name), v) for name, v in node["attrs"]]
    return []


def _difference(a: Any, b: Any, parts: list[object]) -> list[object] | None:
    """The path of the first place where two value trees differ, or None."""
    if a == b:
        return None
    ca, cb = _children(a), _children(b)
    if ca and len(ca) == len(cb) and _shallow(a) == _shallow(b):
        for (part, x), (_, y) in zip(ca, cb):
            found = _difference(x, y, [*parts, part])
            if found is not None:
                return found
    return parts


def _shallow(node: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in node.items() if k not in ("items", "fields", "attrs")}


def _tensor_paths(tree: Any) -> dict[int, list[object]]:
    found: dict[int, list[object]] = {}

    def walk(node: Any, parts: list[object]) -> None:
        if isinstance(node, dict) and node.get("type") == "tensor":
            found.setdefault(node["index"], parts)
        for part, child in _children(node):
            walk(child, [*parts, part])

    walk(tree, [])
    return found


# -- progress ---------------------------------------------------------------------------------


class _Bar:
    """A rich progress bar on stderr (batches, samples/s, bytes written), when it is a terminal."""

    def __init__(self, enabled: bool, total: int | None) -> None:
        self._progress: Any = None
        self.samples = 0
        self.written = 0
        self._start = time.monotonic()
        if not enabled:
            return
        try:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )
        except ImportError:  # the bar is optional: pip install 'tensorsnap[cli]' brings rich
            return
        console = Console(stderr=True)
        if not console.is_terminal:
            return
        self._progress = Progress(
            TextColumn("extract"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("batches"),
            TextColumn("{task.fields[rate]} samples/s"),
            TextColumn("{task.fields[written]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self._task = self._progress.add_task("extract", total=total, rate="-", written="0 B")
        self._progress.start()

    def skip(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._task)

    def step(self, samples: int, written: int) -> None:
        self.samples += samples
        self.written += written
        if self._progress is None:
            return
        rate = self.samples / max(time.monotonic() - self._start, 1e-9)
        self._progress.update(
            self._task, advance=1, rate=f"{rate:,.0f}", written=_human(self.written)
        )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def _human(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"
