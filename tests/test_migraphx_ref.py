"""Every graph of the tiny fp32 and fp16 exports on MIGraphX's own ONNX parser and reference target (CPU):
parsed with the static dims the runtime fixes, compiled, and equal to ONNX Runtime on the same inputs; the cache
write also as the static path runs it, in place. Skipped, with the reason, where MIGraphX is not importable
(`.ci/run` installs it from ../shared/tools/migraphx-ref)."""

import os
import shutil

import onnx
import pytest
from onnx import TensorProto, helper

from conftest import cli
from export import migraphx_ref
from export.verify import RTOL
from runtime.manifest import Manifest

try:
    migraphx_ref.load()
    MISSING = None
except migraphx_ref.Unavailable as error:
    if os.environ.get("MIGRAPHX_REF_REQUIRED") == "1":  # set by .ci/run once it installed MIGraphX
        raise
    MISSING = str(error)
needs_migraphx = pytest.mark.skipif(MISSING is not None, reason=f"MIGraphX ref target not available: {MISSING}")


@needs_migraphx
@pytest.mark.parametrize("export", ["tiny_graphs", "tiny16"])
def test_every_graph_matches_onnx_runtime_on_migraphx(export, request):
    manifest = Manifest.load(request.getfixturevalue(export))
    results, problems = migraphx_ref.check(manifest, log=lambda line: None)
    assert problems == []
    graphs = {r.case.graph for r in results}
    assert graphs == set(manifest["graphs"])  # all five graphs, cache_write for both step sizes
    assert [r.case.dims["batch"] for r in results if r.case.graph == "decoder"] == [1, 2, 4, 8]  # batched decode
    for result in results:
        outputs = [v["name"] for v in manifest["graphs"][result.case.graph]["outputs"]]
        assert list(result.errors) == outputs  # every output compared
        if result.case.graph == "cache_write":  # a data move: exact in every dtype
            assert set(result.errors.values()) == {0.0}
        assert all(result.errors[name] <= result.tolerances[name] for name in outputs)
        assert max(result.errors.values()) < (1e-5 if manifest["dtype"] == "fp32" else RTOL["fp16"])
    # the static shapes: the prefill is the chunk's vision tokens + the shell, the cache has its scratch slot
    prefill = next(r.case for r in results if r.case.graph == "prefill")
    assert prefill.dims["new"] == 6 + 48  # frame 64x96: 4x6 patches, 6 merged tokens
    assert {r.case.dims["past"] for r in results if "past" in r.case.dims} == {prefill.dims["past"]}


@needs_migraphx
def test_the_export_proves_itself_on_migraphx(tiny_graphs):
    proof = Manifest.load(tiny_graphs)["verification"]["migraphx_ref"]
    assert isinstance(proof, dict) and len(proof) == 9 and max(max(e.values()) for e in proof.values()) < 1e-4
    assert any(label.startswith("decoder.onnx (batch=8,") for label in proof)  # the largest batched decode step


@needs_migraphx
def test_a_graph_migraphx_cannot_parse_is_named(tiny_graphs, tmp_path):
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_graphs, copy)
    manifest = Manifest.load(copy)  # before the change: the file sizes it records no longer hold after it
    x = helper.make_tensor_value_info("positions", TensorProto.INT64, [3, "past"])
    y = helper.make_tensor_value_info("key.0", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Cast", ["positions"], ["f"], to=TensorProto.FLOAT),
                               helper.make_node("Det", ["f"], ["key.0"])], "bad", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(copy / "cache_rope.onnx"))
    _, problems = migraphx_ref.check(manifest, capacity=64, log=lambda line: None)
    assert len(problems) == 1 and "cache_rope.onnx" in problems[0] and "cannot parse" in problems[0], problems


def test_without_migraphx_the_cli_says_how_to_get_it(tiny_graphs):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = cli("-m", "export.check", str(tiny_graphs), "--migraphx", env=env)
    assert result.returncode == 1 and "install.sh" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@needs_migraphx
def test_a_cache_write_that_reads_its_cache_twice_is_not_in_place_safe(tiny_graphs, tmp_path):
    """key_out.0 = ScatterND(key.0, ...) + (key.0 - key.0): the same values, but bound in place the second read of
    key.0 would see the scattered cache, so the check must refuse it."""
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_graphs, copy)
    manifest = Manifest.load(copy)  # before the change: the file sizes it records no longer hold after it
    model = onnx.load(str(copy / "cache_write.onnx"))
    scatter = next(n for n in model.graph.node if n.output[0] == "key_out.0")
    scatter.output[0] = "scattered"
    model.graph.node.extend([helper.make_node("Sub", ["key.0", "key.0"], ["zeros"]),
                             helper.make_node("Add", ["scattered", "zeros"], ["key_out.0"])])
    onnx.save(model, str(copy / "cache_write.onnx"))
    _, problems = migraphx_ref.check(manifest, capacity=64, log=lambda line: None)
    assert problems and all("key.0 is read by" in p for p in problems), problems
