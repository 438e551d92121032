"""Unit tests for ``tensorsnap.snapshot``, one contract point (SPEC section 1) at a time.

References are independent of the code under test: values written by hand, ``copy.deepcopy``
where it works (leaf tensors), and torch's own operations on the source.
"""

from __future__ import annotations

import collections
import collections.abc
import copy
import dataclasses
import enum
import warnings
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn

import tensorsnap
from tensorsnap import TensorSnapError


def storage_of(t: torch.Tensor) -> tuple[int, int]:
    """Address and size of the storage behind ``t``."""
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def disjoint(a: torch.Tensor, b: torch.Tensor) -> bool:
    (pa, na), (pb, nb) = storage_of(a), storage_of(b)
    return pa + na <= pb or pb + nb <= pa


# -- values ---------------------------------------------------------------------------------


def test_values_are_bitwise_equal_including_nan_payloads_and_negative_zero() -> None:
    patterns = [0x7FC00001, 0x7F800001, -0x7FFFFFF0, 0x00000000, -0x80000000, 0x3F800000]
    x = torch.tensor(patterns, dtype=torch.int32).view(torch.float32)
    result = tensorsnap.snapshot(x)
    assert result.view(torch.int32).tolist() == patterns


def test_non_leaf_tensor_is_copied_where_deepcopy_raises() -> None:
    leaf = torch.ones(3, requires_grad=True)
    x = leaf * 2
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(x)
    result = tensorsnap.snapshot({"y": x})
    x.detach().add_(5)  # a later in-place write to the live tensor
    assert result["y"].tolist() == [2.0, 2.0, 2.0]
    assert result["y"].requires_grad is False and result["y"].grad_fn is None


def test_every_result_tensor_is_detached() -> None:
    leaf = torch.randn(4, requires_grad=True)
    param = nn.Parameter(torch.randn(2))
    result = tensorsnap.snapshot([leaf, leaf.exp(), leaf[1:], param, (leaf.sum(),)])
    tensors = [result[0], result[1], result[2], result[3], result[4][0]]
    assert all(not t.requires_grad and t.grad_fn is None for t in tensors)
    assert type(result[3]) is torch.Tensor  # a Parameter in a plain structure


@pytest.mark.parametrize(
    "dtype",
    [
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
    ],
)
def test_every_dtype_round_trips(dtype: torch.dtype) -> None:
    raw = torch.arange(48, dtype=torch.uint8) * 7
    source = raw.view(dtype) if dtype != torch.bool else raw % 2 == 1
    result = tensorsnap.snapshot(source)
    assert result.dtype == dtype
    assert torch.equal(result.view(torch.uint8), source.view(torch.uint8))
    assert disjoint(result, source)


# -- layouts --------------------------------------------------------------------------------


def test_layouts_keep_their_strides() -> None:
    base = torch.randn(2, 3, 4, 5)
    cases = {
        "transposed": base[0, 0].t(),
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "permuted": base.permute(3, 1, 0, 2),
        "stepped": base[:, :, ::2, 1::3],
        "zero_dim": base[1, 2, 3, 4],
        "zero_size": base[:, :0],
    }
    result = tensorsnap.snapshot(cases)
    for name, source in cases.items():
        got = result[name]
        assert got.shape == source.shape, name
        assert got.stride() == source.stride(), name
        assert torch.equal(got, source), name
        if source.numel():
            assert disjoint(got, source), name


def test_expanded_view_stays_unmaterialized() -> None:
    row = torch.randn(8)
    expanded = row.expand(1000, 8)
    result = tensorsnap.snapshot(expanded)
    assert result.stride() == (0, 1)
    assert result.untyped_storage().nbytes() == 8 * 4
    assert torch.equal(result, expanded)


def test_lone_slice_of_huge_base_copies_only_the_slice() -> None:
    big = torch.arange(4_000_000, dtype=torch.float32)  # 16 MB
    result = tensorsnap.snapshot({"slice": big[100:110], "stepped": big[1000:1100:10]})
    assert result["slice"].untyped_storage().nbytes() == 10 * 4
    assert result["slice"].tolist() == [float(i) for i in range(100, 110)]
    # a strided view copies the span it can reach, aligned down to 16 bytes at most
    assert result["stepped"].untyped_storage().nbytes() <= (91 * 4) + 15
    assert result["stepped"].stride() == (10,)
    assert result["stepped"].tolist() == [float(i) for i in range(1000, 1100, 10)]


