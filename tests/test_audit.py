"""bnctl audit: the registry, each check on a model built to have its bug (and silent on a
healthy one), the broken samples, the output formats, configuration and exit codes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import pytest
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from bnctl.core.registry import CHECKS, GROUPS, SEVERITIES
from bnctl.audit.runner import AuditConfig, audit
from bnctl.io.source import CheckInputs, ModelSource
from bnctl.models import sample_net

import buggy_models
from conftest import BROKEN, CHECKPOINTS, ROOT

MODELS = ROOT / "tests" / "buggy_models.py"
SAMPLE_ARCH = ("--arch", "bnctl.models:sample_net")
SHAPE = ("--input-shape", "2,3,32,32")


def codes_by_layer(result) -> set[tuple[str | None, str]]:
    return {(f.layer, f.code) for f in result.findings}


def codes(result) -> set[str]:
    return {f.code for f in result.findings}


def trained_bn(model: nn.Module) -> nn.Module:
    """Statistics and affine parameters as training leaves them (not the initial values)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
    return model


def save_script(model: nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(model), str(path))
    return path


# --- the registry ---------------------------------------------------------------------------


def test_every_check_is_documented_and_codes_and_names_are_unique():
    names = [c.name for c in CHECKS.values()]
    assert len(set(names)) == len(names)
    for code, check in CHECKS.items():
        assert code == check.code and re.fullmatch(r"BN[1-5]\d\d", code)
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)+", check.name), check.name
        assert check.severity in SEVERITIES and check.group in GROUPS
        assert GROUPS.index(check.group) + 1 == int(code[2]), "the code's first digit is its group"
        for text in (check.summary, check.why, check.example, check.fix):
            assert len(text) > 15, f"{code} is not documented"


def test_list_and_explain(cli):
    listed = cli("audit", "--list")
    assert listed.exit_code == 0
    assert all(code in listed.stdout for code in CHECKS)
    explained = cli("audit", "--explain", "never-updated-statistics")
    assert explained.exit_code == 0 and "BN104" in explained.stdout and "Fix:" in explained.stdout
    unknown = cli("audit", "--explain", "BN999")
    assert unknown.exit_code == 2 and unknown.stderr.startswith("error: no check 'BN999'")


# --- the broken samples and the healthy one ---------------------------------------------------


def test_broken_samples_give_the_right_findings():
    result = audit([BROKEN])
    found = codes_by_layer(result)
    assert ("layers.2.bn2", "BN101") in found
    assert {("layers.1.bn1", "BN104"), ("head.2", "BN104")} <= found
    assert sum(f.code == "BN201" and "train_mode" in f.file for f in result.findings) == 10
    assert sum(f.code == "BN203" and "no_running_stats" in f.file for f in result.findings) == 10
    assert result.exit_code() == 1


def test_converted_checkpoint_with_a_zero_counter_is_not_never_updated():
    result = audit([CHECKPOINTS / "converted_zero_counter.pt"])
    assert result.findings == [] and result.layers == 10


def test_healthy_sample_is_silent_through_every_group(cli):
    result = cli("audit", CHECKPOINTS / "sample.pt", *SAMPLE_ARCH, *SHAPE, "--format", "json")
    assert result.exit_code == 0, result.stdout
    report = json.loads(result.stdout)
    assert report["findings"] == [] and report["summary"] == {"error": 0, "warning": 0, "info": 0}
    assert report["files"][0]["checks"] == ["statistics", "configuration", "behaviour"]


# --- each check fires on its bug ---------------------------------------------------------------


def test_statistics_checks_fire_on_built_state_dicts(tmp_path):
    model = trained_bn(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)))
    state = model.state_dict()
    state["1.running_var"][0] = -0.5  # BN102
    state["1.running_var"][1] = 1e-8  # BN103 (below eps)
    state["3.running_var"][2] = 1e6  # BN105 (beyond float16)
    state["3.weight"][3] = 0.0  # BN106
    torch.save(state, tmp_path / "stats.pt")
    found = codes_by_layer(audit([tmp_path / "stats.pt"]))
    assert {("1", "BN102"), ("1", "BN103"), ("3", "BN105"), ("3", "BN106")} <= found
    torch.save(trained_bn(model).state_dict(), tmp_path / "ok.pt")
    assert audit([tmp_path / "ok.pt"]).findings == []


