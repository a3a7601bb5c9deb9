"""Importing this module loads the CA certificates into aiohttp's contexts (see
:mod:`gapfill.rpc.tls`).

Concurrent mode's fork server imports it when one of the run's endpoints may use TLS: its
workers, forked from it, then inherit the certificates instead of each loading them (~85 ms,
on every start and restart).
"""

from gapfill.rpc.tls import trust

trust()
