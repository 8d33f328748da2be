"""The walk and the API around it: batching, defaults, errors, caching, composition, the export CLI."""
import io

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from adcheck import assert_standard, make_model, node, rel, session
from onnxplain.kernels.autodiff import AutodiffError, augment, augment_cached, differentiate

torch.set_num_threads(1)


def tiny_cnn(softmax=False, batch="N"):
    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
              torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 5)]
    net = torch.nn.Sequential(*layers, *([torch.nn.Softmax(-1)] if softmax else [])).eval()
    net[1].running_mean.normal_()
    net[1].running_var.uniform_(0.5, 2)
    f = io.BytesIO()
    torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), f, dynamo=False, opset_version=13, input_names=["x"],
                      output_names=["probs" if softmax else "logits"], dynamic_axes={"x": {0: batch}})
    return net, onnx.load_from_string(f.getvalue())


def test_each_row_depends_only_on_its_own_seed_row():
    _, model = tiny_cnn()
    sess = session(augment(model, scores="logits"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    seed = rng.standard_normal((3, 5)).astype(np.float32)
    batch = sess.run(["x__grad"], {"x": x, "seed": seed})[0]
    for i in range(3):
        alone = sess.run(["x__grad"], {"x": x[i:i + 1], "seed": seed[i:i + 1]})[0]
        np.testing.assert_allclose(batch[i:i + 1], alone, rtol=1e-5, atol=1e-6)
    seed2 = seed.copy()
    seed2[1] *= -3
    changed = sess.run(["x__grad"], {"x": x, "seed": seed2})[0]
    np.testing.assert_array_equal(changed[[0, 2]], batch[[0, 2]])
    np.testing.assert_allclose(changed[1], -3 * batch[1], rtol=1e-5, atol=1e-6)


def test_default_scores_are_the_logits_before_softmax():
    net, model = tiny_cnn(softmax=True)
    aug = augment(model)
    seed_vi = [i for i in aug.graph.input if i.name == "seed"][0]
    assert [d.dim_value or d.dim_param for d in seed_vi.type.tensor_type.shape.dim][1] == 5
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    seed = np.eye(5, dtype=np.float32)[[1, 3]]
    got = session(aug).run(["x__grad"], {"x": x, "seed": seed})[0]
    xx = torch.from_numpy(x).requires_grad_()
    (net[:-1](xx) * torch.from_numpy(seed)).sum().backward()  # d(logit_target)/dx, not d(prob)/dx
    assert rel(got, xx.grad.numpy()) < 1e-5


def test_missing_rule_names_the_op_and_the_node():
    model = make_model([node("Relu", ["x"], "r"), node("Det", ["r"], "c", name="the_det"),
                        node("Mul", ["c", "c"], "y")], {"x": np.ones((2, 3, 3))})
    with pytest.raises(AutodiffError, match=r"Det.*the_det"):
        augment(model, scores="y")


def test_custom_domain_op_on_the_path_is_an_error_not_a_zero_gradient():
    graph = helper.make_graph(
        [node("Relu", ["x"], "r"), helper.make_node("FusedThing", ["r"], ["y"], domain="com.acme", name="fused")],
        "custom", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.acme", 1)])
    with pytest.raises(AutodiffError, match=r"FusedThing.*fused"):
        augment(model, scores="y")


def test_augmented_graph_means_the_same_on_the_onnx_reference_runtime():
    from onnx.reference import ReferenceEvaluator

    _, model = tiny_cnn()
    aug = augment(model, scores="logits")
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    feeds = {"x": x, "seed": np.ones((2, 5), np.float32)}
    want = session(aug).run(["x__grad"], feeds)[0]
    got = ReferenceEvaluator(aug).run(["x__grad"], feeds)[0]
    assert rel(got, want) < 1e-5


def test_ops_off_the_path_need_no_rule():
    # Det (which has no rule) feeds a second output only; the score does not depend on it.
    model = make_model([node("Relu", ["x"], "y"), node("Det", ["x"], "z")], {"x": np.ones((2, 3, 3))}, out=["y", "z"])
    aug = augment(model, scores="y")
    assert "Det" in [n.op_type for n in aug.graph.node]
    assert_standard(aug)


def test_unreached_tensor_gets_a_zero_gradient():
    model = make_model([node("Relu", ["a"], "y")], {"a": np.ones((2, 3)), "b": np.ones((4,))})
    out = session(augment(model, scores="y")).run(["b__grad"], {"a": np.ones((2, 3)), "b": np.ones(4),
                                                               "seed": np.ones((2, 3))})[0]
    np.testing.assert_array_equal(out, np.zeros(4))


def test_a_batched_operand_times_a_matrix_needs_no_summing_whatever_its_batch_dims_are_called():
    """Shape inference names a MatMul's output batch dim afresh (unk__0 for an operand's unk__1): that is no
    reason to sum the operand's cotangent over broadcast axes found at run time (13 shape nodes per MatMul, as
    many as the rest of Opti-CAM's mask graph), when the other operand is a matrix."""
    rng = np.random.default_rng(0)
    m, w = rng.standard_normal((6, 4)), rng.standard_normal((3, 5))
    nodes = [node("Reshape", ["x", "shape"], "r"), node("MatMul", ["m", "r"], "left"),
             node("MatMul", ["left", "w"], "y")]
    model = make_model(nodes, {"x": rng.standard_normal((2, 1, 4, 3))},
                       {"shape": np.array([-1, 1, 4, 3]), "m": m, "w": w}, sym={"x": ["N", 1, 4, 3]}, dtype=np.float32)
    grad = differentiate(model, "y", ["x"])
    assert "NonZero" not in [n.op_type for n in grad.graph.node]
    x = rng.standard_normal((3, 1, 4, 3)).astype(np.float32)
    seed = rng.standard_normal((3, 1, 6, 5)).astype(np.float32)
    got = session(grad).run(["x__grad"], {"x": x, "seed": seed})[0]
    np.testing.assert_allclose(got, m.T @ seed @ w.T, rtol=1e-5, atol=1e-5)


def test_bad_requests_are_errors():
    _, model = tiny_cnn()
    with pytest.raises(AutodiffError, match="rule must be one of"):
        augment(model, rule="smooth")
    with pytest.raises(AutodiffError, match="not in the graph"):
        augment(model, layers=["no_such_tensor"])
    with pytest.raises(AutodiffError, match="seed name"):
        differentiate(model, "logits", ["x"], seed_name="x")
    with pytest.raises(AutodiffError, match="nothing to differentiate"):
        augment(model, wrt_input=False)


def test_input_model_is_not_modified():
    _, model = tiny_cnn()
    before = model.SerializeToString()
    augment(model)
    assert model.SerializeToString() == before


def test_cache_returns_the_same_graph_for_the_same_request():
    _, model = tiny_cnn()
    a = augment_cached(model, scores="logits")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    assert augment_cached(copy, scores="logits") is a
    assert augment_cached(model, scores="logits", rule="guided") is not a
    assert augment_cached(model, scores="logits").SerializeToString() == augment(model, scores="logits") \
        .SerializeToString()


def test_opti_cam_like_composed_graph_matches_torch():
    """u -> softmax -> weighted sum of maps -> bilinear upsampling -> min-max -> x*mask -> model -> score,
    composed with onnx.compose and differentiated w.r.t. u."""
    net, model = tiny_cnn()
    K, h, H = 4, 4, 8
    prefix_nodes = [
        node("Softmax", ["u"], "w", axis=1),
        node("Unsqueeze", ["w", "ax23"], "w4"),
        node("Mul", ["A", "w4"], "Aw"),
        node("ReduceSum", ["Aw", "ax1"], "sal", keepdims=1),
        node("Resize", ["sal", "", "scales"], "up", mode="linear"),
        node("ReduceMin", ["up"], "lo", axes=[2, 3], keepdims=1),
        node("ReduceMax", ["up"], "hi", axes=[2, 3], keepdims=1),
        node("Sub", ["up", "lo"], "num"),
        node("Sub", ["hi", "lo"], "den"),
        node("Div", ["num", "den"], "mask"),
        node("Mul", ["img", "mask"], "masked"),
    ]
    inits = [numpy_helper.from_array(np.array([2, 3], np.int64), "ax23"),
             numpy_helper.from_array(np.array([1], np.int64), "ax1"),
             numpy_helper.from_array(np.array([1, 1, H / h, H / h], np.float32), "scales")]
    f32 = TensorProto.FLOAT
    prefix = helper.make_model(helper.make_graph(
        prefix_nodes, "opticam_prefix",
        [helper.make_tensor_value_info("u", f32, [1, K]), helper.make_tensor_value_info("A", f32, [1, K, h, h]),
         helper.make_tensor_value_info("img", f32, [1, 3, H, H])],
        [helper.make_tensor_value_info("masked", f32, [1, 3, H, H])], inits),
        opset_imports=model.opset_import, ir_version=model.ir_version)
    composed = onnx.compose.merge_models(prefix, model, io_map=[("masked", "x")])
    aug = differentiate(composed, "logits", ["u"])
    assert_standard(aug)

    rng = np.random.default_rng(0)
    u = rng.standard_normal((1, K)).astype(np.float32)
    A = np.abs(rng.standard_normal((1, K, h, h))).astype(np.float32)
    img = rng.standard_normal((1, 3, H, H)).astype(np.float32)
    seed = np.eye(5, dtype=np.float32)[[2]]
    got = session(aug).run(["u__grad"], {"u": u, "A": A, "img": img, "seed": seed})[0]

    uu = torch.from_numpy(u).requires_grad_()
    sal = (torch.from_numpy(A) * uu.softmax(1)[:, :, None, None]).sum(1, keepdim=True)
    up = F.interpolate(sal, size=(H, H), mode="bilinear", align_corners=False)
    lo, hi = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
    (net(torch.from_numpy(img) * (up - lo) / (hi - lo)) * torch.from_numpy(seed)).sum().backward()
    assert rel(got, uu.grad.numpy()) < 1e-4


def test_export_cli_writes_an_augmented_model(tmp_path, capsys):
    from onnxplain.kernels.export import main

    _, model = tiny_cnn()
    src, dst = tmp_path / "m.onnx", tmp_path / "aug.onnx"
    onnx.save(model, src)
    layer = [n for n in model.graph.node if n.op_type == "Relu"][0].output[0]
    assert main([str(src), "--layer", layer, "--rule", "guided", "-o", str(dst)]) == 0
    out = onnx.load(dst)
    assert [o.name for o in out.graph.output] == ["logits", layer, f"{layer}__grad", "x__grad"]
    assert [i.name for i in out.graph.input] == ["x", "seed"]
    assert main([str(src), "--layer", "nope", "-o", str(tmp_path / "bad.onnx")]) == 2
    assert "nope" in capsys.readouterr().err


def test_layer_rule_adds_a_second_backward_pass_sharing_forward_and_seed(tmp_path):
    """Guided Grad-CAM's graph: the input gradient under the guided rule and the layer's under the standard one,
    from one seed. Each equals the graph made for it alone. The layer is the convolution's output, so a ReLU lies
    between it and the scores and the two rules differ there."""
    from onnxplain.kernels.export import main

    _, model = tiny_cnn()
    layer = [n for n in model.graph.node if n.op_type == "Conv"][0].output[0]
    both = augment(model, [layer], rule="guided", layer_rule="standard")
    onnx.checker.check_model(both)
    assert [o.name for o in both.graph.output] == ["logits", layer, f"{layer}__grad", "x__grad"]
    assert [i.name for i in both.graph.input] == ["x", "seed"]
    rng = np.random.default_rng(3)
    feeds = {"x": rng.standard_normal((3, 3, 8, 8)).astype(np.float32),
             "seed": rng.standard_normal((3, 5)).astype(np.float32)}
    got = dict(zip(["logits", layer, "lg", "xg"], session(both).run(None, feeds)))
    guided_input = session(augment(model, rule="guided")).run(["x__grad"], feeds)[0]
    standard_layer = session(augment(model, [layer], wrt_input=False)).run([f"{layer}__grad"], feeds)[0]
    guided_layer = session(augment(model, [layer], wrt_input=False, rule="guided")).run([f"{layer}__grad"], feeds)[0]
    np.testing.assert_allclose(got["xg"], guided_input, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["lg"], standard_layer, rtol=1e-6, atol=1e-7)
    assert rel(guided_layer, standard_layer) > 0.1            # the rules differ on this layer
    src, dst = tmp_path / "m.onnx", tmp_path / "aug.onnx"
    onnx.save(model, src)
    assert main([str(src), "--layer", layer, "--rule", "guided", "--layer-rule", "standard", "-o", str(dst)]) == 0
    np.testing.assert_allclose(session(onnx.load(dst)).run([f"{layer}__grad"], feeds)[0], standard_layer, rtol=1e-6)


def test_reusing_a_seed_the_graph_does_not_have_is_an_error():
    _, model = tiny_cnn()
    with pytest.raises(AutodiffError, match="seed 'seed' to reuse"):
        differentiate(model, "logits", ["x"], reuse_seed=True)


def test_an_opset9_model_keeps_its_layer_names_through_the_opset_lift():
    """augment lifts opsets below 13 with onnx's version converter, which writes opset 9's Upsample as a Resize
    under a new output name; the layer named on the model as loaded is still differentiated (against torch)."""
    from onnxplain.kernels import graph

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.c, self.d = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, stride=2, padding=1)
            self.f = torch.nn.Linear(4, 5)

        def forward(self, x):
            self.up = F.interpolate(F.relu(self.c(x)), scale_factor=2, mode="nearest")
            self.up.retain_grad()
            return self.f(F.relu(self.d(self.up)).mean((2, 3)))

    net = Net().eval()
    f = io.BytesIO()
    torch.onnx.export(net, torch.zeros(1, 3, 8, 8), f, opset_version=9, dynamo=False, input_names=["x"],
                      output_names=["logits"])
    model = graph.load_model(f.getvalue())
    layer = next(n.output[0] for n in model.graph.node if n.op_type == "Upsample")
    assert layer in [lay.name for lay in graph.candidate_layers(model)]
    aug = augment(model, layers=[layer], scores="logits")
    assert_standard(aug)
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    seed = np.random.default_rng(1).standard_normal((1, 5)).astype(np.float32)
    act, gact, gx = session(aug).run([layer, f"{layer}__grad", "x__grad"], {"x": x, "seed": seed})
    xx = torch.from_numpy(x).requires_grad_()
    (net(xx) * torch.from_numpy(seed)).sum().backward()
    assert rel(act, net.up.detach().numpy()) < 1e-5
    assert rel(gact, net.up.grad.numpy()) < 1e-5 and rel(gx, xx.grad.numpy()) < 1e-4


def test_without_the_model_outputs_the_graph_keeps_only_the_forward_its_gradients_read():
    """keep_outputs=False (how the Runner builds its graphs): shapes the backward needs are constants or the seed's
    batch, not Shape nodes on forward tensors, and the forward nodes no gradient reads are pruned. Deconvnet's
    backward reads nothing of the forward but MaxPool's switches: of conv, relu, pool, conv, relu, pool, linear only
    the first three stay. The gradients are the same as with the outputs kept."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(6, 5)).eval()
    f = io.BytesIO()
    torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), f, dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "N"}})
    model = onnx.load_from_string(f.getvalue())
    rng = np.random.default_rng(5)
    feeds = {"x": rng.standard_normal((3, 3, 8, 8)).astype(np.float32),
             "seed": rng.standard_normal((3, 5)).astype(np.float32)}
    forward_tensors = {o for n in model.graph.node for o in n.output}
    for rule, kept in (("deconvnet", ["Conv", "Relu", "MaxPool"]),
                       ("standard", ["Conv", "Relu", "MaxPool", "Conv", "Relu"])):
        full, lean = augment(model, rule=rule), augment(model, rule=rule, keep_outputs=False)
        onnx.checker.check_model(lean, full_check=True)
        assert [o.name for o in lean.graph.output] == ["x__grad"]
        assert [n.op_type for n in lean.graph.node if not n.name.startswith("ad/")] == kept, rule
        assert not [n for n in lean.graph.node if n.op_type in ("Shape", "Size") and n.input[0] in forward_tensors]
        np.testing.assert_array_equal(session(lean).run(["x__grad"], feeds)[0],
                                      session(full).run(["x__grad"], feeds)[0])
    layer = model.graph.node[3].output[0]      # the second convolution's output
    both = augment(model, [layer], rule="guided", layer_rule="standard")
    lean = augment(model, [layer], rule="guided", layer_rule="standard", keep_outputs=False)
    onnx.checker.check_model(lean, full_check=True)
    assert [o.name for o in lean.graph.output] == [layer, f"{layer}__grad", "x__grad"]
    for name in (layer, f"{layer}__grad", "x__grad"):
        np.testing.assert_array_equal(session(lean).run([name], feeds)[0], session(both).run([name], feeds)[0])
