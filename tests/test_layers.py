"""Finding BN layers in module trees, TorchScript, torch.export programs and ONNX graphs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnctl.core import layers, modules


class FrozenBatchNorm2d(nn.Module):
    """Like torchvision's: statistics and affine parameters as buffers."""

    def __init__(self, n):
        super().__init__()
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((n,), value))
        self.eps = 1e-3

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return x * scale[:, None, None] + (self.bias - self.running_mean * scale)[:, None, None]


def zoo():
    return nn.Sequential(
        nn.BatchNorm1d(3, momentum=None),
        nn.BatchNorm2d(4, eps=1e-3, affine=False),
        nn.BatchNorm3d(5, momentum=0.0),
        nn.SyncBatchNorm(6),
        FrozenBatchNorm2d(7),
        nn.InstanceNorm2d(8, track_running_stats=True),  # not a BatchNorm
        nn.LayerNorm(9),
        nn.GroupNorm(2, 10),
    )


def test_module_tree_kinds_and_attributes():
    found = {l.name: l for l in modules.from_module(zoo().eval())}
    assert {n: l.kind for n, l in found.items()} == {
        "0": "BatchNorm1d",
        "1": "BatchNorm2d",
        "2": "BatchNorm3d",
        "3": "SyncBatchNorm",
        "4": "FrozenBatchNorm2d",
    }
    assert found["0"].averaging == "cumulative" and found["0"].momentum is None
    assert found["2"].momentum == 0.0 and found["2"].averaging == "ema"
    assert found["1"].eps == 1e-3 and found["1"].weight is None
    assert found["4"].eps == 1e-3 and found["4"].momentum is None and found["4"].averaging is None
    assert all(l.training is False for l in found.values())


def test_lazy_batchnorm_before_and_after_materialization():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d())
    (before,) = modules.from_module(model)
    assert not before.materialized and before.num_features == 0
    model(torch.randn(2, 3, 4, 4))
    (after,) = modules.from_module(model)
    assert after.materialized and after.num_features == 4 and after.kind == "BatchNorm2d"


def test_torchscript_keeps_attributes_and_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, eps=1e-4, momentum=0.3)).train()
    scripted = torch.jit.script(model)
    (layer,) = modules.from_module(scripted)
    assert (layer.kind, layer.eps, layer.momentum, layer.training) == ("BatchNorm2d", 1e-4, 0.3, True)


@pytest.mark.parametrize("train", [False, True])
def test_export_program(train):
    model = nn.Sequential(nn.Conv1d(2, 3, 1), nn.BatchNorm1d(3, eps=1e-4, momentum=0.2))
    model.train(train)
    program = torch.export.export(model, (torch.randn(4, 2, 5),))
    (layer,) = modules.from_program(program)
    assert (layer.name, layer.kind, layer.eps, layer.momentum, layer.training) == ("1", "BatchNorm1d", 1e-4, 0.2, train)
    torch.testing.assert_close(layer.running_var, model[1].running_var)


def test_export_program_counts_a_layer_called_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            return self.bn(self.bn(x))

    program = torch.export.export(Twice().eval(), (torch.randn(2, 3),))
    (layer,) = modules.from_program(program)
    assert layer.uses == 2


def _onnx_bn(training_mode: int | None, outputs: int = 1):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    c = 3
    inits = [numpy_helper.from_array(np.full(c, v, np.float32), name) for name, v in (("bn.weight", 2.0), ("bn.bias", 0.5), ("bn.running_mean", 0.1), ("bn.running_var", 4.0))]
    attrs = {"epsilon": 1e-3, "momentum": 0.8}
    if training_mode is not None:
        attrs["training_mode"] = training_mode
    outs = ["y", "m", "v"][:outputs]
    node = helper.make_node("BatchNormalization", ["x", *[i.name for i in inits]], outs, name="bn_node", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 2, 2])], [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def test_onnx_attributes_and_training_mode():
    (layer,) = layers.from_onnx(_onnx_bn(None))
    assert (layer.name, layer.eps, layer.training) == ("bn", pytest.approx(1e-3), False)
    assert layer.momentum == pytest.approx(0.2)  # ONNX 0.8 = weight of the running value
    torch.testing.assert_close(torch.as_tensor(layer.running_var), torch.full((3,), 4.0))
    assert layers.from_onnx(_onnx_bn(1))[0].training is True
    assert layers.from_onnx(_onnx_bn(1, outputs=3))[0].training is True


def test_state_dict_grouping_ignores_non_bn_tensors():
    state = {
        "conv.weight": torch.zeros(4, 3, 1, 1),
        "ln.weight": torch.ones(4),
        "ln.bias": torch.zeros(4),
        "bn.weight": torch.ones(4),
        "bn.bias": torch.zeros(4),
        "bn.running_mean": torch.zeros(4),
        "bn.running_var": torch.ones(4),
        "bn.num_batches_tracked": torch.tensor(7),
    }
    (layer,) = layers.from_state_dict(state)
    assert (layer.name, layer.kind, layer.eps, layer.num_batches_tracked) == ("bn", None, None, 7)


def test_a_module_tree_deeper_than_the_python_stack_is_read_and_copied(tmp_path):
    # bnctl's own walks of module trees use stacks: read a 300-deep TorchScript nesting, and
    # copy a 300-deep module, under a recursion limit that a walk recursing per level runs past
    import subprocess
    import sys

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 20000))
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    for _ in range(300):
        model = nn.Sequential(model)
    path = tmp_path / "deep.torchscript.pt"
    torch.jit.save(torch.jit.script(model.eval()), path)
    code = (
        "import sys\n"
        "import bnctl, bnctl.ops.inspect, bnctl.core.graph, torch\n"
        "from torch import nn\n"
        f"result = bnctl.inspect({str(path)!r})\n"
        "sys.setrecursionlimit(250)\n"
        f"result = bnctl.inspect({str(path)!r})\n"
        "assert len(result.rows) == 1, result.rows\n"
        "model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))\n"
        "for _ in range(300):\n"
        "    model = nn.Sequential(model)\n"
        "copy = bnctl.core.graph.shallow_copy(model)\n"
        "inner = copy\n"
        "for _ in range(300):\n"
        "    inner = inner[0]\n"
        "assert inner[1] is not None and inner[1].weight is model.get_submodule('.'.join(['0'] * 300) + '.1').weight\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
