"""ParameterLayout: flat order, split/flatten round trips, blocks and their shape errors."""

import pytest
import torch

from hutch import ParameterLayout, ParameterSlot


@pytest.fixture
def layout():
    # P = 6 + 2 + 1 = 9; "scale" is a 0-dim parameter.
    return ParameterLayout([("weight", (2, 3)), ("bias", (2,)), ("scale", ())])


def test_slots_offsets_and_sizes(layout):
    assert layout.num_params == 9
    assert layout.names == ["weight", "bias", "scale"]
    assert len(layout) == 3
    assert "bias" in layout
    assert "missing" not in layout
    assert layout.slot("weight") == ParameterSlot("weight", torch.Size([2, 3]), 0, 6)
    assert layout.slot("bias").offset == 6
    assert layout.slot("bias").stop == 8
    assert layout.slot("scale").numel == 1
    assert [s.name for s in layout] == layout.names
    assert "num_params=9" in repr(layout)


def test_split_is_row_major_view(layout):
    flat = torch.arange(9.0)
    parts = layout.split(flat)
    torch.testing.assert_close(parts["weight"], torch.tensor([[0.0, 1, 2], [3, 4, 5]]))
    torch.testing.assert_close(parts["bias"], torch.tensor([6.0, 7.0]))
    assert parts["scale"].shape == ()
    assert parts["scale"].item() == 8.0

    # Views share storage with the flat vector.
    parts["bias"][0] = -1.0
    assert flat[6] == -1.0


def test_split_flatten_round_trip_batched(layout):
    flat = torch.randn(4, 9, generator=torch.Generator().manual_seed(0))
    parts = layout.split(flat)
    assert parts["weight"].shape == (4, 2, 3)
    assert parts["scale"].shape == (4,)
    torch.testing.assert_close(layout.flatten(parts, batch_dims=1), flat)
    torch.testing.assert_close(layout.flatten(layout.split(flat[0])), flat[0])


def test_flatten_ignores_mapping_order(layout):
    tensors = {"scale": torch.tensor(9.0), "bias": torch.ones(2), "weight": torch.zeros(2, 3)}
    flat = layout.flatten(tensors)
    torch.testing.assert_close(flat, torch.tensor([0.0] * 6 + [1.0, 1.0, 9.0]))


def test_block_matches_nested_shapes(layout):
    H = torch.arange(81.0).reshape(9, 9)
    assert layout.block(H, "weight", "weight").shape == (2, 3, 2, 3)
    assert layout.block(H, "weight", "bias").shape == (2, 3, 2)
    assert layout.block(H, "bias", "scale").shape == (2,)
    # Entry [i, j, k] of the (weight, bias) block is H[3 i + j, 6 + k].
    assert layout.block(H, "weight", "bias")[1, 2, 0] == H[5, 6]
    assert layout.block(H, "scale", "weight")[1, 0] == H[8, 3]


def test_nested_round_trip(layout):
    H = torch.randn(9, 9, generator=torch.Generator().manual_seed(1))
    nested = layout.to_nested(H)
    assert set(nested) == set(layout.names)
    assert all(set(row) == set(layout.names) for row in nested.values())
    torch.testing.assert_close(nested["bias"]["weight"], layout.block(H, "bias", "weight"))
    torch.testing.assert_close(layout.from_nested(nested), H)


def test_unknown_name_raises(layout):
    with pytest.raises(KeyError, match=r"parameter name 'gamma' is not in this layout.*'weight', 'bias', 'scale'"):
        layout.slot("gamma")
    with pytest.raises(KeyError, match="'gamma' is not in this layout"):
        layout.block(torch.zeros(9, 9), "weight", "gamma")


def test_duplicate_name_raises():
    with pytest.raises(ValueError, match="parameter name 'a' appears more than once"):
        ParameterLayout([("a", (2,)), ("a", (3,))])


def test_split_rejects_non_tensor(layout):
    with pytest.raises(TypeError, match="flat must be a torch.Tensor; got list"):
        layout.split([0.0] * 9)


@pytest.mark.parametrize("shape", [(8,), (2, 10), (9, 9, 1), ()])
def test_split_rejects_wrong_shape(layout, shape):
    with pytest.raises(ValueError, match=r"flat has shape .*; expected \(9,\) or \(k, 9\)"):
        layout.split(torch.zeros(shape))


def test_flatten_rejects_missing_parameter(layout):
    with pytest.raises(KeyError, match=r"tensors is missing parameters \['scale'\]"):
        layout.flatten({"weight": torch.zeros(2, 3), "bias": torch.zeros(2)})


def test_flatten_rejects_wrong_shape(layout):
    tensors = {"weight": torch.zeros(3, 2), "bias": torch.zeros(2), "scale": torch.tensor(0.0)}
    with pytest.raises(ValueError, match=r"parameter 'weight' has shape \(3, 2\); expected \(2, 3\)"):
        layout.flatten(tensors)

    batched = {"weight": torch.zeros(4, 2, 3), "bias": torch.zeros(4, 3), "scale": torch.zeros(4)}
    with pytest.raises(ValueError, match=r"parameter 'bias' has shape \(4, 3\); expected \(4, 2\)"):
        layout.flatten(batched, batch_dims=1)


def test_block_rejects_wrong_matrix_shape(layout):
    with pytest.raises(ValueError, match=r"matrix has shape \(8, 9\); expected \(9, 9\)"):
        layout.block(torch.zeros(8, 9), "weight", "bias")
    with pytest.raises(ValueError, match=r"matrix has shape \(81,\); expected \(9, 9\)"):
        layout.to_nested(torch.zeros(81))


def test_from_nested_rejects_wrong_block_shape(layout):
    nested = layout.to_nested(torch.zeros(9, 9))
    nested["weight"]["bias"] = torch.zeros(6, 2)
    with pytest.raises(ValueError, match=r"block \('weight', 'bias'\) has shape \(6, 2\); expected \(2, 3, 2\)"):
        layout.from_nested(nested)