def test_configuration_checks_fire_on_saved_modules(tmp_path):
    net = trained_bn(
        nn.Sequential(
            nn.Conv2d(3, 4, 3, bias=True),
            nn.BatchNorm2d(4),  # BN208: conv bias before BN
            nn.Conv2d(4, 4, 1, bias=False),
            nn.BatchNorm2d(4, momentum=0.0),  # BN204
            nn.Conv2d(4, 4, 1, bias=False),
            nn.BatchNorm2d(4, momentum=None, eps=1e-3),  # BN205, BN209
        )
    )
    net.eval()
    net[1].train()  # BN201 for one layer, BN202 mixed modes
    found = codes_by_layer(audit([save_script(net, tmp_path / "net.ts")]))
    assert {("1", "BN208"), ("3", "BN204"), ("5", "BN205"), ("1", "BN201"), (None, "BN202"), (None, "BN209")} <= found

    frozen = trained_bn(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.SyncBatchNorm(4)))
    for p in frozen[1].parameters():
        p.requires_grad = False  # BN206: frozen parameters, still training
    torch.save(frozen, tmp_path / "frozen.pt")
    found = codes_by_layer(audit([tmp_path / "frozen.pt"], model=ModelSource(trust=True)))
    assert {("1", "BN206"), ("1", "BN207")} <= found

    healthy = trained_bn(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))).eval()
    assert audit([save_script(healthy, tmp_path / "healthy.ts")]).findings == []


def test_behaviour_checks_fire_on_a_bn_kept_training_by_a_train_override(tmp_path):
    torch.save(trained_bn(buggy_models.keeps_bn_training()).state_dict(), tmp_path / "w.pt")
    result = audit([tmp_path / "w.pt"], model=ModelSource(arch=f"{MODELS}:keeps_bn_training"), inputs=CheckInputs(shapes=[(2, 3, 8, 8)]))
    assert result.errors == []
    found = codes_by_layer(result)
    assert (None, "BN302") in found and (None, "BN303") in found
    bn304 = next(f for f in result.findings if f.code == "BN304")
    assert bn304.layer == "bn" and "KeepsBNTraining.train()" in bn304.message
    torch.save(trained_bn(buggy_models.healthy()).state_dict(), tmp_path / "h.pt")
    healthy = audit([tmp_path / "h.pt"], model=ModelSource(arch=f"{MODELS}:healthy"), inputs=CheckInputs(shapes=[(2, 3, 8, 8)]))
    assert healthy.findings == [] and "behaviour" in healthy.files[0].groups


def test_nondeterministic_eval_fires_on_dropout_left_active(tmp_path):
    torch.save(trained_bn(buggy_models.keeps_dropout_active()).state_dict(), tmp_path / "w.pt")
    result = audit([tmp_path / "w.pt"], model=ModelSource(arch=f"{MODELS}:keeps_dropout_active"), inputs=CheckInputs(shapes=[(2, 3, 8, 8)]))
    assert {"BN301", "BN302"} <= codes(result)
    assert "BN304" not in codes(result) and "BN303" not in codes(result)


def test_onnx_checks(tmp_path):
    assert {f.code for f in audit([CHECKPOINTS / "sample.onnx"]).findings} == {"BN402"}
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in (("w", rng.normal(size=(3, 3, 1, 1))), ("s", np.ones(3)), ("b", np.zeros(3)), ("m", np.zeros(3) + 0.1), ("v", np.ones(3) * 2))]
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("BatchNormalization", ["r", "s", "b", "m", "v"], ["y"], training_mode=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4, 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=9), tmp_path / "train.onnx")
    assert codes_by_layer(audit([tmp_path / "train.onnx"])) == {("s", "BN401")} or "BN401" in codes(audit([tmp_path / "train.onnx"]))
    folded = tmp_path / "folded.onnx"
    from bnctl.jobs.fold import fold_file

    fold_file(ModelSource(CHECKPOINTS / "sample.onnx"), folded)
    assert audit([folded]).findings == []


# --- formats ------------------------------------------------------------------------------


