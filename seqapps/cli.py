"""The ``seqapps`` command: ``seqapps <verb> [key=value ...] [--cfg job] [--help]``.

Each verb composes ``conf/<verb>.yaml`` with Hydra overrides and runs. Bad input (a missing
file, an unknown option, bad data) ends with one line on stderr and exit code 2; set
``HYDRA_FULL_ERROR=1`` for the traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from seqapps.errors import InputError

USAGE = """usage: seqapps <verb> [key=value ...] [--cfg job|all] [--resolve] [--help]

verbs:
  train      fit from a Hydra config; writes a run folder (checkpoints, metrics, plots, export)
  evaluate   test metrics of a checkpoint (run=<run folder> or ckpt=<file>) as a table and JSON
  finetune   train from pretrained weights (pretrained=<run|ckpt|export>) with a freezing policy
  export     a checkpoint -> an export folder (config.yaml, model.safetensors, model.onnx, card)
  predict    run an export folder or checkpoint on a CSV (model=... input=...)
  bench      speed and memory of the kernels' backends against SDPA, matmul, mambapy, fla
  list       what can be built: tasks, experiments, trainers

examples:
  seqapps train
  seqapps train experiment=arnet_sparse_ar trainer.max_epochs=5
  seqapps train data.path=my.csv data.target=OT data.seq_len=96 data.pred_len=24
  seqapps export run=runs/<run>
  seqapps predict model=runs/<run>/export input=my.csv
  seqapps train --cfg job          # print the composed config and exit
"""


def _train(cfg):  # train and finetune: finetune.yaml adds `pretrained`
    from seqapps.train import run_train

    run_train(cfg)


def _evaluate(cfg):
    from seqapps.evaluate import run_evaluate

    run_evaluate(cfg)


def _export(cfg):
    from seqapps.export import export_checkpoint
    from seqapps.runs import expect_writable, resolve_checkpoint

    ckpt = resolve_checkpoint(cfg.run, cfg.ckpt, cfg.which)
    out = expect_writable(cfg.out or ckpt.resolve().parent.parent / "export", "out", folder=True)
    summary = export_checkpoint(ckpt, out, tolerance=cfg.tolerance)
    print(f"exported {ckpt} -> {summary['folder']} ({summary['parameters']:,} parameters; "
          f"ONNX vs PyTorch largest difference {summary['onnx_max_diff']:.2e}"
          f"{'; step.onnx for streaming' if summary.get('step') else ''})")


def _bench(cfg):
    from seqapps.bench import markdown, run_bench, write_result
    from seqapps.runs import expect_writable
    from seqapps.tasks.build import to_plain

    options = to_plain(cfg)
    out = expect_writable(options.pop("out"), "out")
    result = run_bench(**options)
    print(markdown(result))
    print(f"written: {write_result(result, out)} (and .md)")


def _predict(cfg):
    from seqapps.predict import run_predict

    run_predict(cfg)


VERBS: dict[str, Callable] = {"train": _train, "evaluate": _evaluate, "finetune": _train,
                              "export": _export, "predict": _predict, "bench": _bench}


def run_list() -> None:
    from seqapps.config import config_dir, group_options

    for group in ("task", "experiment", "trainer", "callbacks", "logger"):
        print(f"{group}:")
        for name in group_options(group):
            first = (config_dir() / group / f"{name}.yaml").read_text().splitlines()
            doc = next((line.lstrip("# ").strip() for line in first
                        if line.startswith("#") and "@package" not in line), "")
            print(f"  {name:<22} {doc}")
    try:
        from seqapps.backbones import available_mixers
    except ImportError:
        return
    print("mixers:\n  " + ", ".join(available_mixers()))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    verb, args = argv[0], argv[1:]
    try:
        if verb == "list":
            run_list()
            return 0
        if verb not in VERBS:
            raise InputError(f"unknown verb '{verb}'; use one of {', '.join([*VERBS, 'list'])} "
                             "(seqapps --help)")
        if "-h" in args or "--help" in args:
            print(USAGE)
            print(f"config of '{verb}': conf/{verb}.yaml; groups: task, trainer, callbacks, logger, "
                  "paths, experiment (seqapps list); print it with --cfg job")
            return 0
        cfg_mode, resolve, overrides = _flags(args)
        from seqapps.config import compose

        cfg = compose(verb, overrides)
        if cfg_mode:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(cfg, resolve=resolve))
            return 0
        VERBS[verb](cfg)
        return 0
    except InputError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"seqapps {verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"seqapps {verb}: interrupted", file=sys.stderr)
        return 130


def _flags(args: list[str]) -> tuple[str | None, bool, list[str]]:
    cfg_mode, resolve, overrides = None, False, []
    it = iter(args)
    for arg in it:
        if arg in ("--cfg", "-c"):
            cfg_mode = next(it, "job")
            if cfg_mode not in ("job", "all"):
                raise InputError(f"--cfg {cfg_mode}: use --cfg job (or all)")
        elif arg == "--resolve":
            resolve = True
        elif arg.startswith("-"):
            raise InputError(f"unknown flag '{arg}'; flags are --cfg job, --resolve, --help; "
                             "config changes are key=value")
        else:
            overrides.append(arg)
    return cfg_mode, resolve, overrides


if __name__ == "__main__":
    sys.exit(main())