# -- aliasing -------------------------------------------------------------------------------


def test_same_tensor_twice_gives_one_copy_twice() -> None:
    x = torch.randn(3)
    result = tensorsnap.snapshot((x, [x], {"again": x}))
    assert result[0] is result[1][0] is result[2]["again"]
    assert result[0] is not x


def test_views_of_one_base_become_views_of_one_new_base_like_deepcopy() -> None:
    base = torch.arange(12.0)
    leaves = [base, base[2:8], base[5:].view(7), base.view(3, 4)[:, 1]]
    reference = copy.deepcopy(leaves)  # deepcopy mirrors aliasing for leaf tensors
    result = tensorsnap.snapshot(leaves)
    ptr = result[0].untyped_storage().data_ptr()
    for got, ref, src in zip(result, reference, leaves):
        assert got.untyped_storage().data_ptr() == ptr
        assert got.storage_offset() == ref.storage_offset()
        assert got.stride() == ref.stride()
        assert torch.equal(got, src)
    assert disjoint(result[0], base)
    result[1][3] = -1.0  # element 5 of the new base
    assert result[0][5] == -1.0 and result[2][0] == -1.0 and base[5] == 5.0


def test_overlapping_views_without_their_base_share_one_new_storage() -> None:
    base = torch.arange(100.0, requires_grad=True) * 1  # non-leaf: deepcopy cannot help
    a, b = base[10:30], base[20:40]
    result = tensorsnap.snapshot([a, b])
    assert result[0].untyped_storage().data_ptr() == result[1].untyped_storage().data_ptr()
    # only the reachable span [10, 40) is copied, not the whole base
    assert result[0].untyped_storage().nbytes() <= 30 * 4 + 15
    result[0][15] = -7.0  # source element 25 is element 5 of b
    assert result[1][5] == -7.0
    assert base[25] == 25.0


def test_reinterpreted_views_of_one_storage_stay_aliased() -> None:
    x = torch.tensor([1.0, -0.0, 2.5])
    bits = x.view(torch.int32)
    result = tensorsnap.snapshot({"float": x, "bits": bits})
    assert result["bits"].tolist() == [0x3F800000, -0x80000000, 0x40200000]
    result["bits"][0] = 0x40000000  # 2.0
    assert result["float"][0] == 2.0 and x[0] == 1.0


