"""Dataset mixer with open-instruct's semantics (utils.py:174 `get_datasets` @e363290).

`--dataset_mixer_list name1 1.0 name2 5000` (or the JSON dict form `{"name1": 1.0, "name2": 5000}`):
a value containing "." is a fraction of that dataset, otherwise a row count (`1` alone is the whole
dataset, not one row, as the original read it unless another value was a count). Each source is
shuffled with seed 42, the first int(frac·len) (or count) rows are taken, and the sources are
concatenated in the order given. Sources: the embedded synthetic sets (`tulu/synth-*`), local
`.jsonl`/`.json`/`.parquet` files or folders of them, `save_to_disk` folders, and hub names.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import datasets

from tulu import synth
from tulu.chat import DataError

MIX_SEED = 42  # open-instruct get_datasets: dataset.shuffle(seed=42)
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def training_mixer(mixer_list: list[str] | None, mixer: str | None, embedded: str) -> tuple[dict, bool]:
    """(the training mixture the flags give, True), or ({embedded: 1.0}, False) when they give none:
    the embedded default's synthetic set (whose held-out set the scripts then evaluate on)."""
    if mixer_list is None and mixer is None:
        return {embedded: 1.0}, False
    return parse_mixer(mixer_list, mixer), True


def parse_mixer(mixer_list: list[str] | None = None, mixer: str | dict | None = None) -> dict[str, float | int]:
    """{source: fraction (float) or count (int)} from the list or the JSON form (exactly one given)."""
    if (mixer_list is None) == (mixer is None):
        raise ValueError("give exactly one of --dataset_mixer_list and --dataset_mixer")
    if mixer is not None:
        spec = json.loads(mixer) if isinstance(mixer, str) else dict(mixer)
        items = [(k, str(v)) for k, v in spec.items()]
    else:
        if len(mixer_list) % 2:
            raise ValueError(f"--dataset_mixer_list needs name/value pairs, got {len(mixer_list)} items: {mixer_list}")
        items = list(zip(mixer_list[::2], mixer_list[1::2]))
    out: dict[str, float | int] = {}
    for name, value in items:
        try:
            out[name] = float(value) if "." in value or "e" in value.lower() else int(value)
        except ValueError:
            raise ValueError(f"dataset {name!r}: mixer value {value!r} is neither a fraction nor a count") from None
        if isinstance(out[name], float) and not 0 < out[name] <= 1:
            raise ValueError(f"dataset {name!r}: fraction {value} must be in (0, 1] (an integer is a row count)")
        if isinstance(out[name], int) and out[name] <= 0:
            raise ValueError(f"dataset {name!r}: row count {value} must be positive")
        if out[name] == 1:  # `1` is the whole dataset, as in the original whenever no value is a count > 1
            out[name] = 1.0
    return out


def write_rows(rows: list[dict], dst: str | Path) -> Path:
    """Rows as JSON lines (one object a line): a local dataset this module reads back by path."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dst


def _read_json_file(path: Path) -> list[dict]:
    """Rows of a .jsonl (one object per line) or .json (a list of objects) file, with line numbers in errors."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}, line {lineno}: unreadable JSON ({e.msg})") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}, row {i}: expected a JSON object, got {type(row).__name__}")
    return rows


def _load_local(path: Path) -> datasets.Dataset:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            return datasets.load_from_disk(str(path))
        files = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES)
        if not files:
            raise DataError(f"{path}: folder holds no {'/'.join(DATA_SUFFIXES)} files")
        parts = [_load_local(f) for f in files]
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if path.suffix == ".parquet":
        return datasets.Dataset.from_parquet(str(path))
    rows = _read_json_file(path)
    # from_list takes its columns from the first row only: give every row every key (None if absent).
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return datasets.Dataset.from_list([{k: row.get(k) for k in keys} for row in rows])


def load_source(name: str, split: str = "train") -> datasets.Dataset:
    """One source as a Dataset: embedded synthetic name, local file/folder, or hub dataset."""
    if name in synth.NAMES:
        return datasets.Dataset.from_list(synth.make_rows(name))
    path = Path(name)
    if path.exists():
        return _load_local(path)
    if path.suffix in DATA_SUFFIXES or name.startswith((".", "/")):
        raise FileNotFoundError(f"dataset {name!r}: no such file or folder")
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:
        raise FileNotFoundError(f"dataset {name!r}: not an embedded name ({', '.join(synth.NAMES)}), "
                                f"not a local path, and the hub load failed ({type(e).__name__}: {e})") from e


def select(ds: datasets.Dataset, name: str, amount: float | int, shuffle: bool = True) -> datasets.Dataset:
    """Give every row a string `id` ({name}_{i} where missing) and its position in the source
    (`_row`, for error messages), shuffle with seed 42, take the fraction or count."""
    if "id" not in ds.column_names:
        ds = ds.add_column("id", [f"{name}_{i}" for i in range(len(ds))])
    elif ds.features["id"] != datasets.Value("string") or None in ds["id"]:  # e.g. integer ids, or some missing
        ids = [f"{name}_{i}" if v is None else str(v) for i, v in enumerate(ds["id"])]
        ds = ds.remove_columns("id").add_column("id", ids)
    ds = ds.add_column("_row", list(range(len(ds))))
    if shuffle:
        ds = ds.shuffle(seed=MIX_SEED)
    n = int(amount * len(ds)) if isinstance(amount, float) else amount
    if n > len(ds):
        raise DataError(f"dataset {name!r}: mixer asks for {n} rows but it has {len(ds)}")
    return ds.select(range(n))


def load_mixture(mixer: dict[str, float | int], split: str = "train", shuffle: bool = True,
                 mix_dir: str | None = None) -> list[tuple[str, datasets.Dataset]]:
    """[(source name, its selected rows)] in mixer order; with mix_dir, the mixed raw rows are also
    written to {mix_dir}/mixed_ds_{split}.jsonl (inside the folder: the original concatenated the
    path strings, which wrote a sibling file; listed as a deviation)."""
    parts = [(name, select(load_source(name, split), name, amount, shuffle)) for name, amount in mixer.items()]
    if mix_dir:
        os.makedirs(mix_dir, exist_ok=True)
        out = Path(mix_dir) / f"mixed_ds_{split}.jsonl"
        with open(out, "w", encoding="utf-8") as f:
            for _, ds in parts:
                for row in ds.remove_columns("_row"):
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return parts


def fingerprint(mixer: dict[str, float | int], split: str) -> str:
    """What identifies the mixed data for caching: names, amounts, and each local file's size and mtime."""
    parts = []
    for name, amount in mixer.items():
        path = Path(name)
        files = sorted(path.rglob("*")) if path.is_dir() else [path] if path.exists() else []
        stamp = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
        parts.append([name, amount, split, stamp])
    return json.dumps(parts, sort_keys=True)
