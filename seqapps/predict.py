"""``seqapps predict``: run an export folder, a run folder or a checkpoint on a file."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from seqapps.errors import InputError
from seqapps.runs import atomic_write_text


def load_for_predict(source: str):
    """``(model, data_info, predictor path)`` from an export folder, run folder or checkpoint.
    ``data_info["test_metrics"]`` holds the run's test metrics (empty when it was not tested),
    e.g. the anomaly threshold."""
    path = Path(source)
    if (path / "model.safetensors").is_file():
        from seqapps.hub import load

        model = load(path)
        info = {**model.seqapps_config["data"], "test_metrics": model.seqapps_config.get("metrics") or {}}
        return model, info, model.seqapps_config.get("predictor")
    if path.is_dir() or path.is_file():
        from seqapps.runs import load_module, resolve_checkpoint, run_test_metrics

        ckpt = resolve_checkpoint(str(path), None, option="model") if path.is_dir() else path
        module = load_module(ckpt)
        info = {**module.data_info, "test_metrics": run_test_metrics(ckpt)}
        return module.export_module().eval(), info, module.predictor
    raise InputError(f"model: nothing at '{source}'; give an export folder, a run folder or a .ckpt file")


def run_predict(cfg: DictConfig) -> Path:
    from seqapps.tasks.build import locate

    model, info, predictor = load_for_predict(cfg.model)
    if not predictor:
        raise InputError(f"model: '{cfg.model}' names no predictor, so it cannot run on files")
    predict = locate(predictor)
    result = predict(model, info, cfg.input)
    out = Path(cfg.output) if cfg.output else Path(cfg.input).with_suffix(predict.output_suffix)
    atomic_write_text(out, result.to_csv(index=False))
    print(result.to_string(index=False, max_rows=12))
    print(f"written: {out}")
    return out
