"""Token rows: the ``(B, S, ...)`` values of a batch as rows of the positions its mask keeps.

``extract(..., per_token=True)`` stores what trainers of sparse autoencoders and probes read:
one row per real token, padding dropped, the token ids beside the vectors. The rows are cut
while the model runs, in place of the capture's usual copy (a :class:`RowCopier` stands in for
the copy engine), so each value is copied once, from the live tensor straight into its rows.

Rows land in staging buffers that are kept from one batch to the next (a copy into memory that
was written before runs several times faster than one into fresh pages, which the kernel must
fault in and zero). Rows from a CUDA device are cut and cast there and copied into pinned host
buffers on a side stream (:mod:`tensorsnap._transfer`): :meth:`RowCopier.end` returns the
fences the writer waits on before it reads their bytes, so the copies overlap the model's work.
A batch's buffers are reused only after its rows have been written, which ``extract``
guarantees by writing each batch before it runs the one that takes its buffers again.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from ._errors import TensorSnapError, attr, format_path
from ._transfer import Fence, Transfers, transfers_for

__all__ = ["IDS_KEY", "REUSE_STAGING", "Positions", "RowCopier", "positions"]

# the key the kept token ids are stored under
IDS_KEY = "input_ids"
_IDS_ROOT = f"snap[{IDS_KEY!r}]"
# a mask whose kept positions fall in more contiguous runs than this is cut by one gather
_MAX_RUNS = 256
# a buffer that must grow gets this much headroom, so that batches of varying length settle
_GROWTH = 1.25
# keep staging buffers between batches (benchmarks/bench_extract.py turns it off to measure
# what the reuse buys)
REUSE_STAGING = True


@dataclasses.dataclass
class Positions:
    """The positions of one batch that become rows.

    Attributes:
        index: The batch's index in ``batches`` (for messages).
        shape: ``(B, S)`` of ``input_ids``.
        ids: ``input_ids`` as the batch gave it.
        kept: Flat positions (``b * S + s``) kept, on the CPU, ascending; None keeps all.
        runs: ``(flat start, length)`` of each contiguous run of kept positions inside one
            sequence, when there are few (ordinary padding gives one per sequence), else None.
    """

    index: int
    shape: tuple[int, int]
    ids: torch.Tensor
    kept: torch.Tensor | None
    runs: list[tuple[int, int]] | None
    _on: dict[torch.device, torch.Tensor] = dataclasses.field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.shape[0] * self.shape[1] if self.kept is None else int(self.kept.numel())

    def kept_on(self, device: torch.device) -> torch.Tensor:
        """``kept`` on ``device``, moved there once per batch."""
        if self.kept is None:  # pragma: no cover - callers check
            raise ValueError("every position is kept")
        found = self._on.get(device)
        if found is None:
            found = self._on[device] = self.kept.to(device)
        return found


def positions(batch: Any, index: int) -> Positions:
    """The kept positions of a ``per_token`` batch: a Mapping with ``input_ids`` (B, S) and an
    optional ``attention_mask`` of the same shape holding 0 and 1 only.

    Raises:
        TensorSnapError: The batch is not such a Mapping; the message says what arrived.
    """
    where = f"per_token=True, batch {index}"
    if not isinstance(batch, Mapping):
        raise TensorSnapError(
            f"{where} is a {type(batch).__name__}; per_token=True needs each batch to be a "
            "Mapping (a dict, a tokenizer's BatchEncoding) with 'input_ids' of shape (B, S) "
            "and optionally 'attention_mask', called as model(**batch)"
        )
    ids = batch.get(IDS_KEY)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        got = (
            f"a {ids.dtype} tensor of shape {tuple(ids.shape)}"
            if isinstance(ids, torch.Tensor)
            else "missing"
            if IDS_KEY not in batch
            else f"a {type(ids).__name__}"
        )
        raise TensorSnapError(
            f"{where}: batch['input_ids'] is {got}; per_token=True needs integer token ids of "
            "shape (B, S) (tokenize with return_tensors='pt' and padding=True)"
        )
    shape = (int(ids.shape[0]), int(ids.shape[1]))
    mask = batch.get("attention_mask")
    if mask is None:
        return Positions(index, shape, ids, None, None)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != shape:
        got = (
            f"shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        )
        raise TensorSnapError(
            f"{where}: batch['attention_mask'] is {got}, expected a tensor of input_ids' shape "
            f"{shape} holding 1 for tokens and 0 for padding"
        )
    mask = mask.detach().cpu()
    keep = mask != 0
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        odd = mask[(mask != 0) & (mask != 1)].flatten()[:3].tolist()
        raise TensorSnapError(
            f"{where}: batch['attention_mask'] holds values other than 0 and 1 (e.g. {odd}); "
            "per_token=True keeps the positions where it is 1: pass the tokenizer's 0/1 mask, "
            "not an additive or 4-d attention mask"
        )
    flat = keep.reshape(-1)
    if bool(flat.all()):
        return Positions(index, shape, ids, None, None)
    kept = flat.nonzero().reshape(-1)
    return Positions(index, shape, ids, kept, _runs(kept, shape[1]))


def _runs(kept: torch.Tensor, seq: int) -> list[tuple[int, int]] | None:
    """Contiguous runs of ``kept`` that stay inside one sequence, or None if there are many."""
    if kept.numel() == 0:
        return []
    starts = torch.ones(kept.numel(), dtype=torch.bool)
    starts[1:] = (kept[1:] != kept[:-1] + 1) | (kept[1:] % seq == 0)
    first = starts.nonzero().reshape(-1)
    if first.numel() > _MAX_RUNS:
        return None
    ends = torch.cat([first[1:], torch.tensor([kept.numel()])])
    return [(int(kept[a]), int(b - a)) for a, b in zip(first.tolist(), ends.tolist())]


class RowCopier:
    """Cuts the rows of each captured ``(B, S, ...)`` tensor; stands in for the copy engine.

    ``begin`` gives it a batch's positions; the capture session then calls ``copy_value`` for
    every selected value, as it would call :meth:`tensorsnap._copy.Copier.copy_value`; ``end``
    waits for asynchronous copies and raises for the values that had no ``(B, S)`` leading
    dims, all of them at once.

    Args:
        device: Where rows are staged (default: the host, pinned memory when they come from
            an accelerator; they are written to disk from there).
        dtype: Cast floating-point rows to this dtype.
        budget: Bytes of staging buffers kept between batches (None: no limit). Rows beyond it
            go to fresh memory, which the capture's spill store can move to disk.
        reuse: Keep staging buffers between batches (False allocates fresh ones per batch;
            the default is ``REUSE_STAGING``, which the benchmark turns off to measure what the
            reuse buys).
        generations: Sets of buffers used in turn, batch after batch: 2 when a writer thread
            writes one batch while the next one runs (its rows must stay as they are until then).
        overlap: Leave device-to-host copies in flight until the writer waits for them (the
            fences ``end`` returns); False waits for each as it is made (with a spill store,
            which may read a value as soon as it is stored).
    """

    def __init__(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        budget: int | None = None,
        reuse: bool | None = None,
        generations: int = 1,
        overlap: bool = True,
    ) -> None:
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self.budget = budget
        self.reuse = REUSE_STAGING if reuse is None else reuse
        self.generations = generations
        self._batch = -1
        self._buffers: dict[tuple[str, int, int], torch.Tensor] = {}
        self._kept_bytes = 0
        self._pos: Positions | None = None
        self._wrong: list[tuple[str, str]] = []  # (root, what is wrong there)
        self.overlap = overlap
        self._transfers: dict[torch.device, Transfers | None] = {}
        self._used: list[Transfers] = []  # those that copied this batch's rows
        self._collision = False

    # -- one batch --------------------------------------------------------------------------

    def begin(self, pos: Positions) -> torch.Tensor:
        """Start a batch; returns the kept token ids as rows."""
        self._pos = pos
        self._batch += 1
        self._wrong = []
        self._collision = False
        return self._rows(pos.ids, _IDS_ROOT, 0, cast=False)

    def end(self) -> list[Fence]:
        """End the batch; raise for values without ``(B, S)`` leading dims.

        Returns:
            The fences to wait on before the rows' bytes are read (copies still in flight).
        """
        fences = self._fences()
        pos, self._pos = self._pos, None
        if self._collision:
            raise TensorSnapError(
                f"per_token=True stores the token ids under the key {IDS_KEY!r}, and the model "
                f"has a module of that name whose output was selected too; exclude it "
                f"(exclude=[{IDS_KEY!r}])"
            )
        if self._wrong and pos is not None:
            texts = [text for _, text in self._wrong]
            shown = "; ".join(texts[:6]) + (
                f"; and {len(texts) - 6} more" if len(texts) > 6 else ""
            )
            raise TensorSnapError(
                f"per_token=True, batch {pos.index}: these selected values do not start with the "
                f"batch's (B, S) = {pos.shape}, so they have no token rows (pooled outputs, "
                f"position embeddings, attention weights, caches): {shown}. Leave them out with "
                f"exclude=[{', '.join(repr(k) for k in self._wrong_keys())}] (add your own "
                "patterns to it), or name the keys you want with include="
            )
        return fences

    def abort(self) -> None:
        """After an error inside a batch: wait for its copies, forget it."""
        for fence in self._fences():
            fence.synchronize()
        self._pos = None

    def _fences(self) -> list[Fence]:
        fences = [f for f in (t.fence() for t in self._used) if f is not None]
        self._used = []
        return fences

    def _wrong_keys(self) -> list[str]:
        keys: list[str] = []
        for root, _ in self._wrong:
            # the session names a value snap[<repr of its key>]
            key = ast.literal_eval(root[5:-1]) if root.startswith("snap[") else root
            if key not in keys:
                keys.append(key)
        return keys

    # -- what the capture session calls -------------------------------------------------------

    def copy_value(self, value: Any, root: str = "obj") -> Any:
        """Rows of every tensor inside ``value``, in its structure (``root`` names the key)."""
        if root == _IDS_ROOT:  # a module named input_ids: its key is taken by the token ids
            self._collision = True
            return None
        if type(value) is torch.Tensor:
            if self._fits(value):
                return self._rows(value, root, 0)
            self._refuse(root, [], value)
            return None
        found: list[tuple[list[object], torch.Tensor]] = []
        _walk(value, [], found, set())
        bad = [(path, t) for path, t in found if not self._fits(t)]
        if bad:
            for path, t in bad:
                self._refuse(root, path, t)
            return None
        # the copy engine rebuilds the structure around rows it finds in its memo (the memo of
        # copy.deepcopy: a tensor seen there is not copied again), so types and aliasing hold
        from ._copy import Copier

        copier = Copier()
        made: set[int] = set()
        for i, (_, t) in enumerate(found):
            if id(t) not in copier.memo:
                rows = self._rows(t, root, i)
                copier.memo[id(t)] = rows
                copier._keep_alive.append(t)
                made.add(id(rows))
        result = copier.copy_value(value, root=root)
        stray: list[tuple[list[object], torch.Tensor]] = []
        _walk(result, [], stray, set())
        for path, t in stray:
            if id(t) not in made:  # reached by the copy engine only: it would be stored whole
                raise TensorSnapError(
                    f"{format_path(root, path)} is a tensor held where per_token=True cannot "
                    "cut it into rows (inside an object's state); exclude this key"
                )
        return result

    def _fits(self, t: torch.Tensor) -> bool:
        pos = self._pos
        return (
            pos is not None
            and type(t) is torch.Tensor
            and t.layout is torch.strided
            and t.dim() >= 2
            and (int(t.shape[0]), int(t.shape[1])) == pos.shape
        )

    def _refuse(self, root: str, path: list[object], t: torch.Tensor) -> None:
        what = f"a tensor of shape {tuple(t.shape)}"
        if type(t) is not torch.Tensor or t.layout is not torch.strided:
            what += f" ({type(t).__name__}, {t.layout}: only plain strided tensors)"
        self._wrong.append((root, f"{format_path(root, path)} is {what}"))

    # -- rows ---------------------------------------------------------------------------------

    def _rows(self, t: torch.Tensor, root: str, leaf: int, cast: bool = True) -> torch.Tensor:
        pos = self._pos
        if pos is None:  # pragma: no cover - the session calls begin first
            raise TensorSnapError("token rows were asked for outside a batch")
        t = t.detach()
        rest = list(t.shape[2:])
        dtype = self.dtype if cast and self.dtype is not None and t.is_floating_point() else t.dtype
        source = t.device
        target = self.device if self.device is not None else torch.device("cpu")
        if source not in self._transfers:
            self._transfers[source] = transfers_for(source, target)
        transfers = self._transfers[source]
        pin = transfers is not None and transfers.pins
        dst = self._buffer(
            (root, leaf, self._batch % self.generations), pos.rows, rest, dtype, target, pin
        )
        if transfers is not None or source != target:
            # cut (and cast) where the value is, so that only the kept rows cross
            rows = self._gather(t, pos) if pos.kept is not None else t.reshape(pos.rows, *rest)
            rows = rows.to(dtype)
            if transfers is None:
                dst.copy_(rows)
                return dst
            if rows.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
                # still the live value (nothing cut, nothing cast): the model may write it in
                # place while the copy is in flight, so the copy reads a clone of it
                rows = rows.clone()
            transfers.copy(dst, rows)
            if not self.overlap:
                fence = transfers.fence()
                if fence is not None:
                    fence.synchronize()
            elif transfers not in self._used:
                self._used.append(transfers)
            return dst
        if pos.kept is None:
            dst.view(*pos.shape, *rest).copy_(t)  # one pass, any strides, cast included
        elif dtype == t.dtype and _flattens(t):
            torch.index_select(t.flatten(0, 1), 0, pos.kept_on(source), out=dst)
        elif pos.runs is not None:
            at, seq = 0, pos.shape[1]
            for start, length in pos.runs:
                b, s = divmod(start, seq)
                dst[at : at + length].copy_(t[b, s : s + length])
                at += length
        else:
            dst.copy_(self._gather(t, pos))
        return dst

    @staticmethod
    def _gather(t: torch.Tensor, pos: Positions) -> torch.Tensor:
        return t.flatten(0, 1).index_select(0, pos.kept_on(t.device))

    def _buffer(
        self,
        slot: tuple[str, int, int],
        rows: int,
        rest: list[int],
        dtype: torch.dtype,
        device: torch.device,
        pin: bool,
    ) -> torch.Tensor:
        """``rows`` rows of staging for ``slot``: its kept buffer if one fits, else a new one."""
        buf = self._buffers.get(slot)
        if (
            buf is not None
            and buf.dtype == dtype
            and buf.device == device
            and list(buf.shape[1:]) == rest
            and buf.shape[0] >= rows
        ):
            return buf[:rows]
        row_bytes = dtype.itemsize
        for size in rest:
            row_bytes *= size
        capacity = rows if buf is None else max(rows, int(rows * _GROWTH))
        held = buf.nbytes if buf is not None else 0
        fits = self.budget is None or self._kept_bytes - held + capacity * row_bytes <= self.budget
        if not self.reuse or not fits:
            return torch.empty((rows, *rest), dtype=dtype, device=device, pin_memory=pin)
        buf = torch.empty((capacity, *rest), dtype=dtype, device=device, pin_memory=pin)
        self._buffers[slot] = buf
        self._kept_bytes += buf.nbytes - held
        return buf[:rows]

    @property
    def staged_bytes(self) -> int:
        """Bytes of staging buffers kept between batches."""
        return self._kept_bytes


def _flattens(t: torch.Tensor) -> bool:
    """Whether ``t.flatten(0, 1)`` is a view (no copy)."""
    return t.shape[1] <= 1 or t.stride(0) == t.stride(1) * t.shape[1]


def _walk(
    value: Any, path: list[object], found: list[tuple[list[object], torch.Tensor]], seen: set[int]
) -> None:
    """Every tensor inside ``value`` with its path (containers, mappings, dataclasses, objects'
    attributes), depth first; an object reached twice is searched once."""
    if isinstance(value, torch.Tensor):
        found.append((path, value))
        return
    if id(value) in seen or value is None or isinstance(value, (str, bytes, int, float)):
        return
    seen.add(id(value))
    if isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            _walk(item, [*path, i], found, seen)
    elif isinstance(value, Mapping):
        for k, item in value.items():
            _walk(item, [*path, k], found, seen)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            _walk(getattr(value, field.name), [*path, attr(field.name)], found, seen)
    else:
        attributes = getattr(value, "__dict__", None)
        if type(attributes) is dict and not isinstance(value, type):
            for name, item in list(attributes.items()):
                _walk(item, [*path, attr(name)], found, seen)
