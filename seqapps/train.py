"""``seqapps train`` and ``seqapps finetune``: fit a task from a composed config.

Everything that can fail on bad input (the data, the model spec, the pretrained weights) is
checked before the run folder is created, so a bad command leaves no folder behind and
writes nothing into an existing one.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf, open_dict

from seqapps.errors import InputError
from seqapps.report import print_metrics
from seqapps.runs import RUN_DIR_ENV, AtomicCheckpointIO, RNGState, new_run_dir, write_json


FROM_DATA = "from_data"


def fill_from_data(net_cfg: DictConfig, info: dict) -> None:
    """Net options set to ``from_data`` take the value of the same name from the data's ``info()``."""
    for key, value in list(net_cfg.items()):
        if value == FROM_DATA:
            if key not in info:
                raise InputError(f"module.net.{key}={FROM_DATA}, but the data does not provide '{key}' "
                                 f"(it provides {', '.join(sorted(info))}); set it explicitly")
            net_cfg[key] = info[key]


def instantiate(node, **kwargs):
    """``hydra.utils.instantiate``, with a bad option turned into one line naming the node."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, InputError):
            raise cause from None
        detail = " ".join(str(cause or err).split())
        raise InputError(f"cannot build {node.get('_target_', 'an object')}: {detail}") from None


def build_data_and_module(cfg: DictConfig):
    """Instantiate and check the datamodule, then the module (``from_data`` options filled)."""
    datamodule = instantiate(cfg.data)
    datamodule.load()
    fill_from_data(cfg.module.net, datamodule.info())
    module = instantiate(cfg.module)
    return datamodule, module


def load_pretrained(module, source: str) -> dict:
    """Weights from a run folder, a checkpoint or an export folder into ``module.net``."""
    from seqapps.runs import load_checkpoint_dict, resolve_checkpoint
    from seqapps.tasks.freezing import load_matching

    path = Path(source)
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(path / "model.safetensors"))
        prefix = "net." if any(k.startswith("net.") for k in state) else ""
    elif path.is_dir() or path.is_file():
        ckpt = resolve_checkpoint(str(path), None, option="pretrained") if path.is_dir() else path
        state, prefix = load_checkpoint_dict(ckpt)["state_dict"], "net."
    else:
        raise InputError(f"pretrained: nothing at '{source}'; give a run folder, a .ckpt file or "
                         "an export folder")
    net_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return load_matching(module.net, net_state)


def check_run_options(cfg: DictConfig) -> None:
    """One line for a seed that is not an integer, or a trainer limit that trains nothing
    (``max_epochs=0`` or ``max_steps=0`` left a run folder without a checkpoint behind)."""
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise InputError(f"seed={cfg.seed!r}; expected an integer")
    for limit in ("max_epochs", "max_steps"):
        value = cfg.trainer.get(limit)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value == 0 or value < -1):
            raise InputError(f"trainer.{limit}={value!r}; expected a positive integer (or -1: no limit)")


def run_train(cfg: DictConfig) -> Path:
    """Fit ``cfg`` (``train.yaml``, or ``finetune.yaml`` whose ``pretrained`` names the weights
    to start from); returns the run folder."""
    import lightning as L

    check_run_options(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    resume = cfg.ckpt_path
    if resume and not Path(resume).is_file():
        raise InputError(f"ckpt_path: no checkpoint at '{resume}'; give runs/<run>/checkpoints/last.ckpt")
    datamodule, module = build_data_and_module(cfg)
    if cfg.get("pretrained"):
        report = load_pretrained(module, cfg.pretrained)
        print(f"finetune: loaded {len(report['loaded'])} tensors from {cfg.pretrained}; "
              f"new: {', '.join(report['reinitialised']) or 'none'}; freeze={cfg.module.freeze} "
              f"({module.freeze_counts['trainable']:,} trainable, {module.freeze_counts['frozen']:,} frozen)")

    # Only now, with everything checked, decide on the run folder; it is created once the
    # trainer, its callbacks and loggers are built.
    name = cfg.get("experiment_name") or cfg.get("task_name") or "run"
    if os.environ.get(RUN_DIR_ENV) and int(os.environ.get("LOCAL_RANK", "0")) > 0:
        run_dir = Path(os.environ[RUN_DIR_ENV])  # a DDP worker: its launcher chose the folder
    elif resume:
        run_dir = Path(resume).resolve().parent.parent
    elif cfg.paths.run_dir:  # chosen by the user, e.g. the same for every process of torchrun
        run_dir = Path(cfg.paths.run_dir)
        if int(os.environ.get("RANK", "0")) == 0 and (run_dir / "config.yaml").exists():
            raise InputError(f"paths.run_dir: '{run_dir}' already holds a run; give a new folder, "
                             "or ckpt_path=<its last.ckpt> to resume it")
    else:
        run_dir = new_run_dir(cfg.paths.runs, name)
    with open_dict(cfg):
        cfg.paths.run_dir = str(run_dir)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None] + [RNGState()]
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = [instantiate(c) for c in cfg.logger.values() if c is not None]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers,
                          plugins=[AtomicCheckpointIO()], default_root_dir=str(run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    if trainer.is_global_zero and not resume:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    os.environ[RUN_DIR_ENV] = str(run_dir)  # inherited by the processes DDP launches
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
    if not trainer.is_global_zero:
        return run_dir

    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path or checkpoint.last_model_path
    metrics = {}
    if cfg.test and trainer.world_size == 1:
        metrics = {k: float(v) for k, v in trainer.test(module, datamodule=datamodule, ckpt_path=best,
                                                         verbose=False)[0].items()}
        write_json(run_dir / "test_metrics.json", metrics)
        print_metrics(metrics, title=f"test metrics ({Path(best).name})")
        for path in module.make_plots(datamodule, run_dir / "plots"):
            print(f"plot: {path}")
    if cfg.export:
        from seqapps.export import export_checkpoint

        summary = export_checkpoint(best, run_dir / "export", metrics=metrics)
        print(f"export: {summary['folder']} (ONNX vs PyTorch: {summary['onnx_max_diff']:.2e})")
    print(f"run folder: {run_dir}")
    return run_dir
