"""``seqapps export``: a checkpoint -> a self-contained export folder.

The folder is written under a temporary name and renamed into place when complete, so a
failed export (an ONNX graph that disagrees with PyTorch, say) leaves nothing half-written.
"""

from __future__ import annotations

import inspect
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

import seqapps
from seqapps.errors import InputError
from seqapps.runs import load_module


def export_checkpoint(ckpt: str | Path, out: str | Path, tolerance: float = 1e-4,
                      metrics: dict | None = None) -> dict:
    """Write ``config.yaml``, ``model.safetensors``, ``model.onnx`` (checked against PyTorch
    with onnxruntime) and ``README.md`` for ``ckpt`` into the folder ``out``.

    Returns a summary: the folder, the largest ONNX difference, the parameter count.
    """
    module = load_module(ckpt)
    model = module.export_module().eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        inputs = module.example_inputs()
        input_names, output_names = module.io_names()
        max_diff = export_onnx(model, inputs, tmp / "model.onnx", input_names, output_names)
        if not max_diff <= tolerance:
            raise InputError(f"ONNX export disagrees with PyTorch: largest difference {max_diff:.3g} "
                             f"> tolerance {tolerance:g}; nothing was written")
        n_params = sum(p.numel() for p in model.parameters())
        config = {
            "seqapps_version": seqapps.__version__,
            "model": module.export_spec(),
            "data": module.data_info,
            "predictor": module.predictor,
            "inputs": {n: [None, *t.shape[1:]] for n, t in zip(input_names, inputs)},
            "outputs": output_names,
            "parameters": n_params,
            "onnx_max_abs_diff": max_diff,
            "checkpoint": str(Path(ckpt).resolve()),
            "metrics": metrics or {},
        }
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (tmp / "README.md").write_text(model_card(config))
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"folder": str(out), "onnx_max_abs_diff": max_diff, "parameters": n_params}


def export_onnx(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], path: Path,
                input_names: list[str], output_names: list[str]) -> float:
    """Export with a dynamic batch dimension; return the largest |onnxruntime - PyTorch| on
    inputs of another batch size than the traced one."""
    import onnxruntime as ort

    dynamic = batch_dynamic_shapes(model, len(inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, str(path), input_names=input_names,
                          output_names=output_names, dynamo=True, dynamic_shapes=dynamic,
                          external_data=False, verbose=False)
    check = tuple(torch.cat([t, t[:1] * 0.5]) for t in inputs)  # batch size + 1
    with torch.no_grad():
        expected = model(*check)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {n: t.numpy() for n, t in zip(input_names, check)})
    return max(float(np.max(np.abs(g - e.numpy()))) for g, e in zip(got, expected))


def batch_dynamic_shapes(model: torch.nn.Module, n_inputs: int) -> tuple:
    """``dynamic_shapes`` marking dim 0 of every input as the batch, laid out as ``forward``'s
    signature (a ``*state`` parameter takes a nested tuple, as ``torch.export`` wants)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    specs: list = []
    for param in inspect.signature(model.forward).parameters.values():
        if param.kind is param.VAR_POSITIONAL:
            specs.append(tuple({0: batch} for _ in range(n_inputs - len(specs))))
            break
        if len(specs) < n_inputs:
            specs.append({0: batch})
    return tuple(specs)


def replace_folder(new: Path, out: Path) -> None:
    """Move the complete folder ``new`` to ``out``, replacing an older export there."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        new.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(out)


def model_card(config: dict) -> str:
    data, model = config["data"], config["model"]
    net = model.get("net", model)
    lines = [
        f"# {net['_target_'].rsplit('.', 1)[-1]} — exported by seqapps {config['seqapps_version']}",
        "",
        f"- Model: `{model['_target_']}` ({config['parameters']:,} parameters)",
        f"- Data: {data.get('source')} — columns {', '.join(map(str, data.get('columns', [])))}; "
        f"target `{data.get('target')}`; features `{data.get('features')}`",
        f"- Input `{next(iter(config['inputs']))}`: {config['inputs']} (raw units; scaling is inside)",
        f"- Output: {config['outputs']} — the next {data.get('pred_len')} steps",
        f"- ONNX checked against PyTorch with onnxruntime: largest difference {config['onnx_max_abs_diff']:.2e}",
        "",
        "## Metrics (test split)",
        "",
    ]
    metrics = config.get("metrics") or {}
    lines += [f"- `{k}`: {v:.4f}" for k, v in sorted(metrics.items())] or ["- (not measured)"]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import seqapps, torch",
        "model = seqapps.load('this/folder')      # plain PyTorch, no Lightning or Hydra",
        f"forecast = model(history)               # history: [batch, {data.get('seq_len')}, {data.get('n_in')}]",
        "```",
        "",
        "or with onnxruntime: `InferenceSession('model.onnx').run(None, {'history': x})`.",
        "",
        "Model specification:",
        "",
        "```json",
        json.dumps(net, indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)
