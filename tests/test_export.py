"""ONNX export: one self-contained file that takes raw features and matches torch."""

import numpy as np
import onnx
import pytest
import torch

import fedmeta.export as export
from fedmeta.data import hospital_schema
from fedmeta.export import ExportError, ServedModel, example_inputs, export_onnx, onnx_feed, session, torch_inputs
from fedmeta.trained import TrainedModel


@pytest.fixture(scope="module")
def trained():
    schema = hospital_schema().model_copy(deep=True)
    schema.features[0].mean, schema.features[0].std = 62.0, 15.0  # normalization must live in the graph
    return TrainedModel.initial(schema, hidden=(32, 32), seed=3)


def test_graph_takes_raw_named_features_and_names_outputs_after_tasks(trained):
    sess = session(export_onnx(trained).onnx_bytes)
    inputs = {i.name: (i.type, i.shape) for i in sess.get_inputs()}
    assert list(inputs) == [f.name for f in trained.schema.features]
    assert inputs["age"] == ("tensor(float)", ["batch"])
    assert inputs["ward"] == ("tensor(string)", ["batch"])
    outputs = {o.name: o.shape for o in sess.get_outputs()}
    assert outputs == {"readmission_30d": ["batch", 2], "mortality": ["batch", 2], "length_of_stay": ["batch"]}


@pytest.mark.parametrize("rows", [1, 7, 300])
def test_onnxruntime_matches_torch_on_raw_rows_for_any_batch_size(trained, rows):
    sess = session(export_onnx(trained).onnx_bytes)
    raw = example_inputs(trained, rows=rows, seed=rows)
    with torch.no_grad():
        expected = [o.numpy() for o in ServedModel(trained)(*torch_inputs(trained, raw))]
    got = sess.run(trained.tasks, onnx_feed(trained, raw))
    for e, g in zip(expected, got):
        assert g.shape[0] == rows
        np.testing.assert_allclose(g, e, atol=1e-5)


def test_outputs_are_probabilities_and_values_in_label_units(trained):
    sess = session(export_onnx(trained).onnx_bytes)
    readmission, _, stay = sess.run(None, onnx_feed(trained, example_inputs(trained, rows=50)))
    np.testing.assert_allclose(readmission.sum(1), 1.0, atol=1e-6)
    model = trained.module()
    encoded = trained.schema.encode(__import__("pandas").DataFrame(example_inputs(trained, rows=50)))
    with torch.no_grad():
        scaled = model(torch.from_numpy(encoded), "length_of_stay").squeeze(-1).numpy()
    task = trained.schema.task("length_of_stay")
    np.testing.assert_allclose(stay, scaled * task.target_std + task.target_mean, atol=1e-4)


def test_export_is_one_file_with_no_external_weights(trained):
    proto = onnx.load_from_string(export_onnx(trained).onnx_bytes)
    assert proto.graph.initializer
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def test_export_is_deterministic(trained):
    assert export_onnx(trained).onnx_bytes == export_onnx(trained).onnx_bytes


def test_export_fails_loudly_when_the_graph_does_not_match_torch(trained, monkeypatch):
    original = export._string_inputs

    def corrupted(graph_bytes, model):
        proto = original(graph_bytes, model)
        weight = proto.graph.initializer[0]
        values = onnx.numpy_helper.to_array(weight) + 0.01
        weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
        return proto

    monkeypatch.setattr(export, "_string_inputs", corrupted)
    with pytest.raises(ExportError, match="does not match torch"):
        export_onnx(trained)


@pytest.mark.slow
def test_dynamo_exporter_gives_the_same_interface_and_parity(trained):
    exported = export_onnx(trained, exporter="dynamo")
    assert exported.exporter == "dynamo" and exported.max_abs_diff <= 1e-5
    sess = session(exported.onnx_bytes)
    assert [i.name for i in sess.get_inputs()] == [f.name for f in trained.schema.features]
