"""The report's picture shows the report's own numbers: one bar per column, the margin's CI as its error bar."""

from __future__ import annotations


def report(columns=("base", "tuned", "dpo")):
    labels = {"base": "base", "tuned": "SFT", "dpo": "SFT+DPO"}
    metrics = {c: {"answers": 250, "perplexity": p, "mean_margin": m, "margin_ci95": [m - 0.1, m + 0.05]}
               for c, p, m in zip(columns, (7.5, 3.1, 3.2), (1.2, 1.9, 2.2))}
    lengths = {c: {"answers": 20, "mean_new_tokens": n, "ended_turn": e}
               for c, n, e in zip(columns, (250.0, 40.0, 45.0), (1, 20, 19))}
    return {"run": "smol-dpo", "base_model": "/some/dir/SmolLM2.gguf", "settings": {"split": "test"},
            "columns": {c: labels[c] for c in columns}, "metrics": metrics, "generation_lengths": lengths}


def test_each_panel_shows_the_reports_values(tmp_path):
    from fine_tune_llm.eval.report_plot import plot_report, report_figure

    r = report()
    fig = report_figure(r)
    ppl, margin, length = fig.axes
    assert [b.get_height() for b in ppl.patches] == [7.5, 3.1, 3.2]
    assert [round(b.get_height(), 6) for b in margin.patches] == [1.2, 1.9, 2.2]
    segments = margin.collections[0].get_segments()  # the error bars: from CI low to CI high
    assert [(round(s[0][1], 6), round(s[1][1], 6)) for s in segments] == [(1.1, 1.25), (1.8, 1.95), (2.1, 2.25)]
    assert [t.get_text() for t in length.get_xticklabels()] == ["base\nended 1/20", "SFT\nended 20/20",
                                                                 "SFT+DPO\nended 19/20"]
    assert "SmolLM2.gguf" in fig._suptitle.get_text() and "/some/dir" not in fig._suptitle.get_text()
    out = plot_report(r, tmp_path)
    assert out.name == "report_smol-dpo.png" and out.read_bytes()[:4] == b"\x89PNG"


def test_rows_without_a_rejected_answer_get_no_margin_panel():
    from fine_tune_llm.eval.report_plot import report_figure

    r = report(("base", "tuned"))
    for m in r["metrics"].values():
        del m["mean_margin"], m["margin_ci95"]
    assert [a.get_title() for a in report_figure(r).axes] == [
        "held-out answer perplexity (lower is better)", "greedy answer length"]
