"""The graph check passes on exported graphs and names each offender in a bad one."""

import json

from onnx import TensorProto, helper

from export.check import check_model, check_static_inputs, main


def _model(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_value_dependent_reshape_and_nonzero_are_refused():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    shape = helper.make_tensor_value_info("shape", TensorProto.INT64, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    z = helper.make_tensor_value_info("z", TensorProto.INT64, None)
    model = _model([helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape_by_value"),
                    helper.make_node("NonZero", ["x"], ["z"], name="find")], [x, shape], [y, z])
    problems = check_model(model)
    assert any("reshape_by_value" in p and "depends on tensor values" in p for p in problems)
    assert any("find" in p and "NonZero" in p for p in problems)


def test_shape_derived_reshape_and_plain_ops_pass():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["a", "b"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    minus_one = helper.make_tensor("minus_one", TensorProto.INT64, [1], [-1])
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Slice", ["s", "zero", "one"], ["a"]),
             helper.make_node("Concat", ["a", "minus_one"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["r"]), helper.make_node("Softmax", ["r"], ["y"])]
    inits = [minus_one, helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
             helper.make_tensor("one", TensorProto.INT64, [1], [1])]
    assert check_model(_model(nodes, [x], [y], inits)) == []


def test_unsupported_op_and_cubic_resize_are_named():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["r"], mode="cubic", name="up"),
             helper.make_node("Det", ["r"], ["y"], name="det")]
    problems = check_model(_model(nodes, [x], [y], [scales]))
    assert any("up" in p and "cubic" in p for p in problems)
    assert any("det" in p and "not supported" in p for p in problems)


def test_cli_fails_on_manifest_mismatch(tiny_graphs, tmp_path, capsys):
    import shutil

    copy = tmp_path / "tiny"
    shutil.copytree(tiny_graphs, copy)
    assert main([str(copy)]) == 0
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["graphs"]["decoder"]["inputs"][0]["name"] = "input_ids"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main([str(copy)]) == 1
    assert "differ from the manifest" in capsys.readouterr().out


def test_input_dims_the_runtime_does_not_fix_are_named():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "past", "mystery", None])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [x], [y])
    problems = check_static_inputs(model)
    assert len(problems) == 2 and "'mystery'" in problems[0] and "(unnamed)" in problems[1]
