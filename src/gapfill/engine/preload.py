"""What concurrent mode's fork server imports before it forks a worker (see
:mod:`gapfill.engine.forkserver`): the engine, and keccak's backend, loaded as
:mod:`gapfill.keccak` loads it (without the ``file`` command pycryptodome would run),
so that no worker pays for it (~13 ms) on every start and restart.
"""

import gapfill.engine.run  # noqa: F401
from gapfill.keccak import keccak

keccak(b"")