def test_mutating_either_side_never_changes_the_other() -> None:
    x = torch.arange(6.0).reshape(2, 3)
    view = x.t()
    result = tensorsnap.snapshot({"x": x, "t": view})
    x.mul_(10)
    assert result["x"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    result["t"].zero_()
    assert x.tolist() == [[0.0, 10.0, 20.0], [30.0, 40.0, 50.0]]
    assert result["x"].sum() == 0


# -- structure and types --------------------------------------------------------------------


class Point(NamedTuple):
    x: Any
    y: Any


@dataclasses.dataclass(frozen=True)
class Frozen:
    tensor: torch.Tensor
    name: str


@dataclasses.dataclass(slots=True)
class Slotted:
    tensor: torch.Tensor
    count: int = 0


def test_containers_keep_their_exact_types() -> None:
    t = torch.randn(2)
    source = {
        "tuple": (t, 1),
        "namedtuple": Point(t, None),
        "list": [t, "s"],
        "ordered": collections.OrderedDict([("b", t), ("a", 2)]),
        "frozen": Frozen(t, "f"),
        "slots": Slotted(t, 3),
        "set": {1, "two", (3, 4)},
        "frozenset": frozenset({5, 6}),
        "scalars": (None, 1.5, True, 2**70, "text", b"bytes", 1j),
    }
    reference = copy.deepcopy(source)  # the types and values copy.deepcopy produces
    result = tensorsnap.snapshot(source)
    assert list(result) == list(source)
    for key in source:
        assert type(result[key]) is type(reference[key]), key
    assert list(result["ordered"].keys()) == ["b", "a"]
    assert result["namedtuple"]._fields == ("x", "y")
    assert result["frozen"].name == "f" and result["slots"].count == 3
    assert result["set"] == {1, "two", (3, 4)} and result["frozenset"] == frozenset({5, 6})
    assert result["scalars"] == (None, 1.5, True, 2**70, "text", b"bytes", 1j)
    for got in (result["frozen"].tensor, result["slots"].tensor, result["namedtuple"].x):
        assert got is result["tuple"][0]
        assert torch.equal(got, t) and disjoint(got, t)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result["frozen"].name = "changed"  # type: ignore[misc]


def test_classes_functions_and_enums_are_kept_as_they_are() -> None:
    class Color(enum.Enum):
        RED = 1

    source = {"abc": collections.abc.Mapping, "enum": Color, "member": Color.RED, "f": len}
    reference = copy.deepcopy(source)  # deepcopy returns these objects themselves
    result = tensorsnap.snapshot(source)
    for key in source:
        assert result[key] is reference[key] is source[key], key


def test_defaultdict_keeps_its_factory() -> None:
    source: collections.defaultdict[str, list[torch.Tensor]] = collections.defaultdict(list)
    source["a"].append(torch.ones(2) * 3)
    result = tensorsnap.snapshot(source)
    assert type(result) is collections.defaultdict
    assert result.default_factory is list
    assert result["a"][0].tolist() == [3.0, 3.0]
    assert result["missing"] == []  # the factory still works


def test_torch_return_types_stay_structseqs() -> None:
    x = torch.tensor([[1.0, 5.0], [7.0, 2.0]])
    source = torch.max(x, 0)
    result = tensorsnap.snapshot(source)
    assert type(result) is type(source)
    assert result.values.tolist() == [7.0, 5.0]
    assert result.indices.tolist() == [1, 0]
    assert disjoint(result.values, source.values)


def test_list_containing_itself_terminates() -> None:
    t = torch.zeros(1)
    source: list[Any] = [t]
    source.append(source)
    result = tensorsnap.snapshot(source)
    assert result[1] is result and result is not source
    assert result[0] is not t and torch.equal(result[0], t)


class Node:
    def __init__(self, value: torch.Tensor) -> None:
        self.value = value
        self.parent: Node | None = None
        self.child: Node | None = None


def test_object_whose_attribute_points_back_terminates() -> None:
    parent = Node(torch.ones(2, requires_grad=True) * 4)
    parent.child = Node(parent.value[:1])
    parent.child.parent = parent
    result = tensorsnap.snapshot(parent)
    assert type(result) is Node and result is not parent
    assert result.child is not None and result.child.parent is result
    assert result.value.tolist() == [4.0, 4.0]
    # the child's tensor is a view of the parent's, in the copy as in the source
    assert result.child.value.data_ptr() == result.value.data_ptr()


class OwnDeepcopy:
    """Copies itself with ``copy.deepcopy`` on its attributes, as many user classes do."""

    def __init__(self, tensor: torch.Tensor, note: str) -> None:
        self.tensor = tensor
        self.note = note
        self.copied = False

    def __deepcopy__(self, memo: dict[int, Any]) -> OwnDeepcopy:
        new = OwnDeepcopy(copy.deepcopy(self.tensor, memo), self.note)
        new.copied = True
        return new


def test_object_with_its_own_deepcopy_holding_non_leaf_tensors() -> None:
    x = torch.ones(3, requires_grad=True) + 1
    source = [OwnDeepcopy(x, "n"), x]
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(source)
    result = tensorsnap.snapshot(source)
    assert type(result[0]) is OwnDeepcopy and result[0].copied and result[0].note == "n"
    assert result[0].tensor.tolist() == [2.0, 2.0, 2.0]
    assert not result[0].tensor.requires_grad
    assert result[0].tensor is result[1]  # one memo for both


# -- modules and parameters -----------------------------------------------------------------


class Cached(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)
        self.register_buffer("running", torch.zeros(2))
        self.cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.cache = self.linear(x)  # a non-leaf tensor stored on self
        return self.cache + self.frozen


def test_module_with_non_leaf_attribute_is_deep_copied() -> None:
    module = Cached()
    module(torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(module)
    assert module.cache is not None
    result = tensorsnap.snapshot(module)
    assert type(result) is Cached and result is not module
    assert result.linear is not module.linear
    for name, param in module.named_parameters():
        got = result.get_parameter(name)
        assert type(got) is nn.Parameter, name
        assert got.requires_grad == param.requires_grad, name
        assert torch.equal(got, param) and disjoint(got, param), name
    assert result.cache is not None and type(result.cache) is torch.Tensor
    assert not result.cache.requires_grad and result.cache.grad_fn is None
    assert torch.equal(result.cache, module.cache.detach())
    assert torch.equal(result.running, module.running)
    assert disjoint(result.running, module.running)
    # the copy is a working module of its own
    with torch.no_grad():
        module.linear.weight.add_(1)
    assert not torch.equal(result.linear.weight, module.linear.weight)
    assert result(torch.randn(1, 3)).requires_grad


def test_parameter_reached_from_a_dict_and_a_module() -> None:
    module = nn.Linear(2, 2)
    result = tensorsnap.snapshot({"weight": module.weight, "module": module})
    assert type(result["weight"]) is torch.Tensor
    assert type(result["module"].weight) is nn.Parameter
    assert result["module"].weight.requires_grad
    # one copy behind both, as the source has one tensor behind both
    assert result["weight"].data_ptr() == result["module"].weight.data_ptr()
    assert torch.equal(result["weight"], module.weight)


def test_module_parameter_stays_aliased_with_views_copied_around_it() -> None:
    base = torch.arange(32.0)
    weight = nn.Parameter(base[8:24].view(4, 4))  # a Parameter over part of a storage
    assert weight.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    module = nn.Module()
    module.weight = weight
    # a row before the module and the whole storage after it: the copy's storage is widened
    # twice, and the module's Parameter must follow both times
    source = {"row": base[12:16], "module": module, "all": base}
    result = tensorsnap.snapshot(source, dtype=torch.float64)
    got = result["module"].weight
    assert type(got) is nn.Parameter and got.requires_grad and got.dtype == torch.float64
    assert got.tolist() == weight.tolist()
    result["all"][13] = -1.0  # row 1, column 1 of the weight
    assert got[1, 1] == -1.0 and result["row"][1] == -1.0
    assert weight[1, 1] == 13.0


def test_tied_parameters_stay_one_parameter() -> None:
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    model[1].weight = model[0].weight
    result = tensorsnap.snapshot(model)
    assert result[1].weight is result[0].weight
    assert type(result[0].weight) is nn.Parameter
    assert len(list(result.parameters())) == 1


# -- tensor kinds ---------------------------------------------------------------------------


def test_sparse_coo_tensor() -> None:
    indices = torch.tensor([[0, 1, 2], [2, 0, 1]])
    values = torch.tensor([3.0, 4.0, 5.0])
    source = torch.sparse_coo_tensor(indices, values, (3, 3), check_invariants=True)
    result = tensorsnap.snapshot(source)
    assert result.layout == torch.sparse_coo
    assert result.to_dense().tolist() == [[0, 0, 3], [4, 0, 0], [0, 5, 0]]
    source._values().mul_(2)
    assert result.to_dense().tolist() == [[0, 0, 3], [4, 0, 0], [0, 5, 0]]


def test_sparse_csr_tensor() -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        source = torch.tensor([[0.0, 2.0], [3.0, 0.0]]).to_sparse_csr()
        result = tensorsnap.snapshot(source)
        assert result.layout == torch.sparse_csr
        source.values().mul_(10)
        assert result.to_dense().tolist() == [[0.0, 2.0], [3.0, 0.0]]
        assert result.col_indices().tolist() == [1, 0]


@pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions:UserWarning")
def test_quantized_per_tensor_and_per_channel() -> None:
    x = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]])
    per_tensor = torch.quantize_per_tensor(x, 0.5, 3, torch.qint8)
    per_channel = torch.quantize_per_channel(
        x, torch.tensor([0.5, 0.25]), torch.tensor([0, 1]), 0, torch.quint8
    )
    result = tensorsnap.snapshot([per_tensor, per_channel])
    got_t, got_c = result
    assert got_t.qscheme() == torch.per_tensor_affine
    assert (got_t.q_scale(), got_t.q_zero_point()) == (0.5, 3)
    assert got_t.int_repr().tolist() == [[4, 1, 7], [6, 3, 2]]  # round(x / 0.5) + 3
    assert got_c.qscheme() == torch.per_channel_affine
    assert got_c.q_per_channel_scales().tolist() == [0.5, 0.25]
    assert got_c.q_per_channel_zero_points().tolist() == [0, 1]
    assert got_c.int_repr().tolist() == [[1, 0, 4], [7, 1, 0]]  # clamped to quint8's 0
    assert disjoint(got_t, per_tensor) and disjoint(got_c, per_channel)


