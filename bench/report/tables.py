"""Report tables: rows = methods or variants, columns = dataset x metric, mean ± 95 % CI over seeds
with n, the best cell of a column in bold, rows not significantly different from the best marked,
the published value beside ours, footnotes for untrained backbones.

Two kinds of tables are built from the same cells:

* summary tables, one per metric family (image quality, semantic consistency, style relevance,
  ...: the grouping of CoCosNet v2 Tables 1-3), over every row and dataset of the sweep;
* paper tables, one per published table (reports/published.yaml) that has a row in the sweep,
  laid out like the paper: its rows in its order, its datasets and metrics.

Rendering (Markdown, LaTeX booktabs, CSV) is separate from building, so tests can check the
numbers of a ``Table`` directly.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import pandas as pd

from bench import stats
from bench.report.data import (FAMILIES, PublishedTable, RunSet, canonical_dataset, metric_info, row_matches,
                               untrained_split)

# Cell marks (Markdown / LaTeX); explained in every table's footnotes.
NOT_SIGNIFICANT = ("†", r"$^{\dagger}$")
NOT_TESTED = ("‡", r"$^{\ddagger}$")
UNTRAINED_METRIC = ("ᵘ", r"$^{u}$")  # not "*": it would merge with Markdown bold
UNTRAINED_TRAINING = ("§", r"$^{\S}$")
OFFICIAL_WEIGHTS = "official weights"


@dataclass
class Cell:
    values: List[float]  # one per seed
    seeds: List[int]
    summary: stats.Summary
    published: Optional[float] = None
    published_source: Optional[str] = None
    best: bool = False
    p_vs_best: Optional[float] = None  # Holm-adjusted Welch p against the column's best row
    tested: bool = False  # False: fewer than 2 seeds on one side (or this is the best row)
    untrained_metric: List[str] = field(default_factory=list)  # metric backbones that were random-init

    @property
    def significant(self) -> Optional[bool]:
        return None if self.p_vs_best is None else self.p_vs_best < stats.ALPHA


@dataclass
class Row:
    key: str  # "<method>/<variant>"
    label: str
    untrained_training: List[str] = field(default_factory=list)
    official_weights: bool = False  # every run of the row evaluated a released official checkpoint


@dataclass
class Table:
    id: str
    title: str
    rows: List[Row]
    columns: List[Tuple[str, str]]  # (dataset, metric)
    cells: Dict[Tuple[str, str, str], Cell]  # (row key, dataset, metric)
    published: Dict[Tuple[str, str, str], Tuple[float, str]] = field(default_factory=dict)
    source: Optional[str] = None  # "CoCosNet v2 (Zhou et al., CVPR 2021), Table 4" for paper tables
    notes: List[str] = field(default_factory=list)

    def cell(self, row: str, dataset: str, metric: str) -> Optional[Cell]:
        return self.cells.get((row, dataset, metric))

    def has_ours(self, col: Tuple[str, str]) -> bool:
        return any((r.key, *col) in self.cells for r in self.rows)

    def has_paper(self, col: Tuple[str, str]) -> bool:
        return any((r.key, *col) in self.published for r in self.rows)


# ---- building --------------------------------------------------------------------------------
def row_labels(runs: pd.DataFrame) -> Dict[str, str]:
    """Rows are variants when the sweep has one method, methods when every method has one
    variant, "method/variant" otherwise (the papers' comparison vs ablation tables)."""
    pairs = runs[["method", "variant"]].drop_duplicates()
    methods = pairs["method"].unique()
    out = {}
    for m, v in pairs.itertuples(index=False):
        if len(methods) == 1:
            out[f"{m}/{v}"] = v
        elif (pairs["method"] == m).sum() == 1:
            out[f"{m}/{v}"] = m
        else:
            out[f"{m}/{v}"] = f"{m}/{v}"
    return out


def _cells(runset: RunSet, metrics: Sequence[str]) -> Dict[Tuple[str, str, str], Cell]:
    df = runset.runs
    out = {}
    for (row, ds), grp in df.groupby(["row", "dataset"], sort=False):
        for metric in metrics:
            col = f"metrics.{metric}"
            if col not in grp.columns:
                continue
            sub = grp[grp[col].notna()].sort_values("seed")
            if sub.empty:
                continue
            vals = [float(v) for v in sub[col]]
            info = metric_info(metric)
            untrained = sorted({u for tagv in sub["untrained"] for u in untrained_split(tagv)[0]
                                if info and info.source and u.split(".", 1)[0] == info.source})
            out[(row, ds, metric)] = Cell(vals, [int(s) for s in sub["seed"]], stats.summarize(vals),
                                          untrained_metric=untrained)
    return out


def mark_best_and_tests(table: Table) -> None:
    """Per column: the best mean (by the metric's direction) is bold; every other row is tested
    against it with Welch's t-test across seeds, Holm-adjusted over the column."""
    for ds, metric in table.columns:
        info = metric_info(metric)
        col = [(r.key, table.cells[(r.key, ds, metric)]) for r in table.rows if (r.key, ds, metric) in table.cells]
        col = [(k, c) for k, c in col if math.isfinite(c.summary.mean)]
        if not col:
            continue
        sign = 1 if info.better == "lower" else -1
        best_mean = min(sign * c.summary.mean for _, c in col)
        best = [c for _, c in col if sign * c.summary.mean == best_mean]
        for c in best:
            c.best = True
        ref = best[0]
        others = [c for _, c in col if not c.best]
        raw = []
        for c in others:
            res = stats.welch(c.values, ref.values)
            raw.append(None if res is None else res.p)
        for c, p in zip(others, stats.holm(raw)):
            c.p_vs_best = p
            c.tested = p is not None


def _training_untrained(runset: RunSet, row: str) -> List[str]:
    tags = runset.runs.loc[runset.runs["row"] == row, "untrained"]
    return sorted({u for t in tags for u in untrained_split(t)[1]})


def _row(runset: RunSet, key: str, label: str) -> Row:
    runs = runset.runs.loc[runset.runs["row"] == key]
    official = "weights" in runs and len(runs) > 0 and bool((runs["weights"] == "official").all())
    # Weights nobody trained here: a loss backbone's state does not matter, only the release's.
    return Row(key, label, [] if official else _training_untrained(runset, key), official)


def published_lookup(tables: Sequence[PublishedTable], row_key: str, dataset: str,
                     metric: str) -> Optional[Tuple[float, str]]:
    """The first published value for our (row, dataset, metric), with its source."""
    method, _, variant = row_key.partition("/")
    ds = canonical_dataset(dataset)
    for t in tables:
        for pkey in t.rows:
            if row_matches(pkey, method, variant):
                v = t.value(pkey, ds, metric)
                if v is not None:
                    return v, t.source
    return None


def summary_tables(runset: RunSet, published: Sequence[PublishedTable]) -> List[Table]:
    df = runset.runs
    if df.empty:
        return []
    labels = row_labels(df)
    rows = [_row(runset, k, labels[k]) for k in dict.fromkeys(df["row"])]
    datasets = list(dict.fromkeys(df["dataset"]))
    metrics = runset.metric_columns()
    cells = _cells(runset, metrics)
    out = []
    for family, title in FAMILIES:
        fam = [m for m in metrics if metric_info(m).family == family]
        cols = [(ds, m) for ds in datasets for m in fam if any((r.key, ds, m) in cells for r in rows)]
        if not cols:
            continue
        pub = {}
        for r in rows:
            for ds, m in cols:
                hit = published_lookup(published, r.key, ds, m)
                if hit:
                    pub[(r.key, ds, m)] = hit
        t = Table(id=f"summary_{family}", title=f"{title} ({runset.experiment})", rows=rows, columns=cols,
                  cells={k: v for k, v in cells.items() if (k[1], k[2]) in cols}, published=pub)
        mark_best_and_tests(t)
        out.append(t)
    return out


def paper_tables(runset: RunSet, published: Sequence[PublishedTable],
                 omitted: Optional[List[str]] = None) -> List[Table]:
    """One table per published table that has at least one row in the sweep: the paper's rows
    (those we ran) in its order; the paper's datasets first, then the sweep's other datasets.

    A comparison table (rows = methods) is left out, and named in ``omitted``, when the sweep ran
    none of its datasets: a quickstart on embedded data would otherwise get every paper's table.
    Ablation tables (rows = method/variant) are kept, so a smoke profile shows the paper's layout.
    """
    df = runset.runs
    if df.empty:
        return []
    ours = list(dict.fromkeys(df["row"]))
    ds_ours = list(dict.fromkeys(df["dataset"]))
    out = []
    for pt in published:
        matched: List[Tuple[str, str]] = []  # (our row key, paper row key)
        for pkey in pt.rows:
            for r in ours:
                m, _, v = r.partition("/")
                if row_matches(pkey, m, v) and r not in [x for x, _ in matched]:
                    matched.append((r, pkey))
        if not matched:
            continue
        canon = {ds: canonical_dataset(ds) for ds in ds_ours}
        # Columns: each paper dataset (ours under its label when we ran it), then our other datasets.
        datasets = []
        for pds in pt.datasets:
            mine = [d for d in ds_ours if canon[d] == pds]
            datasets.extend(mine or [pds])
        datasets += [d for d in ds_ours if d not in datasets]
        cells_all = _cells(runset, pt.metrics)
        cells, pub = {}, {}
        for r, pkey in matched:
            for ds in datasets:
                for m in pt.metrics:
                    if (r, ds, m) in cells_all:
                        cells[(r, ds, m)] = cells_all[(r, ds, m)]
                    v = pt.value(pkey, canonical_dataset(ds), m)
                    if v is not None:
                        pub[(r, ds, m)] = (v, pt.source)
        rows = [_row(runset, r, f"{pt.rows[pkey].get('label', pkey)} ({r})")
                for r, pkey in matched]
        cols = [(ds, m) for ds in datasets for m in pt.metrics
                if any((r.key, ds, m) in cells or (r.key, ds, m) in pub for r in rows)]
        if not any((r.key, *c) in cells for r in rows for c in cols):
            continue  # none of its metrics was computed by this sweep
        if not any(c in pt.datasets for c in canon.values()) and not all("/" in k for k in pt.rows):
            if omitted is not None:
                omitted.append(pt.id)
            continue
        notes = []
        if not any((r.key, *c) in cells and (r.key, *c) in pub for r in rows for c in cols):
            notes.append(f"This sweep ran none of the paper's datasets ({', '.join(pt.datasets)}): "
                         "its numbers sit in their own columns.")
        if pt.note:
            notes.append(pt.note)
        t = Table(id=pt.id, title=f"{pt.source}: {pt.caption}", rows=rows, columns=cols, cells=cells,
                  published=pub, source=pt.source, notes=notes)
        mark_best_and_tests(t)
        out.append(t)
    return out


# ---- rendering -------------------------------------------------------------------------------
def fmt(x: Optional[float], digits: int) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.{digits}f}"


