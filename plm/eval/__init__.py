"""`plm-eval`: frozen-probe evaluation of user embeddings against a hand-built aggregate baseline.

`plm.eval.run.run_eval(EvalConfig(...), extra_sections=None)` does everything and writes the
report folder; `aggregates` (the baseline features), `probes` (task types, out-of-fold
predictions, metrics, bootstrap) and `report` (Markdown, JSON, figures) are its parts.
See docs/evaluation.md.
"""
