"""One result schema for every trial, and the results store built from it.

A trial produces one ResultRecord. The store keeps it as long-form tables, one parquet file per trial per
table (`<sweep>/store/<table>/<trial_id>.parquet`), each written atomically (temp file + rename), so
concurrent trials never share a file and a killed trial never leaves a half file. At scale, `compact` folds
each table's per-trial files into one file, `<sweep>/store/compacted/<table>.parquet` (at the end of a sweep,
by `exitbench store compact`, or by `load` when many files are not folded in yet). `load(sweep_dir)` reads
the compacted rows plus every per-trial file written or rewritten since, with pyarrow's dataset API (only
the tables, columns and rows asked for), into DataFrames:

- runs:    one row per trial: flattened config (`method.name`, `optim.lr`, ...), seed, status (finished,
           failed, or stopped early by the scheduler), error,
           wall time, images/s, versions, git commit, calibration split, MAC counter
- exits:   one row per trial x exit: top1, top5, macs, params
- budgets: one row per trial x budget: p, test_acc, val_acc, expected_macs, exit_fractions, thresholds
- epochs:  one row per trial x epoch: loss, lr, time, images/s, per-exit train loss/acc and val acc
- latency: one row per trial x policy (exit alone or budget) measured by `exitbench latency`: device, ms per
           image (batch 1: mean, p50, p90; batched), images/s, real-exit vs simulated accuracy
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from bench.errors import UsageError

TABLES = ("runs", "exits", "budgets", "epochs", "latency")


class ResultRecord(BaseModel):
    trial_id: str
    sweep: str | None = None
    status: Literal["finished", "failed", "stopped"] = "finished"  # stopped: ended early by the scheduler (ASHA)
    error: str | None = None
    config: dict[str, Any]
    seed: int
    versions: dict[str, str] = Field(default_factory=dict)
    git_commit: str | None = None  # '<sha>-dirty' when tracked files differed from the commit
    machine: dict[str, str] = Field(default_factory=dict)  # device, CPU model, CPU capability, math libraries
    wall_time_s: float = 0.0
    train_images_per_s: float = 0.0
    counter: str | None = None  # MAC counter name and version
    calibration: str = "heldout"
    data_info: dict[str, Any] = Field(default_factory=dict)  # split sizes, val-index hash, where files were
    epochs: list[dict[str, Any]] = Field(default_factory=list)
    exits: list[dict[str, Any]] = Field(default_factory=list)  # exit, top1, top5, macs, params
    budgets: list[dict[str, Any]] = Field(default_factory=list)  # p, test_acc, val_acc, expected_macs, ...
    summary: dict[str, Any] = Field(default_factory=dict)
    latency: list[dict[str, Any]] = Field(default_factory=list)  # bench.evaluate.latency rows, when measured


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 0.1}} -> {'optim.lr': 0.1}; lists become JSON text (parquet-friendly, hashable)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


def to_tables(record: ResultRecord) -> dict[str, pd.DataFrame]:
    ident = {"trial_id": record.trial_id}
    run = {
        **ident,
        "sweep": record.sweep,
        "status": record.status,
        "error": record.error,
        "seed": record.seed,
        "wall_time_s": record.wall_time_s,
        "train_images_per_s": record.train_images_per_s,
        "git_commit": record.git_commit,
        "counter": record.counter,
        "calibration": record.calibration,
        **{f"data.{k}": v for k, v in flatten(record.data_info).items()},
        "versions": json.dumps(record.versions, sort_keys=True),
        **{f"machine.{k}": v for k, v in record.machine.items()},
        **{f"summary.{k}": v for k, v in flatten(record.summary).items()},
        **{f"config.{k}": v for k, v in flatten(record.config).items()},
    }

    def rows(items: list[dict[str, Any]]) -> pd.DataFrame:
        return pd.DataFrame([{**ident, **flatten(item)} for item in items])

    return {"runs": pd.DataFrame([run]), "exits": rows(record.exits), "budgets": rows(record.budgets),
            "epochs": rows(record.epochs), "latency": rows(record.latency)}


def _atomic_write(path: Path, fill: Callable[[BinaryIO], Any]) -> None:
    """Write `path` through `fill(file)` into a temp file beside it, then rename: readers see the old file or
    the whole new one, never a part (a killed writer leaves only a `.<name>.*.tmp`, which readers ignore)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; results are meant to be shared and committed
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _atomic_parquet(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write(record: ResultRecord, sweep_dir: str | Path) -> None:
    """Add (or replace) one trial's rows in the store of `sweep_dir`; the record JSON goes along."""
    store = Path(sweep_dir) / "store"
    for table, df in to_tables(record).items():
        _atomic_parquet(df, store / table / f"{record.trial_id}.parquet")
    atomic_write_text(store / "records" / f"{record.trial_id}.json", record.model_dump_json(indent=1))


@dataclass
class Tables:
    runs: pd.DataFrame
    exits: pd.DataFrame
    budgets: pd.DataFrame
    epochs: pd.DataFrame
    latency: pd.DataFrame = field(default_factory=lambda: pd.DataFrame({"trial_id": []}))

    def __iter__(self):  # `runs, exits, budgets, epochs = load(d)` works as well as `load(d).runs`
        return iter((self.runs, self.exits, self.budgets, self.epochs))


# ------------------------------------------------------------------------------------------- compaction
#
# Per-trial files are the write path (one writer per file, atomic); at scale, opening them one by one is what
# costs (15 ms per trial). `compact` folds each table's per-trial files into one parquet file whose footer
# records which per-trial files it holds: name, size, mtime, inode and a digest of the bytes it read. A
# per-trial file is *held* when its size, mtime and inode are the recorded ones, or (after a copy or a
# checkout changed those) when its size and digest are. Reading takes the compacted rows of held files plus
# the per-trial files that are not held (new, or rewritten since: a resumed trial); the compacted rows of
# rewritten or removed files are left out. The compacted file is thus a cache: reading always equals reading
# every per-trial file, whatever ran in between, and nothing is counted twice.

COMPACTED = "compacted"  # store/compacted/<table>.parquet
MANIFEST_KEY = b"exitbench.compacted_from"  # footer: {"files": {stem: [size, mtime_ns, inode, digest]}, "dir": ...}
QUIET_DIR_S = 2  # a table folder unchanged this long before a compaction can vouch for all its files (see _Plan)
AUTO_COMPACT = 256  # load() compacts a table first when this many of its per-trial files are not held
STALE_TMP_S = 3600  # a compaction temp file this old was left by a killed compaction
ROW_GROUP = 256 * 1024  # rows per row group of a compacted file (the unit that filters can skip)


class CorruptStore(UsageError):
    """A compacted file that cannot be read; the per-trial files it was built from can rebuild it."""


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _trial_files(table_dir: Path) -> dict[str, tuple[int, int, int]]:
    """stem -> (size, mtime_ns, inode) of a table's per-trial files (temp files of running writes excluded)."""
    out = {}
    try:
        with os.scandir(table_dir) as entries:
            for e in entries:
                if e.name.endswith(".parquet") and not e.name.startswith("."):
                    st = e.stat()
                    out[e.name.removesuffix(".parquet")] = (st.st_size, st.st_mtime_ns, st.st_ino)
    except FileNotFoundError:
        pass
    return out


def _compacted_path(sweep_dir: Path, table: str) -> Path:
    return sweep_dir / "store" / COMPACTED / f"{table}.parquet"


def _corrupt(sweep_dir: Path, path: Path, err: BaseException) -> CorruptStore:
    why = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return CorruptStore(f"compacted results file {path} is unreadable ({why}); rebuild it from the per-trial "
                        f"files with `exitbench store compact --rebuild {sweep_dir}`")


@dataclass
class _Compacted:
    path: Path
    schema: pa.Schema
    files: dict[str, list]  # stem -> [size, mtime_ns, inode, digest]
    dir_mtime_ns: int | None  # the table folder's mtime when the compaction began, if it was quiet then

    @classmethod
    def open(cls, sweep_dir: Path, table: str) -> _Compacted | None:
        path = _compacted_path(sweep_dir, table)
        if not path.exists():
            return None
        try:
            schema = pq.read_schema(path)
            manifest = json.loads(schema.metadata[MANIFEST_KEY])
            files, dir_mtime_ns = manifest["files"], manifest.get("dir")
            if not isinstance(files, dict) or not all(isinstance(e, list) and len(e) == 4 for e in files.values()):
                raise ValueError("its list of per-trial files is malformed")
        except (pa.ArrowException, OSError, ValueError, KeyError, TypeError) as err:
            raise _corrupt(sweep_dir, path, err) from err
        return cls(path, schema.remove_metadata(), files, dir_mtime_ns)

    def holds(self, table_dir: Path, stem: str, stat: tuple[int, int, int]) -> str | None:
        """"same" (size, mtime, inode as recorded), "moved" (same bytes under another mtime or inode: copied,
        checked out again), or None (new or rewritten since)."""
        entry = self.files.get(stem)
        if entry is None or entry[0] != stat[0]:
            return None
        if tuple(entry[:3]) == stat:
            return "same"
        try:
            return "moved" if _digest((table_dir / f"{stem}.parquet").read_bytes()) == entry[3] else None
        except FileNotFoundError:
            return None

    def read(self, sweep_dir: Path, **scan) -> pa.Table:
        try:
            return ds.dataset(self.path, format="parquet", schema=scan.pop("schema", self.schema)).to_table(**scan)
        except (pa.ArrowException, OSError) as err:  # a damaged data page shows only when it is read
            raise _corrupt(sweep_dir, self.path, err) from err


@dataclass
class _Plan:
    """Reading one table: the compacted rows minus the `stale` trials, plus the `fresh` per-trial files."""

    compacted: _Compacted | None
    fresh: list[str]  # per-trial files the compacted file does not hold (new or rewritten since), in name order
    stale: list[str]  # trials whose compacted rows are out of date: rewritten or removed since
    moved: dict[str, tuple[int, int, int]]  # held files whose mtime or inode changed (a copy): their stat now

    @classmethod
    def make(cls, sweep_dir: Path, table: str, compacted: _Compacted | None) -> _Plan:
        table_dir = sweep_dir / "store" / table
        # Every write creates and renames a file in the table folder, which moves the folder's mtime: if it has
        # not moved since the compaction began, every file is as compacted, and no file needs a stat (40,000
        # stats for 10,000 trials; each a round trip on NFS).
        vouched = None if compacted is None else compacted.dir_mtime_ns
        if vouched is not None and vouched == _mtime_ns(table_dir):
            return cls(compacted, [], [], {})
        current = _trial_files(table_dir)
        fresh, moved = [], {}
        for stem, stat in current.items():
            held = None if compacted is None else compacted.holds(table_dir, stem, stat)
            if held is None:
                fresh.append(stem)
            elif held == "moved":
                moved[stem] = stat
        fresh.sort(key=lambda s: f"{s}.parquet")  # the order of reading the sorted file names
        rewritten = set(fresh)
        stale = [] if compacted is None else sorted(s for s in compacted.files if s not in current or s in rewritten)
        return cls(compacted, fresh, stale, moved)

    @property
    def current(self) -> bool:
        return self.compacted is not None and not self.fresh and not self.stale


def _read_trial_file(path: Path) -> tuple[pa.Table, list] | None:
    """One per-trial file and its manifest entry [size, mtime_ns, inode, digest], both from the same bytes
    (files are replaced by rename, never changed in place, so an open file is one version); None if it is
    gone."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except FileNotFoundError:  # removed since the scan
        return None
    try:
        table = pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False).replace_schema_metadata(None)
    except pa.ArrowException as err:  # not written by `write` (which never leaves a half file)
        raise UsageError(f"per-trial results file {path} is unreadable ({str(err).splitlines()[0]}); remove it, "
                         f"or run its trial again") from err
    return table, [st.st_size, st.st_mtime_ns, st.st_ino, _digest(data)]


READ_CHUNK = 2000  # per-trial files concatenated into one contiguous table at a time while reading


def _read_trial_files(table_dir: Path, stems: list[str]) -> tuple[pa.Table, dict[str, list]]:
    """The per-trial files still there, concatenated in `stems`' order, and stem -> manifest entry. Threads
    overlap the file opening and parquet decoding of many small files (both release the GIL); every
    READ_CHUNK files are merged into contiguous arrays, so memory holds the rows, not thousands of small
    tables' buffers (what made compacting 10,000 trials take 1.2 GB)."""
    from concurrent.futures import ThreadPoolExecutor

    entries: dict[str, list] = {}
    parts: list[pa.Table] = []
    with ThreadPoolExecutor(min(8, 2 * (os.cpu_count() or 1))) as pool:
        for start in range(0, len(stems), READ_CHUNK):
            chunk = stems[start:start + READ_CHUNK]
            paths = [table_dir / f"{stem}.parquet" for stem in chunk]
            read = map(_read_trial_file, paths) if len(paths) < 64 else pool.map(_read_trial_file, paths,
                                                                                chunksize=64)
            tables = []
            for stem, got in zip(chunk, read):
                if got is not None:
                    tables.append(got[0])
                    entries[stem] = got[1]
            parts.append(_concat(tables).combine_chunks())
    return _concat(parts), entries


def _in_file_order(table: pa.Table) -> pa.Table:
    """Rows in per-trial file-name order (the order of reading the sorted files), kept within a trial."""
    if table.num_rows == 0:
        return table
    trials = pc.dictionary_encode(table["trial_id"]).combine_chunks()  # rank the few trial ids, not every row
    names = sorted(range(len(trials.dictionary)), key=lambda i: f"{trials.dictionary[i].as_py()}.parquet")
    rank = np.empty(len(names), np.int64)
    rank[names] = np.arange(len(names))
    return table.take(np.argsort(rank[trials.indices.to_numpy()], kind="stable"))


def _concat(parts: list[pa.Table]) -> pa.Table:
    """Tables whose columns may differ (trials of other methods have other config fields): missing columns
    become nulls, types are promoted (int64 + float64 -> float64), columns in order of first appearance."""
    parts = [p for p in parts if p.num_columns]
    if not parts:
        return pa.table({})
    return parts[0] if len(parts) == 1 else pa.concat_tables(parts, promote_options="permissive")


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with exactly `schema`'s columns (absent ones null) and types."""
    n = table.num_rows
    return pa.Table.from_arrays([table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(n, f.type)
                                 for f in schema], schema=schema)


def _merge(compacted: pa.Table, fresh: pa.Table) -> pa.Table:
    """Compacted rows (in file order) and fresh rows (in file order) of distinct trials, in file order; a text
    column whose rows are now all null is null-typed again, as in the per-trial files (a trial's `error`
    becomes None when it is resumed and finishes: that column was text only because of it)."""
    if fresh.num_rows == 0:
        merged = compacted
    elif compacted.num_rows == 0:
        merged = fresh
    else:
        merged = _in_file_order(_concat([compacted, fresh]))
    for i, column in enumerate(merged.schema):
        if pa.types.is_large_string(column.type) or pa.types.is_string(column.type):
            if merged.num_rows and merged[column.name].null_count == merged.num_rows:
                merged = merged.set_column(i, pa.field(column.name, pa.null()), pa.nulls(merged.num_rows))
    return merged


@dataclass
class Compaction:
    """What `compact` did to one table."""

    table: str
    trials: int  # per-trial files the compacted file holds now
    read: int  # per-trial files read: new and rewritten ones, or all of them on a rebuild
    dropped: int  # trials whose compacted rows were replaced or removed
    rebuilt: str | None = None  # why the old compacted file could not be used (unreadable): rebuilt
    written: bool = False  # False: it already held every per-trial file as it is


def _mtime_ns(path: Path) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return None


def _quiet_mtime_ns(table_dir: Path, settle: bool = False) -> int | None:
    """The folder's mtime if it has not changed for QUIET_DIR_S, so that no later write can share its clock tick
    (file systems keep mtimes in ticks of 1 ns to 2 s), else None: reads then check every file. `settle`: if it
    changed less than QUIET_DIR_S ago, wait that long once for it to become quiet."""
    mtime = _mtime_ns(table_dir)
    if mtime is None:
        return None
    wait = QUIET_DIR_S - (time.time_ns() - mtime) / 1e9
    if wait >= 0 and settle:
        time.sleep(wait + 0.05)
        return _quiet_mtime_ns(table_dir) if _mtime_ns(table_dir) == mtime else None
    return mtime if wait < 0 else None


def _write_compacted(table: pa.Table, files: dict[str, list], dir_mtime_ns: int | None, path: Path) -> None:
    manifest = {"files": files, "dir": dir_mtime_ns}
    meta = {MANIFEST_KEY: json.dumps(manifest, separators=(",", ":")).encode()}
    if table.num_columns == 0:  # every per-trial file was empty (e.g. the exits of failed trials)
        table = pa.table({"trial_id": pa.array([], pa.large_string())})
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed compaction (not a running one)
        try:
            if time.time() - tmp.stat().st_mtime > STALE_TMP_S:
                tmp.unlink()
        except FileNotFoundError:
            pass
    _atomic_write(path, lambda f: pq.write_table(table.replace_schema_metadata(meta), f, compression="snappy",
                                                 row_group_size=ROW_GROUP))


def _compact_table(sweep_dir: Path, table: str, rebuild: bool = False,
                   settle: bool = False) -> tuple[Compaction, pa.Table | None]:
    """Fold `table`'s per-trial files into its compacted file (atomically). Returns what was done and the whole
    compacted table (None when the file already held every per-trial file and was left as it is)."""
    why = None
    compacted = None
    if not rebuild:
        try:
            compacted = _Compacted.open(sweep_dir, table)
        except CorruptStore as err:
            why = str(err).split(";")[0]
    dir_mtime_ns = _quiet_mtime_ns(sweep_dir / "store" / table, settle)  # before the scan: what it vouches for
    plan = _Plan.make(sweep_dir, table, compacted)
    if compacted is None and not plan.fresh:  # nothing to hold (an unreadable compacted file goes: it held nothing)
        _compacted_path(sweep_dir, table).unlink(missing_ok=True)
        return Compaction(table, 0, 0, 0, why, written=why is not None), None
    if plan.current and not plan.moved and (compacted.dir_mtime_ns is not None or dir_mtime_ns is None):
        return Compaction(table, len(compacted.files), 0, 0), None
    kept = pa.table({})
    files: dict[str, list] = {}
    if compacted is not None:
        try:
            kept = compacted.read(sweep_dir, filter=~pc.field("trial_id").isin(plan.stale) if plan.stale else None)
        except CorruptStore as err:
            compaction, whole = _compact_table(sweep_dir, table, rebuild=True, settle=settle)
            compaction.rebuilt = str(err).split(";")[0]
            return compaction, whole
        stale = set(plan.stale)
        files = {s: e for s, e in compacted.files.items() if s not in stale}
        files.update({s: [*stat, files[s][3]] for s, stat in plan.moved.items()})  # so they are "same" next time
    fresh, entries = _read_trial_files(sweep_dir / "store" / table, plan.fresh)
    files.update(entries)
    whole = _merge(kept, fresh)
    _write_compacted(whole, files, dir_mtime_ns, _compacted_path(sweep_dir, table))
    return Compaction(table, len(files), len(entries), len(plan.stale), why, written=True), whole


def _store_dir(sweep_dir: Path) -> Path:
    store = sweep_dir / "store"
    if not (store / "runs").is_dir():
        raise UsageError(f"no results store in {str(sweep_dir)!r} (expected {str(store / 'runs')!r})")
    return store


def compact(sweep_dir: str | Path, tables: Iterable[str] = TABLES, *, rebuild: bool = False,
            settle: bool = False) -> list[Compaction]:
    """Fold the per-trial files of `sweep_dir`'s store into one compacted parquet file per table, written
    atomically (safe while trials still write: what they write later is read beside it). A compacted file that
    cannot be read, or `rebuild=True`, is rebuilt from the per-trial files. `settle=True` (when the last trial has
    just written) waits up to QUIET_DIR_S for each table folder to be quiet, so that later reads can skip
    checking every file until the next write."""
    sweep_dir = Path(sweep_dir)
    _store_dir(sweep_dir)
    return [_compact_table(sweep_dir, table, rebuild, settle)[0] for table in _check_tables(tables)]


# ---------------------------------------------------------------------------------------------- reading

def _check_tables(names: Iterable[str], what: str = "table") -> list[str]:
    names = list(names)
    for name in names:
        if name not in TABLES:
            raise UsageError(f"{what} {name!r}: not a results table; tables are {', '.join(TABLES)}")
    return names


def _expression(table: str, spec: Any) -> pc.Expression:
    if isinstance(spec, pc.Expression):
        return spec
    try:  # pandas/pyarrow style [(column, op, value), ...] or [[...], [...]] (an OR of ANDs)
        return pq.filters_to_expression(spec)
    except (TypeError, ValueError) as err:
        raise UsageError(f"filters[{table!r}]: {err}; give a pyarrow expression (pyarrow.compute.field('p') > 1) "
                         f"or [(column, op, value), ...]") from err


def _read_table(sweep_dir: Path, table: str, columns: list[str] | None, where: pc.Expression | None,
                compact: bool | None) -> pa.Table:
    compacted = _Compacted.open(sweep_dir, table)
    plan = _Plan.make(sweep_dir, table, compacted)
    store = sweep_dir / "store"
    if plan.fresh and (compact or (compact is None and len(plan.fresh) >= AUTO_COMPACT
                                   and os.access(store, os.W_OK))):
        _, whole = _compact_table(sweep_dir, table)
        if whole is not None:  # (None: another process compacted it meanwhile; read it as below)
            return _select(table, whole, columns, where)
        compacted = _Compacted.open(sweep_dir, table)
        plan = _Plan.make(sweep_dir, table, compacted)
    fresh, _ = _read_trial_files(store / table, plan.fresh)
    if compacted is None:
        return _merge(pa.table({}), _select(table, fresh, columns, where))
    schema = pa.unify_schemas([compacted.schema, fresh.schema], promote_options="permissive")
    _check_query(table, schema, columns, where)
    keep = ~pc.field("trial_id").isin(plan.stale) if plan.stale else None
    scan = {"columns": _projection(columns), "filter": where if keep is None else keep if where is None
            else keep & where}
    # a compacted file that holds none of the fresh rows' columns still answers for them (as nulls)
    old = compacted.read(sweep_dir, schema=schema, **scan)
    return _merge(old, _select(table, _conform(fresh, schema), columns, where))


def _projection(columns: list[str] | None) -> list[str] | None:
    return None if columns is None else ["trial_id", *(c for c in columns if c != "trial_id")]


def _check_query(table: str, schema: pa.Schema, columns: list[str] | None, where: pc.Expression | None) -> None:
    missing = [c for c in columns or () if c not in schema.names]
    if missing and schema.names:
        raise UsageError(f"columns[{table!r}]: no column {missing[0]!r} in the {table} table; it has "
                         f"{', '.join(schema.names)}")
    if where is not None and schema.names:
        try:
            schema.empty_table().filter(where)
        except (pa.ArrowException, TypeError) as err:
            raise UsageError(f"filters[{table!r}]: {str(err).splitlines()[0]}") from err


def _select(table: str, data: pa.Table, columns: list[str] | None, where: pc.Expression | None) -> pa.Table:
    if data.num_columns == 0:
        return data
    _check_query(table, data.schema, columns, where)
    if where is not None:
        data = data.filter(where)
    return data if columns is None else data.select(_projection(columns))


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    if table.num_rows == 0:
        return pd.DataFrame({"trial_id": []})
    return table.to_pandas()  # consolidated blocks: callers that copy or slice the frames do not pay to merge them


def load(sweep_dir: str | Path, tables: Iterable[str] = TABLES, *, columns: Mapping[str, list[str]] | None = None,
         filters: Mapping[str, Any] | None = None, compact: bool | None = None) -> Tables:
    """The tables of a sweep's store (failed trials included, with their error) as DataFrames.

    Only the `tables` asked for are read (the others come back as empty frames); `columns={table: [...]}`
    reads only those columns (trial_id always comes along); `filters={table: expr}` reads only matching rows
    (a pyarrow expression or [(column, op, value), ...]); a filter on runs selects trials, and every table
    then holds only those trials. Both are pushed down into the compacted files. `compact`: None folds the
    per-trial files into the compacted file first when AUTO_COMPACT or more are new and the store is
    writable; True always, False never. A table with no rows is a frame with only trial_id.
    """
    sweep_dir = Path(sweep_dir)
    _store_dir(sweep_dir)
    wanted = _check_tables(tables)
    columns = {t: list(columns[t]) for t in _check_tables(columns or {}, "columns")}
    where = {t: _expression(t, filters[t]) for t in _check_tables(filters or {}, "filters")}
    arrow: dict[str, pa.Table] = {}
    if "runs" in where:  # the trials that the other tables are restricted to
        arrow["runs"] = _read_table(sweep_dir, "runs", columns.get("runs") if "runs" in wanted else ["trial_id"],
                                    where["runs"], compact)
        runs = arrow["runs"]
        trials = pc.field("trial_id").isin(runs["trial_id"] if runs.num_columns else pa.array([], pa.string()))
        for table in wanted:
            if table != "runs":
                where[table] = trials if table not in where else trials & where[table]
    for table in wanted:
        if table not in arrow:
            arrow[table] = _read_table(sweep_dir, table, columns.get(table), where.get(table), compact)
    return Tables(**{t: _to_pandas(arrow[t]) if t in wanted else pd.DataFrame({"trial_id": []}) for t in TABLES})


def cli_compact(args) -> int:
    for c in compact(args.sweep_dir, rebuild=args.rebuild):
        if not c.written:
            what = f"{c.trials} trials, already current"
        elif c.read or c.dropped:
            what = f"{c.trials} trials ({c.read} per-trial files read, {c.dropped} replaced or removed)"
        else:
            what = f"{c.trials} trials (the state of their files recorded again)"
        note = f"; rebuilt: {c.rebuilt}" if c.rebuilt else ""
        print(f"{c.table}: {what}{note}")
    print(f"compacted: {Path(args.sweep_dir) / 'store' / COMPACTED}")
    return 0


def load_record(sweep_dir: str | Path, trial_id: str) -> ResultRecord:
    path = Path(sweep_dir) / "store" / "records" / f"{trial_id}.json"
    return ResultRecord.model_validate_json(path.read_text())