def _cell_text(c: Cell, digits: int, latex: bool) -> str:
    i = 1 if latex else 0
    pm = r"$\pm$" if latex else "±"
    s = fmt(c.summary.mean, digits)
    if c.summary.n >= 2:
        s += f" {pm} {fmt(c.summary.ci95, digits)}"
    if c.best:
        s = rf"\textbf{{{s}}}" if latex else f"**{s}**"
    marks = ""
    if not c.best and c.tested and not c.significant:
        marks += NOT_SIGNIFICANT[i]
    if not c.best and not c.tested and len(c.values) > 0:
        marks += NOT_TESTED[i]
    if c.untrained_metric:
        marks += UNTRAINED_METRIC[i]
    return f"{s}{marks} (n={c.summary.n})"


def _columns(table: Table) -> List[Tuple[str, str, str]]:
    """Rendered columns: (dataset, metric, "ours" | "paper")."""
    out = []
    for ds, m in table.columns:
        if table.has_ours((ds, m)):
            out.append((ds, m, "ours"))
        if table.has_paper((ds, m)):
            out.append((ds, m, "paper"))
    return out


def _sources(table: Table) -> List[str]:
    return list(dict.fromkeys(src for _, src in table.published.values()))


def _text(table: Table, row: Row, col: Tuple[str, str, str], latex: bool) -> str:
    ds, m, kind = col
    digits = metric_info(m).digits
    if kind == "paper":
        hit = table.published.get((row.key, ds, m))
        if hit is None:
            return "–"
        ref = ""
        srcs = _sources(table)
        if len(srcs) > 1:
            ref = f" [{srcs.index(hit[1]) + 1}]"
        return fmt(hit[0], digits) + ref
    c = table.cell(row.key, ds, m)
    return "–" if c is None else _cell_text(c, digits, latex)


