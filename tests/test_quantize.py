"""int4 exports (export/quantize.py): the packed numbers are the blocks they claim, both forms compute the same,
the quality budget (export/quality.py) holds on trained weights (micro) and at the real widths, the stream still
says true things, and the runtime refuses the configurations that would make 4-bit weights slow."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import cli, hf_folder
from export import migraphx_ref
from export.check import check, check_model
from export.load import SourceError, resolve
from export.pipeline import ExportOptions, run
from export.quality import BUDGET
from export.quantize import Scheme, default_block, dequantize, quantize_blocks, quantize_folder
from runtime.manifest import Manifest, ManifestError
from runtime.model import Model
from runtime.quant import slow_configuration


def within_budget(quality: dict) -> None:
    assert quality["mean_kl"] <= BUDGET["mean_kl"] and quality["ppl_ratio"] <= BUDGET["ppl_ratio"], quality
    assert quality["top1"] >= BUDGET["top1"], quality
    assert quality["logits_rel"] <= BUDGET["logits_rel"] and quality["kv_rel"] <= BUDGET["kv_rel"], quality
    assert quality["mean_kl"] > 0 and quality["logits_rel"] > 0  # the quantized graphs really differ


@pytest.fixture(scope="module")
def micro_int4(tmp_path_factory):
    return run(ExportOptions("micro", tmp_path_factory.mktemp("q") / "micro-int4", quant="int4"))


def _two_products(folder, k=64, n=48, head=40, seed=0, dtype=np.float32):
    """decoder.onnx: y = x @ W (MatMul) and z = x @ H^T (Gemm transB, as the exporter writes the LM head), in
    `dtype` (weights and activations)."""
    rng = np.random.default_rng(seed)
    w, h = rng.standard_normal((k, n)).astype(dtype), (rng.standard_normal((head, k)) * 0.1).astype(dtype)
    w[3, 5] = 0.0
    w[:32, 0] = 0.0  # an all-zero block: scale 0 must not divide by zero
    t = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
         helper.make_node("Gemm", ["x", "H"], ["z"], name="head", transB=1)], "g",
        [helper.make_tensor_value_info("x", t, [3, k])],
        [helper.make_tensor_value_info("y", t, [3, n]), helper.make_tensor_value_info("z", t, [3, head])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(h, "H")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(folder / "decoder.onnx"), save_as_external_data=True, location="decoder.onnx.data",
                     size_threshold=0)
    return w, h, rng.standard_normal((3, k)).astype(dtype)


def test_blocks_round_to_their_nearest_code():
    w = np.random.default_rng(1).standard_normal((8, 96), np.float32)
    codes, scales = quantize_blocks(w, 4, 32)
    assert codes.min() >= -8 and codes.max() <= 7 and scales.shape == (8, 3)
    back = dequantize(codes, scales, 32)
    step = np.repeat(np.abs(scales), 32, axis=1)
    error = np.abs(back - w)
    # round to nearest, except where a value opposite the extreme rounds past +7 and is clipped (at most a step)...
    assert np.all(error[codes < 7] <= step[codes < 7] / 2 + 1e-6) and np.all(error <= step + 1e-6)
    blocks = np.abs(w).reshape(8, 3, 32)
    extreme = blocks.argmax(-1)
    assert np.allclose(back.reshape(8, 3, 32)[np.arange(8)[:, None], np.arange(3), extreme],
                       w.reshape(8, 3, 32)[np.arange(8)[:, None], np.arange(3), extreme])  # ...the extreme exact


@pytest.mark.parametrize("form,head_bits,dtype", [("matmulnbits", 4, np.float32), ("dequantizelinear", 4, np.float32),
                                                  ("matmulnbits", 8, np.float32), ("matmulnbits", 4, np.float16),
                                                  ("dequantizelinear", 4, np.float16)])
def test_onnx_runtime_computes_the_dequantized_weights(tmp_path, form, head_bits, dtype):
    """Packing and layout: ONNX Runtime on the written graph (float activations) equals x @ the dequantized
    weights computed here in numpy, for a MatMul and a transposed Gemm (the LM head; at 8 bits always written as
    DequantizeLinear, which MIGraphX parses and ONNX Runtime fuses). fp16 weights get fp16 scales (the type of the
    activations and of the output)."""
    w, h, x = _two_products(tmp_path / "fp32", dtype=dtype)
    scheme = Scheme(block_size=32, form=form, accuracy_level=0, eight_bit=("lm_head",) if head_bits == 8 else ())
    quantize_folder(tmp_path / "fp32", tmp_path / "q", scheme, graphs=("decoder",), log=lambda *_: None)
    graph = onnx.load(str(tmp_path / "q" / "decoder.onnx"), load_external_data=False)
    ops = [n.op_type for n in graph.graph.node]
    if form == "dequantizelinear":
        assert ops == ["DequantizeLinear", "MatMul"] * 2
    else:
        assert ops == ["MatMulNBits"] * 2 if head_bits == 4 else ["MatMulNBits", "DequantizeLinear", "MatMul"]
    assert check_model(graph) == []  # every form written is one MIGraphX's execution provider takes
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    scales = {t.name: t.data_type for t in graph.graph.initializer if t.name.endswith(".scales")}
    assert set(scales.values()) == {helper.np_dtype_to_tensor_dtype(np.dtype(dtype))}
    y, z = ort.InferenceSession(str(tmp_path / "q" / "decoder.onnx"), options).run(None, {"x": x})
    assert y.dtype == z.dtype == dtype
    wq = dequantize(*quantize_blocks(w.T.astype(np.float32), 4, 32, dtype), 32).T
    hq = dequantize(*quantize_blocks(h.astype(np.float32), head_bits, 32, dtype), 32)
    x32 = x.astype(np.float32)
    tolerance = 1e-4 if dtype == np.float32 else 2e-3 * np.abs(x32 @ wq).max()  # fp16 output: 11-bit mantissa
    assert np.abs(y - x32 @ wq).max() < tolerance and np.abs(z - x32 @ hq.T).max() < tolerance / 10
    assert np.abs(y - x32 @ w.astype(np.float32)).max() > 1e-2  # and that is not the float product


def test_micro_int4_export_holds_the_budget(micro_int4):
    manifest = Manifest.load(micro_int4)
    q = manifest["quantization"]
    assert q["scheme"]["bits"] == 4 and q["scheme"]["block_size"] == 64 and q["scheme"]["accuracy_level"] == 4
    assert q["quality"]["top1_rule"].startswith("every position")  # trained weights: every position counts
    assert q["budget_applies"].startswith("end to end") and q["scheme"]["eight_bit"] == []  # int4 everywhere holds
    within_budget(q["quality"])
    assert q["quantized_matrices"] == 4 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the LM head
    assert q["quantized_bytes"] < 0.17 * q["float_bytes"]
    assert manifest["embeddings"]["dtype"] == "float16" and np.load(micro_int4 / "embed_tokens.npy").dtype == np.float16
    assert not (micro_int4 / "prefill.onnx.data").exists()  # both decoder graphs share decoder.onnx.data
    for graph in ("decoder", "prefill"):
        assert manifest["graphs"][graph]["quantized"] == {
            "ops": {"MatMulNBits": 29}, "matmulnbits": [{"bits": 4, "accuracy_level": 4, "zero_points": None}]}
    assert check(micro_int4) == []
    assert manifest["verification"]["max_abs_errors"]  # the fp32 graphs were proven before quantization


def test_micro_int4_stream_says_true_things(micro_int4, tmp_path):
    from runtime.accuracy import score, stream

    table = score(stream(Model(Manifest.load(micro_int4), threads=2), seed=11, seconds=60)).row()
    assert table["exact"] >= 0.9, table
    clip = tmp_path / "world.mp4"
    assert cli("-m", "runtime.sample", str(clip), "--world", "--seconds", "6", "--seed", "3").returncode == 0
    done = cli("-m", "runtime.stream", str(clip), "--graphs", str(micro_int4), "--out", str(tmp_path / "c.vtt"),
               "--quiet")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "c.vtt").read_text().count(" --> ") == 6


def test_dequantizelinear_form_is_the_same_model(micro_int4, tmp_path):
    """The standard-ONNX form: ONNX Runtime fuses it back into MatMulNBits, so the quality numbers are the same;
    and MIGraphX parses and computes both forms (where its ref target is here)."""
    out = run(ExportOptions("micro", tmp_path / "dq", quant="int4", quant_form="dequantizelinear", verify=False))
    a, b = Manifest.load(micro_int4)["quantization"], Manifest.load(out)["quantization"]
    assert b["scheme"]["form"] == "dequantizelinear" and Manifest.load(out)["graphs"]["decoder"]["quantized"][
        "ops"] == {"DequantizeLinear": 29}
    for key in ("mean_kl", "top1", "ppl_ratio"):
        assert abs(a["quality"][key] - b["quality"][key]) < 1e-4, (key, a["quality"], b["quality"])
    assert check(out) == []
    try:
        migraphx_ref.load()
    except migraphx_ref.Unavailable:
        return  # tests/test_migraphx_ref.py skips (or, in CI, fails) on the same condition
    for folder in (micro_int4, out):
        results, problems = migraphx_ref.check(Manifest.load(folder), log=lambda line: None)
        assert problems == []
        rewrites = {op for r in results for op in r.rewrites}
        assert ("MatMulNBits" if folder == micro_int4 else "DequantizeLinear") in rewrites


def test_int4_weights_with_fp16_activations(micro_graphs, tmp_path):
    """QUANT=int4 DTYPE=fp16, the configuration GPUs run: the fp16 export (norms, RoPE and softmax in their fp32
    islands) is proven against transformers within the fp16 budget, then its matrices go to 4 bits with fp16 scales
    (MatMulNBits then takes and gives fp16) and hold the int4 quality budget against those fp16 graphs, and against
    the fp32 graphs too; the stream still says true things; and where MIGraphX's ref target is here the export proved
    the graphs on it (ONNX Runtime's CPU provider runs fp16 MatMulNBits itself)."""
    out = run(ExportOptions("micro", tmp_path / "m16q", dtype="fp16", quant="int4"))
    manifest = Manifest.load(out)
    q = manifest["quantization"]
    assert manifest["dtype"] == "fp16" and q["reference"].startswith("this export's fp16 ONNX graphs")
    assert manifest["verification"]["greedy_agreement"] >= 0.9  # the fp16 graphs, before quantization
    assert q["scheme"]["eight_bit"] == [] and q["budget_applies"].startswith("end to end")
    within_budget(q["quality"])
    graph = onnx.load(str(out / "decoder.onnx"), load_external_data=False).graph
    types = {t.name: t.data_type for t in graph.initializer}
    nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 29 and {types[n.input[2]] for n in nodes} == {TensorProto.FLOAT16}
    assert check(out) == []
    from export import quality
    from runtime.accuracy import score, stream

    model = Model(manifest, threads=2)
    within_budget(quality.compare(quality.run(Model(Manifest.load(micro_graphs))), quality.run(model), True))
    table = score(stream(model, seed=11, seconds=60)).row()
    assert table["exact"] >= 0.9, table
    try:
        migraphx_ref.load()
    except migraphx_ref.Unavailable:
        return  # tests/test_migraphx_ref.py skips (or, in CI, fails) on the same condition
    proof = manifest["verification"]["migraphx_ref"]
    assert isinstance(proof, dict) and any(label.startswith("decoder.onnx") for label in proof), proof


def test_a_missed_budget_keeps_more_at_8_bits(tmp_path, monkeypatch):
    """The ladder: int4 everywhere, then the LM head at 8 bits, then whole layers from the ends inwards; the export
    stops at the first step within budget (forced here to miss the first two)."""
    from export import quality

    real, calls = quality.failures, []

    def strict(*args):
        calls.append(args)
        return ["forced"] if len(calls) <= 2 else real(*args)

    monkeypatch.setattr(quality, "failures", strict)
    out = run(ExportOptions("micro", tmp_path / "m", quant="int4", verify=False))
    manifest = Manifest.load(out)
    assert len(calls) == 3 and manifest["quantization"]["scheme"]["eight_bit"] == ["lm_head", "layers.0"]
    assert manifest["graphs"]["decoder"]["quantized"]["ops"] == {"MatMulNBits": 21, "DequantizeLinear": 8}
    graph = onnx.load(str(out / "decoder.onnx"), load_external_data=False).graph
    types = {t.name: t.data_type for t in graph.initializer}
    assert {types[n.input[0]] for n in graph.node if n.op_type == "DequantizeLinear"} == {TensorProto.INT8}
    assert check(out) == []
    within_budget(manifest["quantization"]["quality"])


def test_slow_quantized_configurations_are_refused(micro_int4, tmp_path):
    """From the contract the exporter wrote (the runtime reads no graph and needs no onnx): prepacking off, 8-bit
    weights without accuracy_level 4, float zero points; at load, one line, and the CLI exits 1."""
    manifest = Manifest.load(micro_int4)
    contract = manifest["graphs"]["decoder"]
    assert slow_configuration(contract, prepacking=True) is None
    assert "prepacking disabled" in slow_configuration(contract, prepacking=False)
    clip = tmp_path / "w.mp4"
    assert cli("-m", "runtime.sample", str(clip), "--world", "--seconds", "2").returncode == 0
    for change, words in (({"bits": 8, "accuracy_level": 0}, "8-bit weights without accuracy_level 4"),
                          ({"zero_points": "float"}, "float zero points")):
        folder = tmp_path / words.split()[0]
        shutil.copytree(micro_int4, folder)
        data = json.loads((folder / "manifest.json").read_text())
        data["graphs"]["decoder"]["quantized"]["matmulnbits"][0].update(change)
        (folder / "manifest.json").write_text(json.dumps(data))
        with pytest.raises(ManifestError, match=words):
            Model(Manifest.load(folder)).session("decoder")
        done = cli("-m", "runtime.stream", str(clip), "--graphs", str(folder), "--out", str(tmp_path / "x.vtt"),
                   "--quiet")
        assert done.returncode == 1 and done.stderr.count("\n") == 1 and words in done.stderr, done.stderr


GAUSSIAN_ERROR = 0.1032  # |W - Wq|_F / |W|_F of Gaussian weights in 4-bit blocks of 128 (0.0859 in blocks of 32)


def test_real_width_int4_is_as_good_as_noise_of_its_size(tmp_path):
    """The 4B widths (hidden 2560, FFN 9728, vocab 151,936), 1 decoder layer, random weights. There the end-to-end
    numbers measure the random model's noise, not quantization quality (export/quality.py), so this test asks what
    they can answer: every matrix is within its rounding bound, and the int4 graphs are no further from fp32 than
    fp32 weights given unbiased Gaussian noise of the same size (|noise| = |W - Wq| per matrix). A wrong scale, a
    transposed block or a biased rounding would be much further."""
    from export import quality
    from export.pipeline import _quantize

    folder = hf_folder(tmp_path / "wide", "Qwen3-VL-4B", **{
        "text_config.num_hidden_layers": 1, "vision_config.depth": 1, "vision_config.deepstack_visual_indexes": [0]})
    fp32 = run(ExportOptions(str(folder), tmp_path / "fp32", random_weights=True, verify=False))  # the 3-layer
    noisy = tmp_path / "noisy"  # test above proves the fp32 graphs at these widths
    shutil.copytree(fp32, noisy)
    manifest = Manifest.load(fp32).data
    rng = np.random.default_rng(0)
    for w in manifest["graphs"]["decoder"]["external_weights"]:
        if len(w["shape"]) == 2:
            weight = np.memmap(noisy / w["file"], np.float32, "r+", w["offset"], tuple(w["shape"]))
            size = GAUSSIAN_ERROR * np.sqrt(np.mean(np.square(weight)))
            weight += rng.normal(0, size, weight.shape).astype(np.float32)
            weight.flush()
            del weight
    reference = quality.run(Model(Manifest.load(fp32)))
    noise = quality.compare(reference, quality.run(Model(Manifest.load(noisy))), trained=False)

    q = _quantize(fp32, manifest, ExportOptions(str(folder), quant="int4", quant_block=128), True, log=lambda *_: None)
    print(json.dumps({"int4": q["quality"], "noise": noise, "weight_error": q["weight_rel_error"]}, indent=1))
    assert q["budget_applies"].startswith("per matrix") and 0.05 < q["weight_rel_error"]["max"] <= 0.12
    assert abs(q["weight_rel_error"]["mean"] - GAUSSIAN_ERROR) < 0.005  # the noise above has the int4 error's size
    assert q["quality"]["top1_rule"].startswith("positions with")  # random weights: top-1 where it means something
    for key in ("mean_kl", "logits_rel", "kv_rel"):
        assert q["quality"][key] <= 1.5 * noise[key], (key, q["quality"], noise)
    if noise["ppl_ratio"] is not None:  # forced tokens the float model finds plausible (random: a few, or none)
        assert np.log(q["quality"]["ppl_ratio"]) <= 1.5 * abs(np.log(noise["ppl_ratio"])) + 0.01
    assert q["quantized_matrices"] == 7 + 1 and q["quantized_bytes"] < 0.17 * q["float_bytes"]


def test_finer_blocks_are_an_export_option(micro_int4, tmp_path):
    """--quant-block 32: one scale per 32 weights (as llama.cpp's Q4_0; larger blocks run ONNX Runtime's CPU kernel
    faster), written into the graphs and the manifest, held to the same budget, and never mistaken for an export of
    micro's default block (64)."""
    out = run(ExportOptions("micro", tmp_path / "b32", quant="int4", quant_block=32, verify=False))
    q = Manifest.load(out)["quantization"]
    assert q["scheme"]["block_size"] == 32 and q["quantized_matrices"] == 4 * 7 + 1
    within_budget(q["quality"])
    graph = onnx.load(str(out / "decoder.onnx"), load_external_data=False).graph
    blocks = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"}
    assert blocks == {32}
    assert q["weight_rel_error"]["mean"] < Manifest.load(micro_int4)["quantization"]["weight_rel_error"]["mean"]
    # an existing block-64 export is neither reused for block 32 nor replaced without --force
    with pytest.raises(SourceError, match="a different export"):
        run(ExportOptions("micro", micro_int4, quant="int4", quant_block=32, verify=False))
    with pytest.raises(SourceError, match="block size"):
        run(ExportOptions("micro", tmp_path / "b48", quant="int4", quant_block=48))


@pytest.mark.parametrize("model,block", [("Qwen3-VL-2B", 128), ("Qwen3-VL-4B", 128), ("Qwen3-VL-8B", 128),
                                         ("micro", 64), ("tiny", 32)])
def test_the_default_block_fits_every_product(model, block, tmp_path):
    """Blocks of 128 by default, smaller only where a width holds fewer than two (micro's hidden size of 128, tiny's
    of 64), so that every decoder product is quantized whatever the model, in a form MIGraphX parses."""
    assert default_block(resolve(model, random_weights=True).config.text_config) == block
    if model == "micro":
        with pytest.raises(SourceError, match="block size 128 does not fit micro"):
            run(ExportOptions("micro", tmp_path / "b128", quant="int4", quant_block=128))
