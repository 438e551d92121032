"""Extraction: a model's captures over a whole dataset, streamed into one bundle.

Each batch runs under ``no_grad`` inside its own ``capture``; its values are handed to a
:class:`~tensorsnap._stream.Writer`, which checks them against the first batch's and appends
them to the output's shard files (see ``_stream`` for the layout and the journal that makes a
run resumable). This module decides what a run is: its options, its model, where it resumes,
and, under a process group, one part per rank.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import re
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from os import PathLike
from typing import Any, TypeVar

import torch
from torch import nn

from . import _validate
from ._bundle import load
from ._capture import capture
from ._errors import BundleError, TensorSnapError
from ._manifest import JOURNAL, MANIFEST, read_manifest
from ._ranks import part_name, process_group, write_index
from ._shards import dtype_name, fsync_dir
from ._snapshot import Record, Snapshot, human_bytes
from ._store import parse_size
from ._stream import TEMP, Writer, read_journal, tensor_bytes

__all__ = ["extract"]


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
    per_token: bool = False,
    graph: bool = False,
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
            number of batches in any case: each batch is written out while or before the next
            runs (without ``max_memory``, on machines with 2 cores or more, a writer thread
            writes one batch while the next runs, so two batches' copies are held then; with
            it, batches are written one at a time).
        progress: Show a progress bar (batches, samples/s, bytes written) when stderr is a
            terminal and ``rich`` is installed.
        resume: Continue an interrupted run into ``out`` after its last journaled batch (pass
            the same batches in the same order: the ones already done are skipped, and their
            inputs are checked against a checksum in the journal), or return a finished
            ``out`` written with the same options unchanged. A missing ``out`` starts a new
            run.
        per_token: Store token rows, the layout trainers of sparse autoencoders and probes
            read: each batch is a Mapping with ``input_ids`` (B, S) and optionally
            ``attention_mask`` (B, S) of 0 and 1; every selected tensor with leading dims
            (B, S) is stored as rows (n_kept, ...) of the positions where the mask is 1 (all
            positions without a mask), batch-major, concatenated over batches, and the kept
            token ids as rows under the key ``"input_ids"``. Selected values without those
            leading dims (pooled outputs, position embeddings, attention weights, caches)
            raise, listing the keys to exclude. Rows are cut while the model runs, straight from
            the live tensors into staging buffers reused across batches (pinned when the model
            is on an accelerator; ``device`` says where they are staged, the host by default);
            with ``max_memory`` the buffers kept take up to half of it and rows beyond spill.
            ``load(out)[key]`` is a memory-mapped (n_tokens, ...) tensor: see
            ``docs/training-data.md`` for DataLoader, numpy and HF datasets recipes.
        graph: With ``ops=True``, capture each batch from the model's dynamo graph, compiled
            on the first batch and reused by the others (``capture(..., graph=True)``; a batch
            of a new shape may compile once more). The bundle is the same as without it.

    Returns:
        ``tensorsnap.load(out)``.

    Raises:
        TensorSnapError: With ``per_token``, a batch is not a Mapping with ``input_ids``
            (B, S) and a 0/1 ``attention_mask`` of that shape, or selected values have no
            (B, S) leading dims (the message lists them and the ``exclude`` that leaves them
            out). A key is missing from a batch (or new in it), or its structure,
            dtype or shape beyond dim 0 differs from the first batch's (the message names
            the key and the batch index); ``out`` exists and ``resume`` is False; ``resume``
            meets a run made with other options (the message names the option), or batches
            other than those the interrupted run had done.

    Example:
        >>> import os, tempfile, torch, tensorsnap
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
        >>> data = [torch.randn(8, 4) for _ in range(5)]
        >>> out = os.path.join(tempfile.mkdtemp(), "acts")
        >>> acts = tensorsnap.extract(model, data, out=out, progress=False)
        >>> acts["0"].shape
        torch.Size([40, 3])
    """
    # validate every option before anything is written (a session checks the capture ones);
    # patterns become lists once, so that a generator of them serves every batch
    include = None if include is None else _validate.patterns(include, "include")
    exclude = None if exclude is None else _validate.patterns(exclude, "exclude")
    chosen: dict[str, Any] = dict(
        include=include, exclude=exclude, ops=ops, inputs=inputs, device=device, dtype=dtype
    )
    capture(model, graph=graph, **chosen)
    parse_size(max_memory, "max_memory")
    if not isinstance(per_token, bool):
        raise TensorSnapError(
            f"per_token={per_token!r}: pass True to store token rows (padding dropped), or False"
        )
    if isinstance(batches, (torch.Tensor, Mapping)):
        raise TensorSnapError(
            f"batches={type(batches).__name__}: expected an iterable of batches (a list, a "
            "DataLoader, a generator); wrap a single batch in a list: batches=[batch]"
        )
    _check_run(batches, progress, resume)

    def whole(batch: Any, index: int) -> tuple[Snapshot, Sequence[Any]]:
        session = capture(model, max_memory=max_memory, graph=graph, **chosen)
        with torch.no_grad(), session as snap:
            _call(model, batch)
        return snap, ()

    run = (
        _token_run(model, include, exclude, ops, inputs, device, dtype, max_memory, graph)
        if per_token
        else whole
    )
    options = _options(include, exclude, ops, inputs, dtype, per_token)
    root = os.path.abspath(_validate.path(out, "out"))
    group = process_group()
    # with a memory budget one batch at a time: no writer thread holding a second one
    alone = max_memory is not None
    if group is not None:
        return _extract_ranks(root, group, options, model, batches, resume, progress, run, alone)
    existed = os.path.lexists(root)
    writer = _on_disk(root, _prepare, root, options, _model_id(model), resume)
    if writer is None:
        return load(root)
    if alone:
        writer.foreground()

    try:
        _run(writer, batches, run, progress)
    except BaseException:
        _discard_if_unused(root, existed)
        raise
    return load(root)