def footnotes(table: Table, latex: bool = False) -> List[str]:
    i = 1 if latex else 0
    cells = list(table.cells.values())
    notes = ["Mean ± 95 % confidence interval (Student's t) over seeds; n = seeds. Bold: best mean of the column."]
    if any(c.tested and not c.significant for c in cells):
        notes.append(f"{NOT_SIGNIFICANT[i]} not significantly different from the column's best row "
                     f"(Welch's t-test across seeds, Holm-adjusted p ≥ {stats.ALPHA}).")
    if any(not c.best and not c.tested for c in cells):
        notes.append(f"{NOT_TESTED[i]} not tested against the best row: fewer than 2 seeds on one side.")
    untrained = sorted({u for c in cells for u in c.untrained_metric})
    if untrained:
        notes.append(f"{UNTRAINED_METRIC[i]} computed with an untrained (seeded random-init) backbone "
                     f"({', '.join(untrained)}): not comparable with published numbers.")
    if any(r.official_weights for r in table.rows):
        notes.append(f"{OFFICIAL_WEIGHTS}: the released official checkpoint, converted with python -m bench.convert "
                     f"and evaluated here without training (run tags bench.init_from.*).")
    training = sorted({u for r in table.rows for u in r.untrained_training})
    if training:
        notes.append(f"{UNTRAINED_TRAINING[i]} trained with an untrained loss backbone "
                     f"({', '.join(training)}): not comparable with published numbers.")
    srcs = _sources(table)
    if len(srcs) == 1:
        notes.append(f"paper: {srcs[0]}.")
    elif srcs:
        notes.append("paper: " + "; ".join(f"[{k + 1}] {s}" for k, s in enumerate(srcs)) + ".")
    notes.extend(table.notes)
    return notes


