"""Lightning loggers from the `logger` config group (W&B offline by default, CSV), all writing into the run dir."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def build_loggers(cfg: DictConfig, out: Path, name: str) -> list:
    """Instantiate every logger under cfg.logger; unset save_dir/name/config are filled from the run."""
    from hydra.utils import instantiate

    loggers = []
    for spec in (cfg.logger or {}).values():
        if spec is None:
            continue
        fill = {"save_dir": str(out)}
        if "Wandb" in spec.get("_target_", ""):
            fill.update(name=name, config=OmegaConf.to_container(cfg, resolve=True))
        spec = OmegaConf.to_container(spec, resolve=True)
        spec.update({k: v for k, v in fill.items() if spec.get(k) is None})
        loggers.append(instantiate(spec, _recursive_=False, _convert_="all"))  # W&B's `config` holds other _target_ nodes
    return loggers


def wandb_logger(loggers: list):
    """The WandbLogger among `loggers`, or None."""
    return next((lg for lg in loggers if type(lg).__name__ == "WandbLogger"), None)