def test_meta_tensor() -> None:
    source = torch.empty(3, 4, device="meta").t()
    result = tensorsnap.snapshot(source)
    assert result.is_meta and result is not source
    assert (result.shape, result.dtype) == (source.shape, source.dtype)


def test_conj_view_of_complex_tensor() -> None:
    z = torch.tensor([1 + 2j, -3 - 4j], dtype=torch.complex64)
    result = tensorsnap.snapshot(z.conj())
    assert result.tolist() == [1 - 2j, -3 + 4j]
    z.mul_(2)
    assert result.tolist() == [1 - 2j, -3 + 4j]


def test_inference_mode_tensor_becomes_an_ordinary_tensor() -> None:
    with torch.inference_mode():
        base = torch.arange(6.0)
        view = base[1:4]
    result = tensorsnap.snapshot([base, view])
    assert not result[0].is_inference() and not result[1].is_inference()
    result[1].add_(1)  # in-place outside inference mode: only allowed on ordinary tensors
    assert result[0].tolist() == [0.0, 2.0, 3.0, 4.0, 4.0, 5.0]
    assert base.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


# -- options --------------------------------------------------------------------------------


def test_dtype_casts_floating_tensors_only() -> None:
    floats = torch.tensor([1.0, 1 / 3, 70000.0])
    ints = torch.tensor([1, 2, 3])
    flags = torch.tensor([True, False])
    complex_ = torch.tensor([1 + 1j])
    result = tensorsnap.snapshot(
        {"f": floats, "view": floats[1:], "i": ints, "b": flags, "c": complex_},
        dtype=torch.float16,
    )
    assert result["f"].dtype == torch.float16
    assert result["f"].view(torch.int16).tolist() == floats.half().view(torch.int16).tolist()
    assert result["view"].data_ptr() == result["f"].data_ptr() + 2  # still a view
    assert result["i"].dtype == torch.int64 and result["i"].tolist() == [1, 2, 3]
    assert result["b"].dtype == torch.bool and result["b"].tolist() == [True, False]
    assert result["c"].dtype == torch.complex64


