"""`seqapps export` of a recurrent model writes `step.onnx` beside `model.onnx`: one `step` with
the state as explicit inputs and outputs. Through the real CLI: a tiny image classifier whose
LightNet layers take the digits grid natively streams the image column by column; onnxruntime,
fed its own state back, agrees with PyTorch's `step` at every column, and after the last
column with `model.onnx` on the whole image. A model that is not recurrent gets no `step.onnx`."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

import seqapps
from conftest import only_run_dir, run_cli

TINY_STREAMING = ["task=classify_image", "backbone/mixer=lightnet", "backbone.scan=native", "backbone.embed_dim=16",
                  "backbone.depth=1", "backbone.patch_size=2", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
                  "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1", "callbacks=none",
                  "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger.tensorboard=null"]


@pytest.fixture(scope="module")
def streaming_export(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("streaming")
    proc = run_cli("train", *TINY_STREAMING, cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return only_run_dir(cwd / "runs") / "export"


@pytest.mark.slow
def test_step_onnx_streams_columns_like_pytorch(streaming_export):
    folder = streaming_export
    assert (folder / "model.onnx").is_file() and (folder / "step.onnx").is_file()
    config = yaml.safe_load((folder / "config.yaml").read_text())
    step_info = config["step"]
    assert step_info["onnx_max_diff"] <= 1e-4 and step_info["steps_checked"] == 4
    assert list(step_info["inputs"])[0] == "images_t" and step_info["inputs"]["images_t"] == [None, 1, 8, 2]
    card = (folder / "README.md").read_text()
    assert "step.onnx" in card and "next_state_0" in card

    model = seqapps.load(folder)
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 16  # raw digits: 0 .. 16
    columns = model.net.image_columns(images)  # [B, 4, 1, 8, 2]
    session = ort.InferenceSession(str(folder / "step.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names == list(step_info["inputs"])
    ort_state = [s.numpy() for s in model.init_state(3)]
    torch_state = model.init_state(3)
    with torch.no_grad():
        for t in range(columns.shape[1]):
            expected, torch_state = model.step(columns[:, t], torch_state)
            logits, *ort_state = session.run(None, dict(zip(names, [columns[:, t].numpy(), *ort_state])))
            np.testing.assert_allclose(logits, expected.numpy(), rtol=1e-4, atol=1e-4)
            for got, want in zip(ort_state, torch_state):
                np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
        whole = model(images).numpy()
    # after the last column the stream has classified the whole image
    np.testing.assert_allclose(logits, whole, rtol=1e-4, atol=1e-4)
    full = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(full.run(None, {"images": images.numpy()})[0], logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_seqapps_export_rewrites_step_and_a_scanned_model_has_none(streaming_export, tmp_path):
    """`seqapps export` of the run writes step.onnx again; the same task's module with a scanned
    (bidirectional) grid offers no step, so its export would hold model.onnx only."""
    run = streaming_export.parent
    proc = run_cli("export", f"run={run}", f"out={tmp_path / 'again'}", cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "again" / "step.onnx").is_file()

    from seqapps.export import step_tokens
    from seqapps.runs import load_module

    module = load_module(next((run / "checkpoints").glob("best-*.ckpt")))
    inputs = module.example_inputs()
    assert step_tokens(module, module.export_module(), inputs).shape == (2, 4, 1, 8, 2)
    module.net.scan = ("hilbert",)  # what a scanned backbone holds: it mixes the whole grid
    assert not module.export_module().streams
    assert step_tokens(module, module.export_module(), inputs) is None
    with pytest.raises(seqapps.errors.InputError, match="cannot stream column by column"):
        module.net.init_state(1)