def test_sarif_has_what_github_code_scanning_requires(cli, tmp_path):
    out = tmp_path / "audit.sarif"
    result = cli("audit", BROKEN, "--format", "sarif", "--output", out)
    assert result.exit_code == 1
    sarif = json.loads(out.read_text())
    assert sarif["version"] == "2.1.0" and sarif["$schema"].endswith("sarif-2.1.0.json")
    (run,) = sarif["runs"]
    driver = run["tool"]["driver"]
    assert driver["name"] == "bnctl" and driver["version"]
    rule_ids = [r["id"] for r in driver["rules"]]
    assert sorted(rule_ids) == sorted(CHECKS)
    for rule in driver["rules"]:
        assert rule["shortDescription"]["text"] and rule["help"]["text"] and rule["defaultConfiguration"]["level"] in ("error", "warning", "note")
    assert len(run["results"]) == len(audit([BROKEN]).findings) > 20
    for res in run["results"]:
        assert res["ruleId"] in rule_ids and rule_ids[res["ruleIndex"]] == res["ruleId"]
        assert res["level"] in ("error", "warning", "note") and res["message"]["text"]
        loc = res["locations"][0]["physicalLocation"]
        assert loc["artifactLocation"]["uri"].startswith("samples/broken/") and loc["region"]["startLine"] >= 1
        assert res["partialFingerprints"]
    assert len({r["partialFingerprints"]["bnctlFinding/v1"] for r in run["results"]}) == len(run["results"])


def test_junit_parses_and_a_clean_run_has_one_passing_case(cli, tmp_path):
    broken = cli("audit", BROKEN, "--format", "junit")
    root = ET.fromstring(broken.stdout)
    errors = sum(f.severity == "error" for f in audit([BROKEN]).findings)
    assert root.tag == "testsuites" and int(root.get("failures")) == errors == 13
    # 23 findings, plus a passing case for the file whose findings are all below --fail-on
    assert len(root.findall(".//failure")) == 13 and len(root.findall(".//testcase")) == 24
    assert len(root.findall("testsuite")) == 4
    clean = ET.fromstring(cli("audit", CHECKPOINTS / "converted_zero_counter.pt", "-f", "junit").stdout)
    cases = clean.findall(".//testcase")
    assert len(cases) == 1 and cases[0].find("failure") is None and clean.get("failures") == "0"


def test_text_output_and_summary_line(cli):
    result = cli("audit", BROKEN / "never_updated.pt")
    assert result.exit_code == 1
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith(f"{BROKEN / 'never_updated.pt'}:layers.1.bn1: BN104 [error] running_mean all 0")
    assert lines[-1] == "Found 2 findings (2 errors, 0 warnings) in 10 BatchNorm layers of 1 file."


# --- selection, configuration and exit codes -------------------------------------------------


def test_fail_on_select_ignore_and_exit_zero(cli):
    target = BROKEN / "no_running_stats.torchscript.pt"  # 10 x BN203 (warning)
    assert cli("audit", target).exit_code == 0
    assert cli("audit", target, "--fail-on", "warning").exit_code == 1
    assert cli("audit", target, "--fail-on", "warning", "--exit-zero").exit_code == 0
    assert cli("audit", target, "--fail-on", "warning", "--ignore", "BN2").exit_code == 0
    selected = cli("audit", BROKEN, "--select", "BN101,never-updated-statistics", "-f", "json")
    assert {f["check"] for f in json.loads(selected.stdout)["findings"]} == {"BN101", "BN104"}


def test_pyproject_settings_with_per_layer_ignores(cli, tmp_path):
    config = tmp_path / "pyproject.toml"
    config.write_text('[tool.bnctl.audit]\nignore = ["BN1"]\nfail-on = "warning"\n[tool.bnctl.audit.per-layer-ignores]\n"layers.*" = ["BN203"]\n')
    result = cli("audit", BROKEN, "--config", config, "-f", "json")
    findings = json.loads(result.stdout)["findings"]
    assert not any(f["check"].startswith("BN1") for f in findings)
    assert {f["layer"] for f in findings if f["check"] == "BN203"} == {"stem.1", "head.2"}
    assert result.exit_code == 1
    config.write_text("[tool.bnctl.audit]\nselct = ['BN1']\n")
    bad = cli("audit", BROKEN, "--config", config)
    assert bad.exit_code == 2 and "unknown [tool.bnctl.audit] keys: selct" in bad.stderr


