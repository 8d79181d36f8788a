"""The study's results table: the best-matching layer per layer for every pair it is about.

``RESULTS/STUDY/`` holds one directory per comparison (results store, CSV,
JSON, heatmaps) and, across comparisons::

    summary.csv   comparison, run_a, layer_a, run_b, best_layer_b, cka, cka_same_position,
                  cka_low, cka_high (the bootstrap interval of cka)
                  (and rankme_a, rankme_b: the minibatch RankMe of both layers, when an analysis has it)
    summary.txt   the same as text, one block per pair
"""

from __future__ import annotations

import csv
import io

from ckapipe.analyze.results import format_interval
from ckapipe.pipelines.study import Study


def study_rows(study: Study, results: dict, stores: dict) -> list[dict]:
    """One row per layer of run a for every pair a comparison is about; ``stores``: comparison ->
    {run: store}, how the results name the study's runs (a run cached under another name is an alias)."""
    rows = []
    for name, comparison in study.comparisons.items():
        res, store = results[name], stores[name]
        for a, b in comparison.pairs:
            matrix = res.cka(store[a], store[b]).values
            low, high = res.interval(store[a], store[b]).values
            ranks = ((res.layer_rankme(store[a]).values, dict(zip(res.layer_names(store[b]), res.layer_rankme(store[b]).values)))
                     if res.rankme is not None else None)
            for i, (layer_a, best, value) in enumerate(res.best_matches(store[a], store[b]).itertuples(index=False)):
                same = matrix[i, i] if i < matrix.shape[1] else float("nan")
                j = res.layer_index(store[b], best) if best != "-" else None
                rows.append({"comparison": name, "run_a": a, "layer_a": layer_a, "run_b": b,
                             "best_layer_b": best, "cka": value, "cka_same_position": float(same),
                             "cka_low": float(low[i, j]) if j is not None else float("nan"),
                             "cka_high": float(high[i, j]) if j is not None else float("nan")})
                if ranks is not None:
                    rows[-1].update(rankme_a=float(ranks[0][i]), rankme_b=float(ranks[1].get(best, float("nan"))))
    return rows


def write_study_report(study: Study, results: dict, stores: dict) -> str:
    """Write summary.csv and summary.txt into the study's results directory; return the text."""
    rows = study_rows(study, results, stores)
    study.results.mkdir(parents=True, exist_ok=True)
    (study.results / "summary.csv").write_text(rows_to_csv(rows))
    text = rows_to_text(rows)
    (study.results / "summary.txt").write_text(text)
    return text


def rows_to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    fields = ["comparison", "run_a", "layer_a", "run_b", "best_layer_b", "cka", "cka_same_position", "cka_low", "cka_high"]
    fields += ["rankme_a", "rankme_b"] if any("rankme_a" in row for row in rows) else []
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def rows_to_text(rows: list[dict]) -> str:
    lines, block = [], None
    for row in rows:
        if (row["comparison"], row["run_a"], row["run_b"]) != block:
            block = (row["comparison"], row["run_a"], row["run_b"])
            lines += ["", f"[{row['comparison']}] {row['run_a']} -> best layer of {row['run_b']}"]
        rank = f"  RankMe {row['rankme_a']:.1f} / {row['rankme_b']:.1f}" if "rankme_a" in row else ""
        interval = format_interval(row["cka"], row.get("cka_low", float("nan")), row.get("cka_high", float("nan")))
        lines.append(f"  {row['layer_a']:<12} {row['best_layer_b']:<12} {interval}{rank}")
    return "\n".join(lines).lstrip("\n") + "\n"
