"""Composing the Hydra configs shipped in ``seqapps.conf`` (a package, so they are found after
a plain wheel install) and turning Hydra's errors into one line each."""

from __future__ import annotations

import os
from pathlib import Path

from seqapps.errors import InputError

CONFIG_MODULE = "seqapps.conf"


def config_dir() -> Path:
    import seqapps.conf

    return Path(seqapps.conf.__file__).parent


def group_options(group: str) -> list[str]:
    """The YAML names in a config group folder (``task``, ``experiment``, ...)."""
    folder = config_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def compose(config_name: str, overrides: list[str]):
    """The composed config (an OmegaConf ``DictConfig``) for a verb, with command-line overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except Exception as err:  # Hydra and OmegaConf raise many types; all are config errors here
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise InputError(describe_config_error(err, overrides)) from None
    finally:
        GlobalHydra.instance().clear()


def describe_config_error(err: Exception, overrides: list[str]) -> str:
    """One line for a Hydra/OmegaConf composition error."""
    text = " ".join(str(err).split())
    cause = err.__cause__ or err.__context__
    cause_text = " ".join(str(cause).split()) if cause else ""
    name = type(err).__name__
    if "Could not override" in text or "not in struct" in cause_text:
        key = text.split("'")[1] if "'" in text else "?"
        return (f"unknown config option '{key}'; see the options with `--cfg job`, or add a new key "
                f"with a leading '+' (+{key}=...)")
    if name == "MissingConfigException" or "Could not find" in text:
        group = text.split("'")[1] if "'" in text else ""
        options = group_options(group.split("/")[0]) if group else []
        hint = f"; available: {', '.join(options)}" if options else ""
        return f"{text.split('Available options')[0].strip().rstrip('.')}{hint}"
    if name == "OverrideParseException":
        return f"cannot parse the override ({text}); write key=value, e.g. trainer.max_epochs=5"
    return f"bad config: {text}" + (f" ({cause_text})" if cause_text and cause_text not in text else "")
