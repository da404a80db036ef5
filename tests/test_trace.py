"""``bnctl trace`` on training scripts, each with one real BatchNorm bug and a clean twin that
does it right: every bug found with its code and layer, nothing on the twins. The scripts are
plain PyTorch training loops, run unmodified."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

import bnctl

PRELUDE = """
import sys
import torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4), nn.BatchNorm1d(4))
opt = torch.optim.SGD(model.parameters(), lr=0.01)

def step(x):
    loss = model(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
"""

SCRIPTS = {
    # evaluation inside no_grad without model.eval(): the validation batches leak into the statistics
    "eval_without_eval": (
        """
for epoch in range(2):
    model.train()
    for _ in range(3):
        step(torch.randn(4, 3, 8, 8))
    with torch.no_grad():
        model(torch.randn(4, 3, 8, 8))
""",
        """
for epoch in range(2):
    model.train()
    for _ in range(3):
        step(torch.randn(4, 3, 8, 8))
    model.eval()
    with torch.no_grad():
        model(torch.randn(4, 3, 8, 8))
""",
        {("BN501", "1"), ("BN501", "5")},
    ),
    # "frozen" by requires_grad, but model.train() keeps the BN's statistics moving
    "frozen_by_requires_grad": (
        """
for p in model[1].parameters():
    p.requires_grad = False
model.train()
for _ in range(3):
    step(torch.randn(4, 3, 8, 8))
""",
        """
for p in model[1].parameters():
    p.requires_grad = False
model.train()
model[1].eval()
for _ in range(3):
    step(torch.randn(4, 3, 8, 8))
""",
        {("BN502", "1")},
    ),
    # a BN whose parameters no optimizer updates, trained in train mode all the same
    "not_in_the_optimizer": (
        """
opt = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("5.")], lr=0.01)
model.train()
for _ in range(3):
    step(torch.randn(4, 3, 8, 8))
""",
        """
opt = torch.optim.SGD(model.parameters(), lr=0.01)
model.train()
for _ in range(3):
    step(torch.randn(4, 3, 8, 8))
""",
        {("BN502", "5")},
    ),
    # the last batch of a dataset of 9 in batches of 4 holds one sample: BatchNorm1d sees 1 value
    "last_batch_of_one": (
        """
data = torch.randn(9, 3, 8, 8)
model.train()
loader = torch.utils.data.DataLoader(data, batch_size=4)
for x in loader:
    step(x)
""",
        """
data = torch.randn(9, 3, 8, 8)
model.train()
loader = torch.utils.data.DataLoader(data, batch_size=4, drop_last=True)
for x in loader:
    step(x)
""",
        {("BN503", "5")},
    ),
    # a NaN batch at step 3 poisons the running statistics
    "nan_into_statistics": (
        """
model.train()
for i in range(5):
    x = torch.randn(4, 3, 8, 8)
    if i == 2:
        x[0, 0, 0, 0] = float("nan")
    step(x)
""",
        """
model.train()
for i in range(5):
    x = torch.randn(4, 3, 8, 8)
    if i == 2:
        x[0, 0, 0, 0] = float("nan")
    if torch.isfinite(x).all():
        step(x)
""",
        {("BN504", "1"), ("BN504", "5")},
    ),
    # traced for deployment straight after training, still in train mode
    "export_in_train_mode": (
        """
model.train()
step(torch.randn(4, 3, 8, 8))
torch.jit.trace(model, torch.randn(4, 3, 8, 8), check_trace=False)
""",
        """
model.train()
step(torch.randn(4, 3, 8, 8))
model.eval()
torch.jit.trace(model, torch.randn(4, 3, 8, 8), check_trace=False)
""",
        {("BN505", "1")},
    ),
    # SWA: update_bn re-estimates the statistics in train mode under no_grad, on purpose
    "swa_update_bn": (
        """
from torch.optim.swa_utils import AveragedModel, update_bn
swa = AveragedModel(model)
model.train()
for _ in range(3):
    step(torch.randn(4, 3, 8, 8))
    swa.update_parameters(model)
with torch.no_grad():
    swa.module(torch.randn(4, 3, 8, 8))   # and then an evaluation without eval()
""",
        """
from torch.optim.swa_utils import AveragedModel, update_bn
swa = AveragedModel(model)
model.train()
for _ in range(3):
    step(torch.randn(4, 3, 8, 8))
    swa.update_parameters(model)
update_bn([torch.randn(4, 3, 8, 8) for _ in range(3)], swa)
swa.eval()
with torch.no_grad():
    swa(torch.randn(4, 3, 8, 8))
