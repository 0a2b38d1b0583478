"""Lightning loggers from the `logger` config group (W&B offline by default, CSV), all writing into the run dir."""
from __future__ import annotations

import json
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


def read_offline_history(run_file: str | Path) -> list[dict]:
    """The history rows (one dict per logged step) of an offline W&B run file (`run-<id>.wandb`).

    The file is a LevelDB-style log (7-byte file header, 32 KiB blocks, records with a 7-byte header
    crc32/length/type and FULL|FIRST|MIDDLE|LAST chunks) of wandb's protobuf `Record`s. Lets tests and reports read
    what an offline run logged without uploading it.
    """
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, chunk, rows = Path(run_file).read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too small for a header: skip to the next block
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # a record still being written: stop at the last whole one
            break
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = pb.Record()
            rec.ParseFromString(chunk)
            chunk = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in rec.history.item})
        elif kind == 0:  # zero padding up to the end of the block
            pos += block - pos % block
    return rows