def test_device_cpu_and_meta() -> None:
    x = torch.randn(4, 3).t()
    on_cpu = tensorsnap.snapshot({"x": x}, device="cpu")["x"]
    assert on_cpu.device.type == "cpu" and torch.equal(on_cpu, x) and disjoint(on_cpu, x)
    on_meta = tensorsnap.snapshot([x, x[1:]], device=torch.device("meta"))
    assert all(t.is_meta for t in on_meta)
    assert on_meta[0].shape == (3, 4) and on_meta[0].stride() == (1, 3)
    assert on_meta[1].shape == (2, 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is for CPU-only builds")
def test_pin_memory_without_cuda_warns_and_still_copies() -> None:
    x = torch.arange(3.0)
    with pytest.warns(UserWarning, match="pin_memory=True but no CUDA device is available"):
        result = tensorsnap.snapshot(x, pin_memory=True)
    assert result.tolist() == [0.0, 1.0, 2.0] and disjoint(result, x)


def test_error_names_the_path_inside_the_structure() -> None:
    source = {"a": [torch.ones(1), (i for i in range(3))]}
    with pytest.raises(TensorSnapError, match=r"^obj\['a'\]\[1\]: cannot copy a generator object"):
        tensorsnap.snapshot(source)


def test_error_path_through_attributes_and_tuples() -> None:
    holder = Node(torch.ones(1))
    holder.child = (torch.zeros(1), (i for i in range(2)))  # type: ignore[assignment]
    with pytest.raises(TensorSnapError, match=r"^obj\.child\[1\]: cannot copy a generator"):
        tensorsnap.snapshot(holder)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dtype": torch.int32}, r"dtype=torch\.int32 is not a floating-point torch\.dtype"),
        ({"dtype": "float16"}, r"dtype='float16' is not a floating-point torch\.dtype"),
        ({"device": "nowhere"}, r"device='nowhere' is not a torch device"),
        ({"device": "meta", "pin_memory": True}, r"pin_memory=True pins CPU copies"),
    ],
)
def test_bad_arguments_raise_before_copying(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(TensorSnapError, match=message):
        tensorsnap.snapshot(torch.ones(1), **kwargs)


def test_view_spanning_two_earlier_disjoint_views_shares_with_both() -> None:
    # regression: aligning the second view's span down to 16 bytes swallowed the first view's
    # bytes, and the third view then went to that span alone, splitting aliasing
    raw = torch.tensor([172, 47, 9], dtype=torch.uint8)
    first, second, both = raw[0], raw[1], raw[0:2]
    result = tensorsnap.snapshot([first, second, both])
    result[2][0] = 1
    result[2][1] = 2
    assert (result[0].item(), result[1].item()) == (1, 2)
    assert raw.tolist() == [172, 47, 9]


# -- CUDA (skipped on CPU-only machines) ----------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_cuda_to_cpu_keeps_values_layouts_and_aliasing() -> None:
    base = torch.randn(64, 32, device="cuda")
    image = torch.randn(2, 3, 4, 5, device="cuda").contiguous(memory_format=torch.channels_last)
    source = {"base": base, "t": base.t(), "rows": base[3:9], "image": image}
    result = tensorsnap.snapshot(source, device="cpu")
    for key, src in source.items():
        assert result[key].device.type == "cpu", key
        assert result[key].stride() == src.stride(), key
        assert torch.equal(result[key], src.cpu()), key
    ptr = result["base"].untyped_storage().data_ptr()
    assert result["t"].untyped_storage().data_ptr() == ptr
    assert result["rows"].untyped_storage().data_ptr() == ptr


@needs_cuda
def test_pin_memory_gives_pinned_cpu_copies() -> None:
    x = torch.randn(1000, device="cuda")
    result = tensorsnap.snapshot([x, x[10:20]], device="cpu", pin_memory=True)
    assert result[0].is_pinned() and result[1].is_pinned()
    assert torch.equal(result[0], x.cpu()) and torch.equal(result[1], x[10:20].cpu())


@needs_cuda
def test_large_dense_cuda_tensor_is_staged_with_its_layout() -> None:
    # 48 MiB, dense but not contiguous: more than one staging chunk
    x = torch.randn(3, 4096, 1024, device="cuda").transpose(0, 1)
    result = tensorsnap.snapshot(x, device="cpu")
    assert result.stride() == x.stride() and torch.equal(result, x.cpu())
    half = tensorsnap.snapshot(x, device="cpu", dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half, x.half().cpu())


class _Registry(type):
    """A metaclass that makes up class attributes: it answers for classes, not instances."""

    def __getattr__(cls, name: str) -> Any:
        if name == "__setstate__":
            return lambda *args: None
        raise AttributeError(name)


class _Registered(metaclass=_Registry):
    def __init__(self) -> None:
        self.t = torch.ones(2)


class _Forwarding:
    """An object whose own __getattr__ supplies __setstate__ (deepcopy then calls it)."""

    def __init__(self) -> None:
        self.__dict__["t"] = torch.ones(2)

    def __getattr__(self, name: str) -> Any:
        if name == "__setstate__":
            return lambda state: self.__dict__.update(state, restored=True)
        raise AttributeError(name)


@pytest.mark.parametrize("cls", [_Registered, _Forwarding])
def test_setstate_is_found_where_deepcopy_finds_it(cls: type) -> None:
    obj = cls()
    want = copy.deepcopy(obj).__dict__
    got = tensorsnap.snapshot(obj).__dict__
    assert sorted(got) == sorted(want)
    assert torch.equal(got["t"], want["t"]) and got.get("restored") == want.get("restored")


def test_setstate_added_to_a_class_after_a_first_copy_is_then_called() -> None:
    class Later:
        def __init__(self) -> None:
            self.t = torch.ones(2)

    tensorsnap.snapshot(Later())  # the class is seen once without __setstate__

    def setstate(self: Any, state: dict[str, Any]) -> None:
        self.__dict__.update(state, restored=True)

    Later.__setstate__ = setstate  # type: ignore[attr-defined]
    assert tensorsnap.snapshot(Later()).restored is True
    assert copy.deepcopy(Later()).restored is True
