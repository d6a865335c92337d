"""The shell through the real CLI: train -> export -> load -> predict, evaluate, finetune,
help and config printing, and one clear line for each kind of bad input."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
import yaml
from conftest import TINY, only_run_dir, read_json, run_cli

import seqapps
from seqapps.cli import main
from seqapps.errors import InputError
from seqapps.tasks.forecasting.data import ar_frame


def test_help_cfg_and_list(tmp_path):
    proc = run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0 and all(v in proc.stdout for v in ("train", "evaluate", "finetune",
                                                                       "export", "predict", "list"))
    proc = run_cli("train", "data.seq_len=48", "--cfg", "job", "--resolve", cwd=tmp_path)
    cfg = yaml.safe_load(proc.stdout)
    assert proc.returncode == 0 and cfg["data"]["seq_len"] == 48 and cfg["module"]["net"]["n_lags"] == 48
    assert not (tmp_path / "runs").exists()  # printing the config writes nothing
    proc = run_cli("list", cwd=tmp_path)
    assert "forecast_arnet" in proc.stdout and "arnet_weather" in proc.stdout and "ddp" in proc.stdout


def test_train_leaves_a_complete_run_folder(trained_run):
    for rel in ("config.yaml", "checkpoints/last.ckpt", "metrics/metrics.csv", "test_metrics.json",
                "plots/forecast.png", "plots/coefficients.png", "export/config.yaml",
                "export/model.safetensors", "export/model.onnx", "export/README.md"):
        assert (trained_run / rel).is_file(), rel
    assert list((trained_run / "checkpoints").glob("best-*.ckpt"))
    assert list((trained_run / "tensorboard").glob("events.out.tfevents.*"))
    metrics = read_json(trained_run / "test_metrics.json")
    assert {"test/model/mse", "test/model/mae", "test/model/mse_orig", "test/classic_ar/mse",
            "test/seasonal_naive/mae"} <= set(metrics)
    history = pd.read_csv(trained_run / "metrics/metrics.csv")
    assert history["val/mse"].notna().sum() == 2  # two epochs validated


def _history_csv(path, n=50):
    frame, _ = ar_frame(n_samples=n, seed=7)
    frame.to_csv(path, index=False)
    return path


def test_export_loads_without_lightning_and_matches_checkpoint_and_onnx(trained_run, tmp_path):
    export = trained_run / "export"
    code = ("import sys, torch, seqapps\n"
            f"m = seqapps.load(r'{export}')\n"
            "assert 'lightning' not in sys.modules and 'hydra' not in sys.modules, 'heavy import'\n"
            "print('ok', tuple(m(torch.zeros(1, 8, 1)).shape))\n")
    import subprocess

    # run outside the repository, as a user would: its seqapps/ folder must not shadow the install
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and "ok (1, 4, 1)" in proc.stdout, proc.stderr[-2000:]

    csv = _history_csv(tmp_path / "history.csv")
    out_export, out_ckpt = tmp_path / "f_export.csv", tmp_path / "f_ckpt.csv"
    p1 = run_cli("predict", f"model={export}", f"input={csv}", f"output={out_export}", cwd=tmp_path)
    ckpt = next((trained_run / "checkpoints").glob("best-*.ckpt"))
    p2 = run_cli("predict", f"model={ckpt}", f"input={csv}", f"output={out_ckpt}", cwd=tmp_path)
    assert p1.returncode == 0 and p2.returncode == 0, p1.stderr[-2000:] + p2.stderr[-2000:]
    a, b = pd.read_csv(out_export), pd.read_csv(out_ckpt)
    assert list(a.columns) == ["date", "y"] and len(a) == 4
    assert a["date"].iloc[0] == str(pd.Timestamp(pd.read_csv(csv)["date"].iloc[-1]) + pd.Timedelta("1h"))
    np.testing.assert_allclose(a["y"], b["y"], rtol=1e-6)

    model = seqapps.load(export)
    x = torch.as_tensor(pd.read_csv(csv)["y"].to_numpy()[-8:], dtype=torch.float32).reshape(1, 8, 1)
    with torch.no_grad():
        expected = model(x)[0, :, 0].numpy()
    np.testing.assert_allclose(a["y"], expected, rtol=1e-5)
    onnx = ort.InferenceSession(str(export / "model.onnx")).run(None, {"history": x.numpy()})[0]
    np.testing.assert_allclose(onnx[0, :, 0], expected, rtol=1e-4, atol=1e-5)


def test_export_and_evaluate_verbs(trained_run, tmp_path):
    out = tmp_path / "exported"
    proc = run_cli("export", f"run={trained_run}", "which=last", f"out={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "largest difference" in proc.stdout and (out / "model.onnx").is_file()
    card = (out / "README.md").read_text()
    assert "seqapps.load" in card and "parameters" in card

    result = tmp_path / "eval.json"
    proc = run_cli("evaluate", f"run={trained_run}", f"out={result}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = read_json(result)["metrics"]
    assert "classic_ar" in proc.stdout and "test/model/mse" in metrics
    # the same checkpoint, the same data: the numbers `train` reported
    assert metrics["test/model/mse"] == pytest.approx(read_json(trained_run / "test_metrics.json")["test/model/mse"])


def test_finetune_new_head_and_frozen_backbone(tmp_path):
    from seqapps.config import compose
    from seqapps.runs import load_module, resolve_checkpoint
    from seqapps.train import run_train

    common = [*TINY, "module.net.hidden=[16]", "export=false", "logger.tensorboard=null",
              "module.baselines=[]"]
    pretrained = run_train(compose("train", [*common, f"paths.runs={tmp_path / 'pre'}"]))
    tuned = run_train(compose("finetune", [*common, f"paths.runs={tmp_path / 'ft'}", "data.pred_len=6",
                                           f"pretrained={pretrained}", "module.freeze=frozen_backbone"]))
    before = load_module(resolve_checkpoint(str(pretrained), None)).net
    after = load_module(resolve_checkpoint(str(tuned), None, which="last")).net
    assert torch.equal(before.backbone[0].weight, after.backbone[0].weight)  # frozen, loaded
    assert after.head.weight.shape == (6, 16) and before.head.weight.shape == (4, 16)  # new head


def _snapshot(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.parametrize("args, expected", [
    (["data.path=does/not/exist.csv"], "no file at"),
    (["data.path={csv}", "data.target=nope"], "column 'nope' is not in"),
    (["data.path={nan_csv}", "data.seq_len=8", "data.pred_len=4"], "missing values"),
    (["data.path={csv}", "data.seq_len=300", "data.pred_len=200"], "too short for data.seq_len=300"),
    (["trainer.max_epoch=5"], "unknown config option 'trainer.max_epoch'"),
    (["trainer.accelerator=bogus"], "cannot build lightning.Trainer"),
    (["task=nope"], "nope"),
    (["ckpt_path={run}/checkpoints/last.ckpt", "data.path=does/not/exist.csv"], "no file at"),
    (["data.batch_size=0"], "data.batch_size=0; expected an integer of at least 1"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0; expected a positive integer (or -1: no limit)"),
    (["seed=abc"], "seed='abc'; expected an integer"),
    (["experiment=digits_mixers", "data.num_workers=-1"], "data.num_workers=-1; expected an integer of at least 0"),
])
def test_bad_input_one_line_nonzero_exit_nothing_written(trained_run, tmp_path, capsys, args, expected):
    from conftest import write_tslib_csv

    csv = write_tslib_csv(tmp_path / "ok.csv", n=120)
    frame = pd.read_csv(csv)
    frame.loc[5, "OT"] = None
    frame.to_csv(tmp_path / "nan.csv", index=False)
    args = [a.format(csv=csv, nan_csv=tmp_path / "nan.csv", run=trained_run) for a in args]
    before = _snapshot(trained_run)
    code = main(["train", *args, f"paths.runs={tmp_path / 'runs'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("seqapps train: error:") and expected in err, err
    assert not (tmp_path / "runs").exists() and _snapshot(trained_run) == before


def test_bad_input_through_the_real_process(tmp_path):
    proc = run_cli("train", "data.path=missing.csv", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("seqapps train: error: data.path: no file at")
    proc = run_cli("predict", "model=nowhere", "input=x.csv", cwd=tmp_path)
    assert proc.returncode == 2 and "nothing at 'nowhere'" in proc.stderr
    proc = run_cli("frobnicate", cwd=tmp_path)
    assert proc.returncode == 2 and "unknown verb" in proc.stderr
    proc = run_cli("train", "data.path=missing.csv", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.parametrize("verb, option", [("finetune", "pretrained"), ("predict", "model")])
def test_a_folder_without_checkpoints_is_named_by_its_option(verb, option, tmp_path, capsys):
    code = main([verb, f"{option}={tmp_path}", f"input={tmp_path / 'x.csv'}"] if verb == "predict"
                else [verb, f"{option}={tmp_path}", f"paths.runs={tmp_path / 'runs'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"seqapps {verb}: error: {option}: '{tmp_path}' is not a run folder"), err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("verb, option", [("evaluate", "ckpt"), ("export", "ckpt"), ("predict", "model"),
                                          ("finetune", "pretrained")])
def test_a_file_that_is_not_a_checkpoint_is_one_line(verb, option, tmp_path, capsys):
    fake = tmp_path / "model.ckpt"
    fake.write_text("not a checkpoint")
    extra = {"predict": [f"input={tmp_path / 'x.csv'}"], "finetune": [f"paths.runs={tmp_path / 'runs'}"]}
    code = main([verb, f"{option}={fake}", *extra.get(verb, [])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "is not a readable PyTorch checkpoint" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]


@pytest.mark.parametrize("damage, message", [
    (("model.safetensors", b"garbage"), "model.safetensors' does not load into the model of config.yaml"),
    (("config.yaml", b"model: ["), "config.yaml' is not readable YAML"),
    (("config.yaml", b"inputs: []"), "config.yaml' has no 'model' entry"),
], ids=["weights", "yaml", "no model"])
def test_a_damaged_export_folder_is_one_line(trained_run, tmp_path, damage, message):
    folder = tmp_path / "export"
    shutil.copytree(trained_run / "export", folder)
    name, content = damage
    (folder / name).write_bytes(content)
    with pytest.raises(InputError, match=message):
        seqapps.load(folder)


def test_export_refuses_an_out_it_cannot_write_before_exporting(trained_run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for out, message in ((blocker, "is a file; give the path of a folder"),
                         (blocker / "export", "files cannot be written in")):
        assert main(["export", f"run={trained_run}", f"out={out}"]) == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_predict_rejects_short_or_wrong_input(trained_run, tmp_path, capsys):
    frame, _ = ar_frame(n_samples=5)
    frame.to_csv(tmp_path / "short.csv", index=False)
    assert main(["predict", f"model={trained_run / 'export'}", f"input={tmp_path / 'short.csv'}"]) == 2
    assert "has 5 rows" in capsys.readouterr().err
    frame, _ = ar_frame(n_samples=20)
    frame.rename(columns={"y": "z"}).to_csv(tmp_path / "wrong.csv", index=False)
    assert main(["predict", f"model={trained_run / 'export'}", f"input={tmp_path / 'wrong.csv'}"]) == 2
    assert "lacks the column(s) y" in capsys.readouterr().err
    assert not (tmp_path / "short.forecast.csv").exists() and not (tmp_path / "wrong.forecast.csv").exists()