def test_an_unreadable_file_is_reported_and_the_others_are_still_audited(cli, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    result = cli("audit", garbage, BROKEN / "nan_stats.pt", "-f", "json")
    assert result.exit_code == 2
    report = json.loads(result.stdout)
    assert report["files"][0]["error"] and report["files"][1]["error"] is None
    assert [f["check"] for f in report["findings"]] == ["BN101"]
    assert "could not be read" in result.stderr


def test_bad_input_exits_2(cli, tmp_path):
    assert cli("audit").exit_code == 2
    empty = cli("audit", tmp_path)
    assert empty.exit_code == 2 and "no checkpoint files" in empty.stderr
    bad_shape = cli("audit", CHECKPOINTS / "sample.pt", *SAMPLE_ARCH, "--input-shape", "2,5,32,32")
    assert bad_shape.exit_code == 2 and "rejects inputs" in (bad_shape.stdout + bad_shape.stderr)


def test_library_config_object():
    config = AuditConfig(select=["BN1"], per_layer_ignores={"head.*": ["BN104"]})
    result = audit([BROKEN / "never_updated.pt"], config=config)
    assert codes_by_layer(result) == {("layers.1.bn1", "BN104")}


# --- a gate is never green by accident -------------------------------------------------------


def test_a_selected_check_that_cannot_run_fails_the_gate_in_every_format(cli, tmp_path):
    text = cli("audit", CHECKPOINTS / "sample.pt", "--select", "BN3")
    assert text.exit_code == 2 and "BN301, BN302, BN303, BN304 (behaviour) did not run: needs check inputs" in text.stdout
    doc = json.loads(cli("audit", CHECKPOINTS / "sample.pt", "--select", "BN3", "-f", "json").stdout)
    assert doc["not_run"] == [{"file": str(CHECKPOINTS / "sample.pt"), "group": "behaviour", "checks": ["BN301", "BN302", "BN303", "BN304"], "reason": "needs check inputs: pass --input-shape or --data", "explicit": True}]
    sarif = json.loads(cli("audit", CHECKPOINTS / "sample.pt", "--select", "BN301", "-f", "sarif").stdout)
    invocation = sarif["runs"][0]["invocations"][0]
    assert invocation["executionSuccessful"] is False and invocation["toolExecutionNotifications"][0]["level"] == "error"
    junit = ET.fromstring(cli("audit", CHECKPOINTS / "sample.pt", "--select", "BN301", "-f", "junit").stdout)
    assert junit.get("errors") == "1" and junit.find(".//testcase/error").get("type") == "not-run"
    # with inputs the same selection runs and passes
    assert cli("audit", CHECKPOINTS / "sample.pt", "--arch", "bnctl.models:sample_net", "--input-shape", "2,3,32,32", "--select", "BN3").exit_code == 0


def test_checks_that_could_not_run_are_reported_without_failing_when_not_named(cli):
    doc = json.loads(cli("audit", CHECKPOINTS / "sample.pt", "-f", "json").stdout)
    assert {n["group"] for n in doc["not_run"]} == {"configuration", "behaviour"} and not any(n["explicit"] for n in doc["not_run"])
    assert cli("audit", CHECKPOINTS / "sample.pt").exit_code == 0


@pytest.mark.parametrize("args,near", [(("--select", "dead-channel"), "dead-channels"), (("--ignore", "BN999"), "BN"), (("--select", "BN7"), "BN")])
def test_unknown_selectors_are_errors_with_the_nearest_check(cli, args, near):
    result = cli("audit", CHECKPOINTS / "sample.pt", *args)
    assert result.exit_code == 2 and "is no check code, prefix or name" in result.stderr and f"did you mean {near}" in result.stderr


def test_an_unknown_selector_in_pyproject_is_an_error(cli, tmp_path):
    config = tmp_path / "pyproject.toml"
    config.write_text('[tool.bnctl.audit]\nignore = ["BN15"]\n')
    result = cli("audit", CHECKPOINTS / "sample.pt", "--config", config)
    assert result.exit_code == 2 and "'BN15' is no check code" in result.stderr


def test_bnctl_frozen_batchnorm_in_train_mode_is_no_finding(cli, tmp_path):
    from bnctl.ops.convert import convert

    frozen, _ = convert(sample_net(), "frozen")
    torch.save(frozen.train(), tmp_path / "frozen.pt")
    result = cli("audit", tmp_path / "frozen.pt", "--trust", "-f", "json")
    assert "BN206" not in {f["check"] for f in json.loads(result.stdout)["findings"]}


def _onnx_bn_stats_from(tmp_path, how: str):
    """A Conv + BatchNormalization whose statistics are computed from constants
    (Constant -> Identity -> Cast, as older exporters write them) or are graph inputs."""
    c = 3
    inits = [numpy_helper.from_array(np.random.default_rng(0).random((c, 3, 1, 1)).astype(np.float32), "w")]
    nodes, inputs = [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])]
    for name, value in (("scale", np.ones(c)), ("bias", np.zeros(c)), ("mean", np.full(c, 0.5)), ("var", np.full(c, 2.0))):
        if how == "computed":
            nodes += [
                helper.make_node("Constant", [], [f"{name}_c"], value=numpy_helper.from_array(value.astype(np.float64), f"{name}_t")),
                helper.make_node("Identity", [f"{name}_c"], [f"{name}_i"]),
                helper.make_node("Cast", [f"{name}_i"], [name], to=TensorProto.FLOAT),
            ]
        else:
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [c]))
    nodes += [helper.make_node("Conv", ["x", "w"], ["y"]), helper.make_node("BatchNormalization", ["y", "scale", "bias", "mean", "var"], ["z"], name="bn")]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits)
    path = tmp_path / f"{how}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def test_onnx_statistics_computed_from_constants_are_read_and_graph_inputs_are_no_finding(cli, tmp_path):
    computed = _onnx_bn_stats_from(tmp_path, "computed")
    layer = json.loads(cli("inspect", computed, "-f", "json").stdout)["layers"][0]
    assert (layer["num_features"], layer["mean_absmax"], layer["var_min"]) == (3, 0.5, 2.0) and layer["flags"] == []
    assert {f["check"] for f in json.loads(cli("audit", computed, "-f", "json").stdout)["findings"]} == {"BN402"}
    runtime = _onnx_bn_stats_from(tmp_path, "runtime")
    layer = json.loads(cli("inspect", runtime, "-f", "json").stdout)["layers"][0]
    assert layer["num_features"] == 3 and layer["flags"] == []
    assert json.loads(cli("audit", runtime, "-f", "json").stdout)["findings"] == []


