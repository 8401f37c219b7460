"""What memprof prints on a terminal: the rich console (:mod:`memprof.display.console`), tables
that fit it (:mod:`memprof.display.tables`) and the end-of-run per-rank table
(:mod:`memprof.display.rank_table`).

A floor below every room that prints (``memprof.cli``, ``memprof.measure``, the launcher and the
integrations), so none of them imports another to show a table.
"""
