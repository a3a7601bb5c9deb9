"""Turn node JSON into rows: pure functions, no I/O.

* :mod:`gapfill.enrich.normalise`: a transaction and its receipt become a
  :class:`~gapfill.model.TxRow` and its :class:`~gapfill.model.LogRow` list.
* :mod:`gapfill.enrich.decode`: the ABI decoder that fills ``method_*`` and
  ``event_*`` columns; it never raises on bad data.
"""
