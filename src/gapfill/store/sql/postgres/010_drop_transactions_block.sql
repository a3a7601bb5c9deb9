-- transactions_block, (chain_id, block_number), served no query gapfill runs: every lookup
-- of a stored transaction is by (chain_id, tx_hash), the primary key. It cost every written
-- row an entry (bench/hotpath.py, dense chain: ~2 µs of CPU per transaction on SQLite, ~1.5 µs
-- of the PostgreSQL server's), and, with `transactions` not yet analyzed, PostgreSQL took it
-- for the gap's probe of a ref's stored transaction (by chain, filtered by hash: every stored
-- row of the chain per ref). A query of your own by block can create it again.
DROP INDEX IF EXISTS transactions_block;