def _row_label(row: Row, latex: bool) -> str:
    label = latex_escape(row.label) if latex else row.label
    if row.official_weights:
        label += f" ({OFFICIAL_WEIGHTS})"
    if row.untrained_training:
        label += UNTRAINED_TRAINING[1 if latex else 0]
    return label


def to_markdown(table: Table) -> str:
    cols = _columns(table)
    head = ["row"] + [f"{ds} {metric_info(m).label} {metric_info(m).arrow}" + (" (paper)" if k == "paper" else "")
                      for ds, m, k in cols]
    lines = [f"### {table.title}", "", "| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] + ["---:"] * len(cols)) + "|"]
    for r in table.rows:
        lines.append("| " + " | ".join([_row_label(r, False)] + [_text(table, r, c, False) for c in cols]) + " |")
    lines.append("")
    lines.extend(f"- {n}" for n in footnotes(table))
    return "\n".join(lines) + "\n"


def latex_escape(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                 ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\^{}")):
        s = s.replace(a, b)
    return s


def to_latex(table: Table) -> str:
    """A booktabs table: a header row of datasets spanning their metrics, a row of metrics with
    arrows, one row per method/variant, footnotes under the tabular."""
    cols = _columns(table)
    groups: List[Tuple[str, int]] = []
    for ds, _, _ in cols:
        if groups and groups[-1][0] == ds:
            groups[-1] = (ds, groups[-1][1] + 1)
        else:
            groups.append((ds, 1))
    arrow = {"↓": r"$\downarrow$", "↑": r"$\uparrow$"}
    out = [r"% requires \usepackage{booktabs}", r"\begin{table}[t]", r"\centering", r"\small",
           rf"\caption{{{latex_escape(table.title)}}}", rf"\label{{tab:{table.id}}}",
           r"\begin{tabular}{l" + "r" * len(cols) + "}", r"\toprule"]
    out.append(" & " + " & ".join(rf"\multicolumn{{{n}}}{{c}}{{{latex_escape(ds)}}}" for ds, n in groups) + r" \\")
    start, rules = 2, []
    for _, n in groups:
        rules.append(rf"\cmidrule(lr){{{start}-{start + n - 1}}}")
        start += n
    out.append(" ".join(rules))
    out.append("Row & " + " & ".join(
        f"{latex_escape(metric_info(m).label)} {arrow[metric_info(m).arrow]}" + (" (paper)" if k == "paper" else "")
        for _, m, k in cols) + r" \\")
    out.append(r"\midrule")
    for r in table.rows:
        out.append(" & ".join([_row_label(r, True)] + [_text(table, r, c, True) for c in cols]) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", r"\par\smallskip\footnotesize"]
    out.append(r" \\ ".join(latex_escape_notes(n) for n in footnotes(table, latex=True)))
    out.append(r"\end{table}")
    return "\n".join(out) + "\n"


def latex_escape_notes(note: str) -> str:
    """Footnotes carry their own LaTeX marks ($^{\\dagger}$); escape only the plain text around them."""
    parts = note.split("$")
    return "$".join(p if k % 2 else latex_escape(p).replace("±", r"$\pm$").replace("≥", r"$\geq$")
                    for k, p in enumerate(parts))


def to_csv(table: Table) -> str:
    """The table's layout, machine-readable: one line per row, per column mean/ci95/n/best/p/paper."""
    buf = io.StringIO()
    w = csv.writer(buf)
    header = ["row_key", "row"]
    for ds, m in table.columns:
        header += [f"{ds}/{m}/{x}" for x in ("mean", "ci95", "n", "best", "p_vs_best", "paper")]
    w.writerow(header)
    for r in table.rows:
        line = [r.key, r.label]
        for ds, m in table.columns:
            c = table.cell(r.key, ds, m)
            pub = table.published.get((r.key, ds, m))
            if c is None:
                line += ["", "", 0, "", ""]
            else:
                line += [_num(c.summary.mean), _num(c.summary.ci95), c.summary.n, int(c.best), _num(c.p_vs_best)]
            line.append("" if pub is None else pub[0])
        w.writerow(line)
    return buf.getvalue()


def cells_frame(tables: Sequence[Table]) -> pd.DataFrame:
    """Every cell of every table, long form, with its per-seed values and test result."""
    recs = []
    for t in tables:
        for r in t.rows:
            for ds, m in t.columns:
                c = t.cell(r.key, ds, m)
                pub = t.published.get((r.key, ds, m))
                if c is None and pub is None:
                    continue
                recs.append({
                    "table": t.id, "row_key": r.key, "row": r.label, "dataset": ds, "metric": m,
                    "better": metric_info(m).better,
                    "n": c.summary.n if c else 0, "mean": c.summary.mean if c else None,
                    "std": c.summary.std if c else None, "ci95": c.summary.ci95 if c else None,
                    "seeds": " ".join(map(str, c.seeds)) if c else "",
                    "values": " ".join(f"{v:.6g}" for v in c.values) if c else "",
                    "best": c.best if c else None, "p_vs_best_holm": c.p_vs_best if c else None,
                    "untrained_metric_backbones": ",".join(c.untrained_metric) if c else "",
                    "untrained_training_backbones": ",".join(r.untrained_training),
                    "paper": pub[0] if pub else None, "paper_source": pub[1] if pub else None})
    return pd.DataFrame.from_records(recs)


def pairwise_frame(tables: Sequence[Table]) -> pd.DataFrame:
    """Welch's t-test between every pair of rows in every summary column (not only vs the best)."""
    recs = []
    for t in tables:
        for ds, m in t.columns:
            col = [(r.key, t.cell(r.key, ds, m)) for r in t.rows if t.cell(r.key, ds, m) is not None]
            for i in range(len(col)):
                for j in range(i + 1, len(col)):
                    (a, ca), (b, cb) = col[i], col[j]
                    res = stats.welch(ca.values, cb.values)
                    recs.append({"table": t.id, "dataset": ds, "metric": m, "a": a, "b": b,
                                 "mean_a": ca.summary.mean, "mean_b": cb.summary.mean, "n_a": ca.summary.n,
                                 "n_b": cb.summary.n, "t": res.t if res else None, "df": res.df if res else None,
                                 "p": res.p if res else None})
    return pd.DataFrame.from_records(recs)


def _num(x: Optional[float]) -> str:
    return "" if x is None or not math.isfinite(x) else repr(float(x))
