"""``LightningCLI`` of both Lightning packages takes the callback by one class path from a YAML config, and
``--print_config`` round-trips it (``pytorch_lightning`` and the unified ``lightning`` package)."""

from __future__ import annotations

import contextlib
import importlib
import io

import pytest
import torch
import yaml

pytest.importorskip("jsonargparse")

PACKAGES = ["pytorch_lightning", "lightning.pytorch"]


def cli_classes(package: str):
    """A tiny LightningModule and DataModule of ``package`` (a Linear regression on 16 random rows)."""
    pl = importlib.import_module(package)

    class TinyModule(pl.LightningModule):
        def __init__(self, width: int = 4):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Linear(width, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class TinyData(pl.LightningDataModule):
        def train_dataloader(self):
            gen = torch.Generator().manual_seed(0)
            data = torch.utils.data.TensorDataset(torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen))
            return torch.utils.data.DataLoader(data, batch_size=4)

    return pl, TinyModule, TinyData


def write_config(path, tmp_path, checks=None):
    init_args = {"policy": "raise"}
    if checks is not None:
        init_args["checks"] = checks
    config = {"trainer": {
        "max_steps": 3, "accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp_path),
        "callbacks": [{"class_path": "callbacks.lightning.IntegrityCallback", "init_args": init_args}]}}
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(package, args):
    cli_module = importlib.import_module(f"{package}.cli")
    _, module, data = cli_classes(package)
    return cli_module.LightningCLI(module, data, args=args, save_config_callback=None)


@pytest.mark.parametrize("package", PACKAGES)
def test_one_class_path_trains_under_each_packages_cli(tmp_path, package):
    pytest.importorskip(package)
    from callbacks.lightning import IntegrityCallback

    config = write_config(tmp_path / "config.yaml", tmp_path, checks={"hashes": {"every_n_steps": 1}})
    cli = run_cli(package, ["fit", "--config", str(config)])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, IntegrityCallback)]
    assert cli.trainer.global_step == 3
    assert callback.monitor.config.checks.hashes.every_n_steps == 1
    assert [f for f in callback.findings if f.severity != "info"] == []  # the healthy run is clean


@pytest.mark.parametrize("package", PACKAGES)
def test_print_config_round_trips_the_callback(tmp_path, package):
    pytest.importorskip(package)
    config = write_config(tmp_path / "config.yaml", tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exit_info:
        run_cli(package, ["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    dumped = yaml.safe_load(printed.getvalue())
    (entry,) = dumped["trainer"]["callbacks"]
    assert entry["class_path"] == "callbacks.lightning.IntegrityCallback"
    again = tmp_path / "printed.yaml"
    again.write_text(printed.getvalue())
    cli = run_cli(package, ["fit", "--config", str(again)])
    assert cli.trainer.global_step == 3


@pytest.mark.parametrize("package", PACKAGES)
@pytest.mark.parametrize(("checks", "named"), [
    ({"hashez": {"every_n_steps": 1}}, "hashez"),
    ({"hashes": {"every_n_stepz": 1}}, "every_n_stepz"),
    ({"hashes": {"every_n_steps": 0}}, "hashes.every_n_steps"),
])
def test_a_typo_in_checks_is_a_short_cli_error_naming_the_key(tmp_path, package, checks, named):
    pytest.importorskip(package)
    config = write_config(tmp_path / "config.yaml", tmp_path, checks=checks)
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors), pytest.raises(SystemExit) as exit_info:
        run_cli(package, ["fit", "--config", str(config)])
    assert exit_info.value.code == 2  # a usage error before anything is built, not a traceback from __init__
    text = errors.getvalue()
    assert "Traceback" not in text
    error = text[text.index("error:"):]
    assert named in error and "IntegrityCallback" in error
    assert len(error.splitlines()) <= 25


@pytest.mark.parametrize("package", PACKAGES)
def test_cli_help_documents_each_check_option(tmp_path, package):
    pytest.importorskip(package)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit):
        run_cli(package, ["fit", "--trainer.callbacks.help", "callbacks.lightning.IntegrityCallback"])
    text = " ".join(printed.getvalue().split())
    assert "--trainer.callbacks.checks.hashes.every_n_steps" in text
    assert "steps between gradient/parameter hashes" in text  # the option's description, not only its type
    assert "--trainer.callbacks.policy {raise,warn,log}" in text


@pytest.mark.parametrize("package", PACKAGES)
def test_cli_help_of_the_callback_is_plain_text(package):
    pytest.importorskip(package)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit):
        run_cli(package, ["fit", "--trainer.callbacks.help", "callbacks.lightning.IntegrityCallback"])
    text = printed.getvalue()
    assert "``" not in text and ":class:" not in text and ":meth:" not in text