def test_folders_are_searched_by_content_with_gitignore_include_and_exclude(cli, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "ignored").mkdir()
    (tmp_path / "resnet.pth.tar").write_bytes((CHECKPOINTS / "sample.pt").read_bytes())  # timm's name
    (tmp_path / "sub" / "weights").write_bytes((CHECKPOINTS / "sample.safetensors").read_bytes())  # no extension
    (tmp_path / "ignored" / "m.onnx").write_bytes((CHECKPOINTS / "sample.onnx").read_bytes())
    (tmp_path / "sub" / "old.pt").write_bytes((CHECKPOINTS / "sample.pt").read_bytes())
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / ".gitignore").write_text("ignored/\n")
    doc = json.loads(cli("audit", tmp_path, "--exclude", "old.*", "-f", "json").stdout)
    assert sorted(f["file"] for f in doc["files"]) == sorted([str(tmp_path / "resnet.pth.tar"), str(tmp_path / "sub" / "weights")])
    assert doc["skipped"] == {"ignored by .gitignore": 1, "not a checkpoint": 1, "excluded by --exclude": 1}
    only = json.loads(cli("audit", tmp_path, "--include", "*.tar", "-f", "json").stdout)
    assert [f["file"] for f in only["files"]] == [str(tmp_path / "resnet.pth.tar")]
    assert "skipped in the folders" in cli("audit", tmp_path).stdout


def test_many_findings_of_one_check_are_one_line_and_statistics_count_them(cli):
    grouped = cli("audit", BROKEN / "train_mode.torchscript.pt").stdout.splitlines()
    assert len([l for l in grouped if "BN201" in l]) == 1 and "(10 layers: stem.1" in grouped[0]
    full = cli("audit", BROKEN / "train_mode.torchscript.pt", "--verbose").stdout.splitlines()
    assert len([l for l in full if "BN201" in l]) == 10
    stats = cli("audit", BROKEN, "--statistics").stdout.splitlines()
    assert stats[0].split() == ["10", "BN201", "[error]", "saved-in-train-mode"] and stats[-1].startswith("Found 23 findings")
    quiet = cli("audit", BROKEN / "train_mode.torchscript.pt", "--quiet").stdout
    assert "Found" not in quiet and "BN201" in quiet


# --- --fix: audit finds X, --fix writes a file whose audit no longer finds X, outputs verified --


