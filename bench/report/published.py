"""Published numbers as cited rows: CSV files of what papers and reference READMEs state.

A leaderboard shows them beside exitbench's own rows, labelled "published, not run here", and never puts
them into any statistic: they come from other code, other hardware and often another protocol, so they
are context, not samples. One CSV row is one (method, dataset, backbone, metric) result:

    method,dataset,backbone,metric,values,epochs,source
    l2w,imagenet,msdnet-imagenet-step4,top1_per_exit,59.54 / 67.22 / 71.03 / 72.33 / 73.93,100,"L2W-DEN README, ..."

`values` holds one number, or one per exit separated by " / " (first exit first), exactly as the source
prints them (the text is kept for display, so 73.000 stays 73.000). `epochs` is the training length the
source states (empty when it states none). `source` names the paper or repository and where in it
(table, figure, README section).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bench.errors import UsageError

COLUMNS = ("method", "dataset", "backbone", "metric", "values", "epochs", "source")
# What a published value may measure; all are top-1 accuracies in %, so they must lie in [0, 100].
METRICS = {
    "top1_per_exit": "anytime top-1 of every exit (%)",
    "top1_last": "top-1 of the last exit (%)",
    "auc": "area under the budgeted curve (%)",
    "best_acc": "best budgeted top-1 (%)",
}


class PublishedRow(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    method: str = Field(min_length=1)
    dataset: str = Field(min_length=1)
    backbone: str = Field(min_length=1)
    metric: str
    values: list[str] = Field(min_length=1)  # the source's own digits, one per exit for top1_per_exit
    epochs: int | None = Field(gt=0)  # None: the source does not state it (an empty CSV field)
    source: str = Field(min_length=1)

    @field_validator("epochs", mode="before")
    @classmethod
    def _not_stated(cls, v):
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        if v not in METRICS:
            raise ValueError(f"unknown metric {v!r}; use one of {', '.join(METRICS)}")
        return v

    @field_validator("values", mode="before")
    @classmethod
    def _split(cls, v):
        if isinstance(v, str):
            return [part.strip() for part in v.split("/")]
        return v

    @field_validator("values")
    @classmethod
    def _accuracies(cls, v: list[str]) -> list[str]:
        for text in v:
            try:
                number = float(text)
            except ValueError:
                raise ValueError(f"{text!r} is not a number (write per-exit values as '59.54 / 67.22')") from None
            if not math.isfinite(number) or not 0 <= number <= 100:
                raise ValueError(f"{text} is not an accuracy in [0, 100]")
        return v

    def numbers(self) -> list[float]:
        return [float(t) for t in self.values]


def read(path: str | Path) -> list[PublishedRow]:
    """Every row of one CSV file, validated; a bad file is one UsageError naming the file, line and field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"published numbers: cannot read {str(path)!r}: {err}") from None
    reader = csv.DictReader(text.splitlines())
    header = reader.fieldnames or []
    missing = [c for c in COLUMNS if c not in header]
    unknown = [c for c in header if c not in COLUMNS]
    if missing or unknown:
        what = "; ".join(filter(None, [missing and f"missing column(s) {', '.join(missing)}",
                                        unknown and f"unknown column(s) {', '.join(unknown)}"]))
        raise UsageError(f"published numbers {str(path)!r}: {what} (the header must be {','.join(COLUMNS)})")
    rows = []
    for line, raw in enumerate(reader, start=2):
        if None in raw or any(v is None for v in raw.values()):
            raise UsageError(f"published numbers {str(path)!r} line {line}: expected {len(COLUMNS)} fields "
                             f"({','.join(COLUMNS)}); quote a field that holds a comma")
        try:
            row = PublishedRow(**raw)
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(str(p) for p in first["loc"] if not isinstance(p, int)) or "row"
            message = first["msg"].removeprefix("Value error, ")
            raise UsageError(f"published numbers {str(path)!r} line {line}: {field}: {message}") from None
        rows.append(row)
    if not rows:
        raise UsageError(f"published numbers {str(path)!r}: no rows")
    return rows


def read_all(paths: list[str | Path]) -> list[PublishedRow]:
    """Rows of CSV files and of every *.csv in the given folders, in a stable order."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.csv"))
            if not found:
                raise UsageError(f"published numbers: no *.csv files in {str(p)!r}")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise UsageError(f"published numbers: {str(p)!r} does not exist (give a CSV file or a folder of them)")
    return [row for f in files for row in read(f)]


def markdown(rows: list[PublishedRow]) -> str:
    """The leaderboard's section of cited rows, grouped by dataset, one table per metric kind."""
    if not rows:
        return ""
    out = ["## Published results (not run here)", "",
           "Numbers as their sources state them, from other code, hardware and training budgets: context for "
           "the rows above, not comparable samples, and in no statistic.", ""]
    for dataset in sorted({r.dataset for r in rows}):
        group = [r for r in rows if r.dataset == dataset]
        out += [f"### {dataset}", ""]
        per_exit = [r for r in group if r.metric == "top1_per_exit"]
        if per_exit:
            k = max(len(r.values) for r in per_exit)
            header = ["method", "backbone", "epochs", *(f"exit {i + 1}" for i in range(k)), "source"]
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "--:|" * k + "---|"]
            for r in per_exit:
                cells = [*r.values, *[""] * (k - len(r.values))]
                lines.append("| " + " | ".join(_cell(c) for c in [f"{r.method} (published)", r.backbone, _epochs(r),
                                                                   *cells, r.source]) + " |")
            out += lines + [""]
        scalar = [r for r in group if r.metric != "top1_per_exit"]
        if scalar:
            lines = ["| method | backbone | epochs | metric | value | source |", "|---|---|--:|---|--:|---|"]
            for r in scalar:
                cells = [f"{r.method} (published)", r.backbone, _epochs(r), METRICS[r.metric], " / ".join(r.values),
                         r.source]
                lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
            out += lines + [""]
    return "\n".join(out)


def _epochs(row: PublishedRow) -> str:
    return "not stated" if row.epochs is None else str(row.epochs)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a pipe inside a source would split the markdown row
