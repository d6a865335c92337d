"""``seqapps evaluate``: the test metrics of a checkpoint, printed as a table and saved as JSON."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from seqapps.report import print_metrics
from seqapps.runs import load_checkpoint_dict, load_module, resolve_checkpoint, write_json


def run_evaluate(cfg: DictConfig) -> dict[str, float]:
    import lightning as L

    from seqapps.tasks.build import locate

    ckpt = resolve_checkpoint(cfg.run, cfg.ckpt, cfg.which)
    raw = load_checkpoint_dict(ckpt)
    data_args = dict(raw.get("datamodule_hyper_parameters", {}))
    data_args.update({k: v for k, v in cfg.data.items() if v is not None})
    datamodule = locate(raw["seqapps"]["datamodule"])(**data_args)
    datamodule.load()
    module = load_module(ckpt)
    trainer = L.Trainer(accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    metrics = {k: float(v) for k, v in trainer.test(module, datamodule=datamodule, verbose=False)[0].items()}
    out = Path(cfg.out) if cfg.out else ckpt.resolve().parent.parent / "evaluation.json"
    write_json(out, {"checkpoint": str(ckpt), "data": data_args, "metrics": metrics})
    print_metrics(metrics, title=f"test metrics: {ckpt}")
    print(f"written: {out}")
    return metrics