def test_fix_turns_onnx_training_mode_bn_into_inference_bn_and_onnx_runtime_agrees(cli, tmp_path):
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    stats = {"s": rng.random(3) + 0.5, "b": rng.normal(size=3), "m": rng.normal(size=3), "v": rng.random(3) + 0.5}
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in stats.items()]
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("BatchNormalization", ["r", "s", "b", "m", "v"], ["y", "rm", "rv"], training_mode=1)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4, 4])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 4])], outputs, inits)
    src, out = tmp_path / "train.onnx", tmp_path / "fixed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=9), src)
    assert "BN401" in cli("audit", src).stdout
    assert cli("audit", src, "--fix", "--diff").exit_code == 1 and not out.exists()
    result = cli("audit", src, "--fix", "-o", out)
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "fixed: BN401" in result.stdout and json.loads(cli("audit", out, "-f", "json").stdout)["findings"] == []
    x = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    expected = nn.BatchNorm2d(3).eval()  # the eval-mode PyTorch layer on the same statistics
    with torch.no_grad():
        for name, attr in (("s", "weight"), ("b", "bias"), ("m", "running_mean"), ("v", "running_var")):
            getattr(expected, attr).copy_(torch.from_numpy(stats[name].astype(np.float32)))
        want = expected(torch.relu(torch.from_numpy(x))).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_fix_exits_by_the_fail_on_given_on_the_command_line(cli, tmp_path):
    """--fix's exit code is the written file's audit under --fail-on (it used pyproject's alone):
    a training-mode BN after a Conv, fixed, leaves BN402 (info: foldable)."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.normal(size=(3, 3, 1, 1)).astype(np.float32), "w")]
    inits += [numpy_helper.from_array((rng.random(3) + 0.5).astype(np.float32), n) for n in ("s", "b", "m", "v")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y", "rm", "rv"], training_mode=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4, 4])], inits)
    src = tmp_path / "train.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=9), src)
    default = cli("audit", src, "--fix", "-o", tmp_path / "a.onnx")
    assert default.exit_code == 0 and "BN402" in default.stdout, default.output
    strict = cli("audit", src, "--fix", "-o", tmp_path / "b.onnx", "--fail-on", "info")
    assert strict.exit_code == 1 and "BN402" in strict.stdout, strict.output


def test_fix_refuses_statistics_that_are_not_real(cli, tmp_path):
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in (("s", np.ones(3)), ("b", np.zeros(3)), ("m", np.zeros(3)), ("v", np.ones(3)))]
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], training_mode=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4, 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=9), tmp_path / "never.onnx")
    result = cli("audit", tmp_path / "never.onnx", "--fix", "-o", tmp_path / "out.onnx")
    assert "not fixed: BN401" in result.stdout and "recalibrate" in result.stdout and not (tmp_path / "out.onnx").exists()


def test_fix_saves_a_train_mode_torchscript_in_eval_mode_with_the_same_eval_outputs(cli, tmp_path):
    out = tmp_path / "fixed.ts"
    assert "BN201" in cli("audit", BROKEN / "train_mode.torchscript.pt").stdout
    result = cli("audit", BROKEN / "train_mode.torchscript.pt", "--trust", "--fix", "-o", out, "--input-shape", "2,3,32,32")
    assert result.exit_code == 0 and "max abs error 0" in result.stdout, result.stdout + result.stderr
    assert json.loads(cli("audit", out, "-f", "json").stdout)["findings"] == []
    x = torch.rand(3, 3, 32, 32)
    original, fixed = torch.jit.load(str(BROKEN / "train_mode.torchscript.pt")).eval(), torch.jit.load(str(out))
    assert not any(m.training for m in fixed.modules())
    with torch.no_grad():
        torch.testing.assert_close(fixed(x), original(x), rtol=0, atol=0)


def test_fix_moves_a_conv_bias_into_the_bn_exactly(cli, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.ReLU())
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2)
    model.eval()
    torch.save(model, tmp_path / "m.pt")
    assert "BN208" in cli("audit", tmp_path / "m.pt", "--trust").stdout
    result = cli("audit", tmp_path / "m.pt", "--trust", "--fix", "-o", tmp_path / "fixed.pt")
    assert result.exit_code == 0 and "fixed: BN208 1: 0.bias moved into running_mean" in result.stdout, result.stdout
    fixed = torch.load(tmp_path / "fixed.pt", weights_only=False)
    assert float(fixed[0].bias.abs().max()) == 0
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fixed(x), model(x), rtol=1e-5, atol=1e-6)
    assert "BN208" not in cli("audit", tmp_path / "fixed.pt", "--trust").stdout


def test_list_and_explain_say_which_checks_are_fixable(cli):
    listing = cli("audit", "--list").stdout.splitlines()
    assert next(l for l in listing if l.startswith("BN401")).split()[3] == "yes"
    assert next(l for l in listing if l.startswith("BN104")).split()[3] == "-"
    assert "bnctl audit --fix:" in cli("audit", "--explain", "BN208").stdout


def test_float16_overflow_and_precision_are_told_apart_and_the_error_is_measured_with_inputs(tmp_path):
    model = buggy_models.tiny_variance()
    torch.save(model.state_dict(), tmp_path / "t.pt")
    potential = {f.code: f.message for f in audit([tmp_path / "t.pt"]).findings}
    assert "BN108" in potential and "BN105" not in potential and "not measured" in potential["BN108"]
    measured = audit([tmp_path / "t.pt"], model=ModelSource(arch=f"{MODELS}:tiny_variance"), inputs=CheckInputs(shapes=[(2, 3, 8, 8)]))
    message = next(f.message for f in measured.findings if f.code == "BN108")
    assert "measured on the check inputs: the model in float16 differs from float32 by" in message
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # the check inputs, seed 0
    import copy

    with torch.no_grad():
        full, half = model.eval()(x), copy.deepcopy(model).eval().half()(x.half()).float()
        want = (full - half).abs().max() / full.abs().max()
    assert float(re.search(r"by ([0-9.e+-]+) \(relative\)", message).group(1)) == pytest.approx(float(want), rel=0.05)


def test_fix_rewrites_a_pt2_exported_in_train_mode_to_the_eval_model(cli, tmp_path):
    torch.manual_seed(0)
    model = sample_net().train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))  # real statistics
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 32, 32),)), tmp_path / "train.pt2")
    assert "BN201" in cli("audit", tmp_path / "train.pt2").stdout
    _ = cli("audit", tmp_path / "train.pt2", "--fix", "-o", tmp_path / "f.pt2")
    assert _.exit_code == 2 and "--trust" in _.stderr  # loading a program needs --trust
    result = cli("audit", tmp_path / "train.pt2", "--trust", "--fix", "-o", tmp_path / "fixed.pt2")
    assert result.exit_code == 0 and "dropout" in result.stdout, result.stdout + result.stderr
    assert json.loads(cli("audit", tmp_path / "fixed.pt2", "-f", "json").stdout)["findings"] == []
    fixed = torch.export.load(tmp_path / "fixed.pt2").module()
    x = torch.randn(2, 3, 32, 32)  # the program's batch size
    with torch.no_grad():
        torch.testing.assert_close(fixed(x), model.eval()(x), rtol=0, atol=1e-6)


def test_a_selected_check_that_does_not_apply_to_a_format_is_a_clean_result(cli, tmp_path):
    # BN203 is a module-tree check: it does not apply to an ONNX graph (its modes are BN401's)
    onnx_file = CHECKPOINTS / "sample.onnx"
    text = cli("audit", onnx_file, "--select", "BN203")
    assert text.exit_code == 0, text.output
    assert "BN203 (configuration) does not apply: an ONNX graph has no module tree" in text.stdout
    doc = json.loads(cli("audit", onnx_file, "--select", "BN203", "-f", "json").stdout)
    assert doc["not_run"] == [] and doc["not_applicable"][0]["checks"] == ["BN203"] and doc["not_applicable"][0]["explicit"]
    sarif = json.loads(cli("audit", onnx_file, "--select", "BN203", "-f", "sarif").stdout)
    invocation = sarif["runs"][0]["invocations"][0]
    assert invocation["executionSuccessful"] is True and invocation["toolExecutionNotifications"][0]["level"] == "note"
    junit = ET.fromstring(cli("audit", onnx_file, "--select", "BN203", "-f", "junit").stdout)
    assert junit.get("errors") == "0" and junit.find(".//testcase/skipped") is not None
    # a folder of mixed artifacts passes the same selection where every file that can run it does
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(onnx_file.read_bytes())
    (folder / "model.pt").write_bytes((CHECKPOINTS / "sample.pt").read_bytes())
    mixed = cli("audit", folder, "--select", "BN203", "--arch", "bnctl.models:sample_net")
    assert mixed.exit_code == 0, mixed.output
    # where it applies but cannot run (a state_dict without --arch), the gate still fails
    assert cli("audit", folder, "--select", "BN203").exit_code == 2
