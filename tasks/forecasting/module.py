"""The forecasting LightningModule: MSE training, AR-Net's sparsity regulariser, the field's
metrics on the normalised scale and in original units, baselines on the same windows, plots."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seqapps.tasks import plotting
from seqapps.tasks.base import SeqappsModule, StandardisedExport, raw_series_example
from seqapps.tasks.build import to_plain
from seqapps.tasks.forecasting.baselines import SeasonalNaive, classic_ar
from seqapps.tasks.forecasting.metrics import forecast_metrics, stpe
from seqapps.tasks.forecasting.model import ScaledForecaster, sparsity_lambda


class ForecastModule(StandardisedExport, SeqappsModule):
    """Train a forecaster ``x [B, seq_len, C_in] -> [B, pred_len, C_out]`` on scaled windows.

    Args:
        regularizer: AR-Net's sparsity regulariser, ``{sparsity: s, c_lambda: 0.02, c1: 3,
            c2: 3, start: 0.2}``: weight ``λ = c_λ (1/s - 1)``, switched on after the first
            ``start`` fraction of the epochs. ``sparsity: null`` turns it off.
        baselines: score these on the test windows too: ``seasonal_naive`` (with
            ``seasonal_period``) and ``classic_ar`` (least squares on the training windows).
    """

    predictor = "seqapps.tasks.forecasting.predict.forecast_csv"
    export_wrapper = ScaledForecaster

    def __init__(self, net: Mapping, optimizer: Mapping, scheduler: Mapping | None = None,
                 freeze: str = "full", regularizer: Mapping | None = None,
                 baselines: tuple[str, ...] = ("seasonal_naive", "classic_ar"),
                 seasonal_period: int = 24):
        super().__init__(net, optimizer, scheduler, freeze)
        self.save_hyperparameters({"regularizer": to_plain(regularizer or {}), "baselines": list(baselines),
                                   "seasonal_period": seasonal_period})
        self.val_metrics = forecast_metrics("val/")
        self.test_rows: dict[str, nn.Module] = {}
        self.test_metrics = nn.ModuleDict()
        self.coefficient_report: dict[str, float] = {}

    # -- regulariser
    def regularizer_weight(self) -> float:
        reg = self.hparams.regularizer
        if not reg or reg.get("sparsity") is None or not hasattr(self.net, "sparsity_penalty"):
            return 0.0
        max_epochs = self.trainer.max_epochs if self._trainer and self.trainer.max_epochs else 1
        if self.current_epoch < reg.get("start", 0.2) * max_epochs:
            return 0.0
        return sparsity_lambda(reg["sparsity"], reg.get("c_lambda", 0.02))

    def training_step(self, batch, batch_idx):
        x, y = batch
        # a net may train otherwise than it forecasts (Chimera's closed loop: teacher forcing, whose
        # train/mse, like AutoTimes', is of forecasts made from the true past segments)
        loss = self.net.training_loss(x, y) if hasattr(self.net, "training_loss") else F.mse_loss(self.net(x), y)
        self._log_epoch("train/mse", loss, len(x), prog_bar=True)
        weight = self.regularizer_weight()
        if weight > 0:
            reg = self.hparams.regularizer
            penalty = self.net.sparsity_penalty(reg.get("c1", 3.0), reg.get("c2", 3.0))
            loss = loss + weight * penalty
            self._log_epoch("train/sparsity_penalty", penalty, len(x))
        self._log_epoch("train/loss", loss, len(x))
        return loss

    def _log_epoch(self, name: str, value: torch.Tensor, batch_size: int, **kwargs) -> None:
        self.log(name, value, on_epoch=True, on_step=False, batch_size=batch_size, sync_dist=True, **kwargs)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_metrics.update(self.net(x).contiguous(), y)  # torchmetrics views its inputs

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True, sync_dist=True)
        self.val_metrics.reset()

    # -- test: the model and the baselines on the same windows, two scales
    def on_test_start(self) -> None:
        rows: dict[str, nn.Module] = {"model": self.net}
        datamodule = self.trainer.datamodule
        pred_len, n_out = datamodule.pred_len, datamodule.n_out
        if "seasonal_naive" in self.hparams.baselines and self.hparams.seasonal_period <= datamodule.seq_len:
            rows["seasonal_naive"] = SeasonalNaive(self.hparams.seasonal_period, pred_len, n_out)
        if "classic_ar" in self.hparams.baselines:
            x, y = datamodule.split_arrays("train")
            rows["classic_ar"] = classic_ar(torch.as_tensor(x), torch.as_tensor(y), n_out).float()
        self.test_rows = rows
        self.test_metrics = nn.ModuleDict({
            f"{name}{suffix}": forecast_metrics() for name in rows for suffix in ("", "_orig")
        }).to(self.device)
        self._coefficient_report(datamodule)

    def _coefficient_report(self, datamodule) -> None:
        """sTPE between learned, least-squares and (when known) true AR coefficients."""
        self.coefficient_report = {}
        truth = getattr(datamodule, "true_coefficients", None)
        if not hasattr(self.net, "coefficients") or len(getattr(self.net, "backbone", ())):
            return  # only the linear AR-Net has coefficients
        learned = self.net.coefficients()[0].cpu().double()  # one step ahead
        if "classic_ar" in self.test_rows:
            ols = self.test_rows["classic_ar"].coefficients()[0].double()
            self.coefficient_report["stpe_model_vs_classic_ar"] = stpe(learned, ols)
        if truth is not None and learned.ndim == 1:
            padded = torch.zeros_like(learned)
            padded[:len(truth)] = torch.as_tensor(truth[:len(learned)])
            self.coefficient_report["stpe_model_vs_true"] = stpe(learned, padded)
            if "classic_ar" in self.test_rows:
                self.coefficient_report["stpe_classic_ar_vs_true"] = stpe(ols, padded)

    def test_step(self, batch, batch_idx):
        x, y = batch
        mean, std = self._target_scale(y)
        for name, model in self.test_rows.items():
            pred = model.to(x.device)(x).contiguous()
            self.test_metrics[name].update(pred, y)
            self.test_metrics[f"{name}_orig"].update(pred * std + mean, y * std + mean)

    def on_test_epoch_end(self) -> None:
        out = {}
        for key, collection in self.test_metrics.items():
            name, orig = (key[:-5], "_orig") if key.endswith("_orig") else (key, "")
            for metric, value in collection.compute().items():
                out[f"test/{name}/{metric}{orig}"] = value
            collection.reset()
        for key, value in self.coefficient_report.items():
            out[f"test/{key}"] = torch.tensor(value)
        self.log_dict(out, sync_dist=True)

    def _target_scale(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_out = y.shape[-1]
        mean = torch.tensor(self.data_info["mean"][-n_out:], device=y.device, dtype=y.dtype)
        std = torch.tensor(self.data_info["std"][-n_out:], device=y.device, dtype=y.dtype)
        return mean, std

    def predict_step(self, batch, batch_idx):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        mean, std = self._target_scale(torch.zeros(1, 1, self.data_info["n_out"], device=x.device))
        return self.net(x) * std + mean

    # -- export
    def export_extra(self) -> dict:
        return {"n_out": self.data_info["n_out"]}

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        info = self.data_info
        return raw_series_example(info["seq_len"], info["n_in"], info["mean"], info["std"])

    def io_names(self) -> tuple[list[str], list[str]]:
        return ["history"], ["forecast"]

    # -- plots
    @torch.no_grad()
    def make_plots(self, datamodule, folder: str | Path) -> list[Path]:
        folder = Path(folder)
        paths = [self._forecast_plot(datamodule, folder / "forecast.png")]
        if hasattr(self.net, "coefficients") and not len(getattr(self.net, "backbone", [])):
            paths.append(self._coefficient_plot(datamodule, folder / "coefficients.png"))
        return paths

    def _forecast_plot(self, datamodule, path: Path) -> Path:
        x, y = datamodule.split_arrays("test")
        i = len(x) - 1  # the last test window
        model = self.export_module().eval().cpu()
        info = self.data_info
        mean, std = np.asarray(info["mean"]), np.asarray(info["std"])
        history = x[i] * std + mean
        pred = model(torch.as_tensor(history, dtype=torch.float32)[None])[0].numpy()
        truth = y[i] * std[-info["n_out"]:] + mean[-info["n_out"]:]
        fig, ax = plotting.new_figure()
        seq_len, pred_len = len(history), len(truth)
        t_hist, t_future = np.arange(-seq_len, 0), np.arange(pred_len)
        ax.plot(t_hist, history[:, -1], color="0.3", label="history")
        ax.plot(t_future, truth[:, -1], color="tab:green", label="truth")
        ax.plot(t_future, pred[:, -1], color="tab:red", linestyle="--", label="forecast")
        ax.axvline(0, color="0.7", linewidth=0.8)
        ax.set_xlabel("steps from the forecast origin")
        ax.set_ylabel(info["target"])
        ax.set_title(f"{type(self.net).__name__} on {info['source']}: last test window")
        ax.legend(loc="upper left")
        return plotting.save(fig, path)

    def _coefficient_plot(self, datamodule, path: Path) -> Path:
        learned = self.net.coefficients()[0].cpu().numpy()
        learned = learned if learned.ndim == 1 else learned[:, -1]
        fig, ax = plotting.new_figure()
        lags = np.arange(1, len(learned) + 1)
        ax.bar(lags, learned, color="tab:blue", label="AR-Net (1 step ahead)")
        truth = getattr(datamodule, "true_coefficients", None)
        if truth is not None:
            ax.plot(np.arange(1, len(truth) + 1), truth, "o", color="tab:red", label="true")
        ax.axhline(0, color="0.5", linewidth=0.8)
        ax.set_xlabel("lag")
        ax.set_ylabel("coefficient")
        ax.set_title("AR coefficients, lag 1 first")
        ax.legend()
        return plotting.save(fig, path)
