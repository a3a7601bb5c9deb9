-- The open batches of each contract (pending or leased): what a lease of some contracts and
-- the progress count read, whatever the statistics say. Without any, PostgreSQL took
-- batches_contract for a contract's lease or count and filtered the state, reading every
-- batch its earlier runs left done (never pruned). The predicate is batches_open's, word
-- for word: the queries name it so, and SQLite uses a partial index only then. Built from
-- the open batches alone, so it is small on a database with a long history.
CREATE INDEX IF NOT EXISTS batches_open_contract ON batches (chain_id, contract, state)
    WHERE state IN ('pending', 'leased');