""",
        {("BN501", "1"), ("BN501", "5")},
    ),
}


def _script(tmp_path, name, body):
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(PRELUDE) + textwrap.dedent(body) + "\nprint('trained', sys.argv[1:])\n")
    return path


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_bug_is_found_and_its_clean_twin_is_silent(cli, tmp_path, name):
    buggy, clean, expected = SCRIPTS[name]
    result = cli("trace", "-f", "json", _script(tmp_path, name, buggy), "--epochs", "1")
    doc = json.loads(result.stdout[result.stdout.index("{") :])
    found = {(f["check"], f["layer"]) for f in doc["findings"]}
    assert found == expected, (found, doc["findings"])
    script_failed = name == "last_batch_of_one"  # BatchNorm1d raises on one value per channel
    assert result.exit_code == (1 if script_failed else (1 if any(c in ("BN501", "BN504", "BN505") for c, _ in expected) else 0)), result.output
    twin = cli("trace", "-f", "json", _script(tmp_path, f"{name}_clean", clean))
    assert twin.exit_code == 0, twin.output
    assert json.loads(twin.stdout[twin.stdout.index("{") :])["findings"] == []
    assert "trained []" in twin.stdout


def test_the_script_runs_as_python_runs_it(cli, tmp_path):
    path = tmp_path / "argv.py"
    path.write_text("import sys, os\nprint(__name__, sys.argv, os.path.basename(sys.path[0]))\nraise SystemExit(3)\n")
    result = cli("trace", path, "--lr", "0.1", "-x")
    assert f"__main__ ['{path}', '--lr', '0.1', '-x'] {tmp_path.name}" in result.stdout
    assert result.exit_code == 3  # the script's own exit code, and the report still written
    assert "Found 0 findings" in result.stdout


def test_trace_needs_a_script(cli, tmp_path):
    for argv in ((tmp_path / "missing.py",), ("-m", "no.such.module")):
        result = cli("trace", *argv)
        assert result.exit_code == 2 and result.stderr.startswith("error: ") and "tip: " in result.stderr, result.output


def test_the_library_watch_reports_on_a_model():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    with bnctl.watch(model) as w:
        model.train()
        with torch.no_grad():
            model(torch.randn(5, 3))
    assert [(e.code, e.layer, e.step) for e in w.events] == [("BN501", "1", 1)]
    assert w.report().startswith("1: BN501 train-mode forward") and w.to_dict()["events"][0]["code"] == "BN501"
    assert w.events[0].where.endswith("test_trace.py:" + str(w.events[0].where.rsplit(":", 1)[1]))
    # nothing stays installed afterwards
    with torch.no_grad():
        model(torch.randn(5, 3))
    assert len(w.events) == 1


DDP_SCRIPT = """
import sys
import torch
import torch.distributed as dist
from torch import nn

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 2))
ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers="--broadcast" in sys.argv)
opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
batch = int(sys.argv[1])
torch.manual_seed(1 + rank)
for _ in range(3):
    loss = ddp(torch.randn(batch, 3, 8, 8) + rank).square().mean()  # each rank its own data
    opt.zero_grad()
    loss.backward()
    opt.step()
dist.destroy_process_group()
"""


@pytest.mark.parametrize(
    "args, expected, code",
    [
        (["4"], {("BN506", "[rank 0]"), ("BN506", "[rank 1]"), ("BN507", "[rank 0]")}, 1),  # broadcast_buffers=False, 4 per rank
        (["16", "--broadcast"], set(), 0),  # the clean twin: buffers synced, 16 per rank
    ],
)
def test_under_torchrun_rank_0_reports_every_rank_and_their_disagreement(tmp_path, args, expected, code):
    import subprocess
    import sys

    script = tmp_path / "train_ddp.py"
    script.write_text(DDP_SCRIPT)
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "bnctl", "trace", "-f", "json", "-o", report, script, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert (proc.returncode != 0) == bool(code), proc.stderr[-3000:]
    doc = json.loads(report.read_text())
    found = {(f["check"], f["file"][f["file"].index("[") :]) for f in doc["findings"]}
    assert found == expected, doc["findings"]
    assert {f["file"] for f in doc["files"]} == {f"{script}[rank 0]", f"{script}[rank 1]"}


def test_watching_reads_nothing_back_from_the_device_while_the_loop_runs(monkeypatch):
    # what would synchronise with a GPU each step: reading a tensor's value on the host.
    # Recorded from bnctl's watch while the loop runs; the one read is at the end (finish).
    import sys as _sys

    reads = []
    for name in ("item", "__bool__", "__int__", "__float__", "tolist", "numpy", "cpu"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            if "bnctl/ops/watch.py" in _sys._getframe(1).f_code.co_filename:
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with bnctl.watch() as w:
        for _ in range(5):
            loss = model(torch.randn(4, 3, 8, 8)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        during = list(reads)
    assert during == [] and w.layers  # read only by finish(), after the loop


def test_verbose_lists_each_layer_the_grouped_line_points_to(cli, tmp_path):
    """A check firing on more than 3 layers is one text line that says ``--verbose lists each``;
    ``bnctl trace --verbose`` does list each (trace had no --verbose while its report said so)."""
    path = tmp_path / "five.py"
    path.write_text("import torch\nfrom torch import nn\nmodel = nn.Sequential(*[nn.BatchNorm1d(4) for _ in range(5)])\nwith torch.no_grad():\n    model(torch.randn(8, 4))\n")
    grouped = cli("trace", path)
    assert grouped.exit_code == 1 and "--verbose lists each" in grouped.stdout
    each = cli("trace", "--verbose", path)
    assert each.exit_code == 1 and "--verbose lists each" not in each.stdout
    assert sum("BN501" in line for line in each.stdout.splitlines() if "layers:" not in line) >= 5
