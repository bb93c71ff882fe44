"""Reports of results stores (`exitbench report`, `leaderboard`): every number recomputed from a store's long tables
(bench.results), not taken from trial summaries. `stats` holds the intervals and tests (t and logit-t intervals,
paired t, sign-flip, Holm); `frame` loads and labels runs, computes per-trial metrics, summarises groups over seeds
and pairs them with a baseline (its docstring defines every number); `tables` writes the markdown and LaTeX tables
and the leaderboard; `figures` draws the figures; `published` reads cited published numbers; `build` writes a
report or leaderboard and holds the two commands. Nothing here trains or evaluates a network."""