def _extract_ranks(
    root: str,
    group: tuple[int, int],
    options: dict[str, Any],
    model: nn.Module,
    batches: Iterable[Any],
    resume: bool,
    progress: bool,
    run: Callable[[Any, int], tuple[Snapshot, Sequence[Any]]],
    alone: bool = False,
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
        writer = _on_disk(part, _prepare, part, options, _model_id(model), resume, rank, world_size)
        if writer is not None:
            if alone:
                writer.foreground()
            _run(writer, batches, run, progress and rank == 0)
        dist.barrier()
        if rank == 0:
            write_index(root, world_size, concat=True)
        dist.barrier()
    return load(root)


def _run(
    writer: Writer,
    batches: Iterable[Any],
    run: Callable[[Any, int], tuple[Snapshot, Sequence[Any]]],
    progress: bool,
) -> None:
    """Each batch through ``run`` (its snapshot and the fences its values' bytes wait on),
    then into ``writer``."""
    total = len(batches) if isinstance(batches, Sized) else None
    bar = _Bar(progress, total)
    done = writer.batches
    journaled = writer.inputs_crc32  # the inputs' checksum over those ``done`` batches
    crc: int | None = 0 if done == 0 or journaled is not None else None
    seen = 0
    try:
        for index, batch in enumerate(batches):
            seen = index + 1
            if crc is not None:
                crc = inputs_crc32(batch, crc)
            if index < done:  # finished before the interruption
                bar.skip()
                if index == done - 1 and crc is not None and crc != journaled:
                    raise TensorSnapError(
                        f"{writer.root}: the first {done} batches are not those the interrupted "
                        "run extracted (their inputs' checksum differs); resume with the same "
                        "batches in the same order (a shuffling loader needs its seed), or "
                        "start over in a new out. An input tensor that the model changes in "
                        "place and that later batches reuse also differs once the batches "
                        "before are skipped: give each batch its own"
                    )
                continue
            snap, ready = run(batch, index)
            try:
                written = _on_disk(writer.root, writer.add, index, snap, crc, ready)
            finally:
                snap.close()
            _on_disk(writer.root, writer.maybe_commit)
            bar.step(_rows(batch), written)
        if seen == 0 and done == 0:
            raise TensorSnapError(
                f"batches= yielded no batch, so there is nothing to extract into {writer.root}; "
                "pass a non-empty iterable (a DataLoader over an empty dataset, or a generator "
                "already used up, yields nothing)"
            )
        if seen < done:
            raise TensorSnapError(
                f"{writer.root}: the batches ended after {seen}, but the interrupted run had "
                f"already done {done}; resume with the same batches in the same order"
            )
        _on_disk(writer.root, writer.finish)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()


# inputs up to this size are checksummed whole; larger ones by evenly spaced samples, so that a
# batch of images on a GPU is not read back to the host just to be recognised on resume
_WHOLE_INPUT_BYTES = 1 << 20
_INPUT_SAMPLES = 4096


def inputs_crc32(batch: Any, crc: int) -> int:
    """``crc`` continued over one batch: each tensor's dtype, shape and values, in order.

    Tensors over 1 MiB count by 4,096 evenly spaced elements (the same ones on any device and
    in any memory layout), which tells batches of real data apart at a fraction of the cost.
    Tensors whose values cannot be read as plain strided memory (sparse, nested, quantized,
    meta, wrapper subclasses such as DTensor) count by their type, layout, dtype and shape
    only. Plain values (str, numbers, bool, None), mapping keys included, count by their value;
    other objects by their type only, since their repr may hold a memory address. Never raises:
    the check must not stop an extract that has nothing to resume.
    """
    stack: list[Any] = [batch]
    seen: set[int] = set()  # containers already counted: a batch may refer to itself
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            crc = _tensor_crc32(item.detach(), crc)
        elif isinstance(item, (Mapping, tuple, list)):
            if id(item) in seen:
                crc = zlib.crc32(b"cycle", crc)
                continue
            seen.add(id(item))
            if isinstance(item, Mapping):
                crc = zlib.crc32(b"{", crc)
                for key in reversed(list(item)):
                    stack.extend((item[key], key))
            else:
                crc = zlib.crc32(b"[", crc)
                stack.extend(reversed(item))
        elif isinstance(item, int) and not isinstance(item, bool):
            crc = zlib.crc32(format(item, "x").encode(), crc)  # hex: no digit limit
        elif item is None or isinstance(item, (str, float, bool)):
            crc = zlib.crc32(repr(item).encode(), crc)
        else:
            crc = zlib.crc32(type(item).__qualname__.encode(), crc)
    return crc


def _tensor_crc32(t: torch.Tensor, crc: int) -> int:
    if t.is_nested:  # has no single shape
        return zlib.crc32(f"nested {t.layout}{t.dtype}".encode(), crc)
    crc = zlib.crc32(f"{type(t).__name__}{t.layout}{t.dtype}{tuple(t.shape)}".encode(), crc)
    if type(t) is not torch.Tensor or t.layout is not torch.strided or t.is_quantized or t.is_meta:
        return crc
    try:
        if t.numel() * t.element_size() > _WHOLE_INPUT_BYTES:
            step = t.numel() // _INPUT_SAMPLES
            if t.is_contiguous():
                t = t.view(-1)[::step][:_INPUT_SAMPLES]
            else:  # gathered by index: an expanded or strided input is not materialised
                where = torch.unravel_index(
                    torch.arange(_INPUT_SAMPLES, device=t.device) * step, t.shape
                )
                # indexing resolves a conjugate or negative bit over the whole input: gather
                # from the view without it, then give the samples their bits back
                conj, neg = t.is_conj(), t.is_neg()
                plain = t.conj() if conj else t
                plain = plain._neg_view() if neg else plain
                t = plain[where]
                t = t.neg() if neg else t
                t = t.conj() if conj else t
        # after sampling: a large conjugate view is not resolved whole
        return zlib.crc32(tensor_bytes(t.resolve_conj().resolve_neg()), crc)
    except (RuntimeError, NotImplementedError, TypeError):  # dtypes numpy cannot hold, etc.
        return zlib.crc32(b"unreadable", crc)


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


# -- per_token: token rows ---------------------------------------------------------------------


def _token_run(
    model: nn.Module,
    include: Any,
    exclude: Any,
    ops: bool | str,
    inputs: bool,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    max_memory: int | str | None,
    graph: bool = False,
) -> Callable[[Any, int], tuple[Snapshot, Sequence[Any]]]:
    """``run`` for ``per_token=True``: one batch's token rows, ``input_ids`` first.

    The rows are cut by a :class:`~tensorsnap._rows.RowCopier` in place of the capture's copies;
    its staging buffers live as long as the run, so each batch reuses the previous one's (it has
    been written by then). Rows copied from a CUDA device are still in flight when ``run``
    returns: it returns the fences the writer waits on before it reads them, so the copies of one
    batch overlap the model's work on the next (with a writer thread; without one, the rest of
    the same batch). With ``max_memory`` the buffers kept take half of it and the spill
    store the other half, so that the rows of one batch stay within it, and each copy is waited
    for as it is made (the spill store may read a value at once).
    """
    from ._capture import _Session
    from ._rows import IDS_KEY, RowCopier, positions
    from ._stream import background_writes

    background = background_writes() and max_memory is None  # as extract decides

    budget = parse_size(max_memory, "max_memory")
    half = None if budget is None else budget // 2
    # a writer thread writes one batch while the next runs: two sets of buffers, in turn
    rows = RowCopier(
        device=device,
        dtype=dtype,
        budget=half,
        generations=2 if background else 1,
        overlap=budget is None,
    )

    def run(batch: Any, index: int) -> tuple[Snapshot, Sequence[Any]]:
        pos = positions(batch, index)
        session = _Session(
            model,
            include=include,
            exclude=exclude,
            ops=ops,
            inputs=inputs,
            max_memory=half,
            rows=rows,
            graph=graph,
        )
        try:
            with torch.no_grad(), session as snap:
                ids = rows.begin(pos)
                record = Record(IDS_KEY, "", 0, None, "input", tuple(ids.shape), ids.dtype, 0)
                snap._add(record._replace(nbytes=ids.nbytes), ids)
                _call(model, batch)
            ready = rows.end()  # raises for values that have no token rows, naming them all
        except BaseException:
            rows.abort()
            session.snapshot.close()
            raise
        return snap, ready

    return run


# -- options and the model: what a resumed run must share ----------------------------------


def _options(
    include: Any,
    exclude: Any,
    ops: bool | str,
    inputs: bool,
    dtype: torch.dtype | None,
    per_token: bool = False,
) -> dict[str, Any]:
    def patterns(value: Any) -> list[str] | None:
        return None if value is None else [value] if isinstance(value, str) else list(value)

    return {
        "include": patterns(include),
        "exclude": patterns(exclude),
        "ops": ops,
        "inputs": bool(inputs),
        "dtype": dtype_name(dtype) if dtype is not None else None,
        "per_token": per_token,
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
        # runs journaled before per_token existed stored values whole
        before = saved["options"].get(name, False if name == "per_token" else None)
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


def _check_run(batches: Any, progress: object, resume: object) -> None:
    """The arguments only ``extract`` has, checked before anything is created."""
    _validate.flag(progress, "progress")
    _validate.flag(resume, "resume")
    if batches is None or isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
        raise TensorSnapError(
            f"batches={batches!r}: expected an iterable of batches (a list, a DataLoader, a "
            f"generator), got {type(batches).__name__}"
        )
    if isinstance(batches, Sized) and len(batches) == 0:
        raise TensorSnapError(
            "batches= is empty, so there is nothing to extract; pass at least one batch"
        )


_T = TypeVar("_T")


def _on_disk(root: str, write: Callable[..., _T], *args: Any) -> _T:
    """``write(*args)``, with an ``OSError`` of the output turned into a BundleError naming it."""
    try:
        return write(*args)
    except OSError as err:
        if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            what = "no space is left on the device"
        else:
            what = "writing failed"
        raise BundleError(
            f"extract out={root}: {what} ({err}). The batches completed before it are "
            "journaled there: fix the cause (free space) and call the same extract(..., "
            "resume=True) to continue, or remove the directory"
        ) from err


def _discard_if_unused(root: str, existed: bool) -> None:
    """After a run that completed no batch: remove what it created, so ``out`` is free again.

    Only this run's own files go (the journal, its temp files and shard files), and the
    directory only if this call created it. A run with completed batches is left to resume.
    """
    try:
        state = read_journal(root)
    except (BundleError, OSError):
        return
    if state.get("batches") != 0:
        return
    for name in os.listdir(root):
        if name in (JOURNAL, *TEMP) or re.fullmatch(r"shard-\d{5}\.safetensors", name):
            os.unlink(os.path.join(root, name))
    if not existed:
        try:
            os.rmdir(root)
        except OSError:
            pass


def _prepare(
    root: str,
    options: dict[str, Any],
    model: dict[str, str],
    resume: bool,
    rank: int | None = None,
    world_size: int | None = None,
) -> Writer | None:
    """A writer for a new or interrupted run in ``root``; None when it is already finished."""
    if os.path.lexists(root) and not (os.path.isdir(root) and not os.path.islink(root)):
        raise TensorSnapError(f"out={root} exists and is not a directory; choose another out")
    entries = set(os.listdir(root)) if os.path.isdir(root) else set()
    for name in entries & set(TEMP):  # a commit that a kill interrupted: never complete
        os.unlink(os.path.join(root, name))
    entries -= set(TEMP)
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
        state = read_journal(root)
        if not resume:
            raise TensorSnapError(
                f"out={root} holds an unfinished extract ({state.get('batches')} batches done); "
                "pass resume=True to continue it, or remove it (shutil.rmtree) to start over"
            )
        _check_same(root, state, options, model)
        writer = Writer(root, options, model, rank, world_size)
        writer.recover(state, entries)
        return writer
    if entries:
        what = "out exists" if not resume else "out exists and holds no extract to resume"
        raise TensorSnapError(
            f"{what}: {root} is not empty and is not an extract output (no {MANIFEST}, no "
            f"{JOURNAL}); choose another out"
        )
    os.makedirs(root, exist_ok=True)
    writer = Writer(root, options, model, rank, world_size)
    writer.commit()  # from now on the directory is known as an unfinished extract
    return writer


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
            self._task, advance=1, rate=f"{rate:,.0f}", written=human_bytes(self.written)
        )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
