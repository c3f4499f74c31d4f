"""lminf::decode_linear against a float64 matmul, its argument checks, and DecodeLinears: which
layers it routes, for which inputs, and that nothing of it outlives its context."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lm_infinite import ops
from lm_infinite.decode_linears import MAX_ROWS, DecodeLinears

# One rounding to the output dtype on top of float32 sums.
ROUNDING = {torch.float32: 2e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}


def reference(x, weight, bias):
    out = x.double() @ weight.double().t()
    return out if bias is None else out + bias.double()


def assert_close_to_reference(out, x, weight, bias):
    want = reference(x, weight, bias)
    # Summation error scales with sum |x_k w_k|, the final rounding with |want|.
    magnitude = x.double().abs() @ weight.double().abs().t()
    allowed = 1e-6 * magnitude + 1.01 * ROUNDING[out.dtype] * want.abs() + 1e-30
    assert out.dtype == x.dtype and out.shape == want.shape
    assert bool(((out.double() - want).abs() <= allowed).all()), (out.double() - want).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,in_features,out_features", [
    ((1,), 576, 1536), ((3,), 577, 7), ((2, 3), 15, 9), ((9,), 48, 64), ((1, 1, 5), 100, 33),
    ((17,), 200, 40)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float64(dtype, shape, in_features, out_features, with_bias):
    generator = torch.Generator().manual_seed(in_features + out_features)
    x = torch.randn(*shape, in_features, generator=generator).to(dtype)
    weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
    bias = torch.randn(out_features, generator=generator).to(dtype) if with_bias else None
    assert_close_to_reference(ops.decode_linear(x, weight, bias), x, weight, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_gets_the_same_bits_whatever_rows_share_the_call(dtype):
    # A batched decode step must give each sequence what it gets alone: every pass of rows
    # sums a row in one order (a change of rows per pass, or of partial sums by row count, fails).
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(17, 587, generator=generator).to(dtype)
    weight = torch.randn(301, 587, generator=generator).to(dtype)
    bias = torch.randn(301, generator=generator).to(dtype)
    together = ops.decode_linear(x, weight, bias)
    for rows in (1, 2, 3, 5, 8):
        for start in range(0, 17 - rows + 1, 4):
            assert torch.equal(ops.decode_linear(x[start:start + rows], weight, bias), together[start:start + rows])


def test_strided_inputs():
    """Rows spaced further apart than their length (slices of wider tensors), read in place."""
    x = torch.randn(4, 80)[:, 3:67]
    weight = torch.randn(40, 70)[:, 1:65]
    assert_close_to_reference(ops.decode_linear(x, weight), x, weight, None)
    assert_close_to_reference(ops.decode_linear(x.t().contiguous().t(), weight), x, weight, None)


def test_expanded_inputs_are_read_as_the_rows_they_stand_for():
    x = torch.randn(1, 24).expand(3, 24)
    weight = torch.randn(1, 24).expand(5, 24)
    assert_close_to_reference(ops.decode_linear(x, weight), x, weight, None)


def test_no_rows_gives_an_empty_result():
    out = ops.decode_linear(torch.randn(0, 8), torch.randn(3, 8))
    assert out.shape == (0, 3)


@pytest.mark.parametrize("args,message", [
    ((torch.randn(2, 8), torch.randn(3, 8, dtype=torch.bfloat16)), "x must have the dtype of weight"),
    ((torch.randn(2, 8), torch.randn(24)), r"weight must be 2-D \[out_features, in_features\], got shape \[24\]"),
    ((torch.randn(2, 7), torch.randn(3, 8)), r"x.size\(-1\) must equal weight.size\(1\), in_features \(8\)"),
    ((torch.randn(2, 8), torch.randn(3, 8), torch.randn(4)), r"bias must be 1-D \[out_features\] = \[3\]"),
    ((torch.randn(2, 8), torch.randn(3, 8), torch.randn(3, dtype=torch.float16)), "bias must have the dtype"),
    ((torch.ones(2, 8, dtype=torch.int32), torch.ones(3, 8, dtype=torch.int32)),
     "weight must be float32, bfloat16 or float16, got Int"),
    ((torch.randn(2, 0), torch.randn(3, 0)), r"in_features must be in \[1, 2\^62\], got 0"),
])
def test_bad_arguments_name_the_argument(args, message):
    with pytest.raises(RuntimeError, match=message):
        ops.decode_linear(*args)


def test_not_a_tensor_is_a_type_error():
    with pytest.raises(TypeError, match="decode_linear: weight must be a torch.Tensor"):
        ops.decode_linear(torch.randn(2, 8), [[1.0] * 8])


def test_gradients_are_refused_with_a_reason():
    weight = torch.randn(3, 8, requires_grad=True)
    out = ops.decode_linear(torch.randn(1, 8), weight)
    with pytest.raises(RuntimeError, match="lminf::decode_linear has no backward"):
        out.sum().backward()


class Model(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.up = nn.Linear(16, 40, dtype=dtype)
        self.down = nn.Linear(40, 16, bias=False, dtype=dtype)

    def forward(self, x):
        return self.down(F.silu(self.up(x)))


class OwnLinear(nn.Linear):
    pass


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routes_few_rows_through_the_kernel_and_the_rest_to_pytorch(dtype):
    model = Model().to(dtype)
    few, many = torch.randn(MAX_ROWS[dtype], 16, dtype=dtype), torch.randn(MAX_ROWS[dtype] + 1, 16, dtype=dtype)
    with DecodeLinears([model]):
        routed_few, routed_many = model.up(few), model.up(many)
    assert torch.equal(routed_few, ops.decode_linear(few, model.up.weight, model.up.bias))
    assert torch.equal(routed_many, F.linear(many, model.up.weight, model.up.bias))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(routed_few, F.linear(few, model.up.weight, model.up.bias), rtol=tolerance, atol=tolerance)


def test_a_forward_with_gradients_keeps_pytorch():
    model = Model()
    x = torch.randn(1, 16)
    with DecodeLinears([model]):
        out = model(x)
    out.sum().backward()  # PyTorch's linears: differentiable
    assert model.up.weight.grad is not None


@torch.no_grad()
def test_other_dtypes_layers_and_inputs_keep_pytorch():
    layer = OwnLinear(8, 4)
    model = nn.Sequential(layer, nn.Linear(4, 4))
    assert len(DecodeLinears([model])) == 1  # a subclass has a forward of its own
    plain = model[1]
    x = torch.randn(1, 4, dtype=torch.float64)  # not the weight's dtype
    with DecodeLinears([model]):
        assert torch.equal(plain(x.float()), ops.decode_linear(x.float(), plain.weight, plain.bias))
        with pytest.raises(RuntimeError):  # F.linear's own dtype error, as without the context
            plain(x)
        assert "forward" not in layer.__dict__


def test_a_layer_with_a_forward_of_its_own_is_left_alone():
    """A tensor-parallel plan (or any wrapper) may set a layer's forward on the instance:
    DecodeLinears neither replaces it nor removes it on exit."""
    layer = nn.Linear(8, 4)
    own = layer.forward = lambda x: torch.zeros(1)
    with DecodeLinears([layer]) as routed:
        assert len(routed) == 0 and layer.forward is own
    assert layer.forward is own


def test_contexts_nest_and_the_last_one_out_restores_the_layers():
    model = Model(torch.bfloat16)
    outer = DecodeLinears([model])
    with outer:
        inner = DecodeLinears([model.up])  # built while outer routes the layer: routes it too
        assert len(inner) == 1
        with inner:
            assert "forward" in model.up.__dict__
        assert "forward" in model.up.__dict__ and "forward" in model.down.__dict__
    assert "forward" not in model.up.__dict__ and "forward" not in model.down.__dict__


@torch.no_grad()
def test_compiles_without_graph_break():
    model = Model()
    x = torch.randn(2, 16)
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    with DecodeLinears([model]):
        got = compiled(x)
        want = ops.decode_linear(F.silu(ops.decode_linear(x, model.up.weight, model.up.bias)),
                                 model.down.weight)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
