-- gapfill schema v1 (SQLite: big integers are decimal TEXT, JSON is TEXT). The public tables are contracts, refs,
-- transactions, logs, coverage and failures; runs, batches and lease_events
-- hold the engine's plans and its audit trail.

CREATE TABLE IF NOT EXISTS contracts (
    chain_id     BIGINT NOT NULL,
    address      TEXT   NOT NULL,
    label        TEXT,
    start_block  BIGINT,
    abi          TEXT,
    added_at     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
    PRIMARY KEY (chain_id, address)
);
CREATE INDEX IF NOT EXISTS contracts_address ON contracts (address);

CREATE TABLE IF NOT EXISTS refs (
    chain_id      BIGINT NOT NULL,
    contract      TEXT   NOT NULL,
    tx_hash       TEXT   NOT NULL,
    block_number  BIGINT,
    source        TEXT   NOT NULL DEFAULT 'import',
    PRIMARY KEY (chain_id, contract, tx_hash)
);
CREATE INDEX IF NOT EXISTS refs_tx_hash ON refs (chain_id, tx_hash);
-- The gap's key order: unknown block numbers sort after every known one.
CREATE INDEX IF NOT EXISTS refs_key ON refs
    (chain_id, contract, (COALESCE(block_number, 9223372036854775807)), tx_hash);

CREATE TABLE IF NOT EXISTS transactions (
    chain_id                  BIGINT  NOT NULL,
    tx_hash                   TEXT    NOT NULL,
    block_number              BIGINT  NOT NULL,
    block_hash                TEXT    NOT NULL,
    tx_index                  INTEGER NOT NULL,
    block_timestamp           BIGINT,
    from_address              TEXT    NOT NULL,
    to_address                TEXT,
    value                     TEXT NOT NULL,
    input                     TEXT    NOT NULL,
    nonce                     TEXT NOT NULL,
    gas                       TEXT NOT NULL,
    gas_price                 TEXT,
    max_fee_per_gas           TEXT,
    max_priority_fee_per_gas  TEXT,
    tx_type                   INTEGER NOT NULL,
    status                    SMALLINT,
    root                      TEXT,
    gas_used                  TEXT NOT NULL,
    cumulative_gas_used       TEXT NOT NULL,
    effective_gas_price       TEXT,
    created_contract          TEXT,
    access_list               TEXT,
    max_fee_per_blob_gas      TEXT,
    blob_versioned_hashes     TEXT,
    blob_gas_used             TEXT,
    blob_gas_price            TEXT,
    authorization_list        TEXT,
    method_id                 TEXT,
    method_name               TEXT,
    method_args               TEXT,
    log_count                 INTEGER NOT NULL DEFAULT 0,
    enriched_at               TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
    PRIMARY KEY (chain_id, tx_hash)
);
CREATE INDEX IF NOT EXISTS transactions_to ON transactions (chain_id, to_address);
CREATE INDEX IF NOT EXISTS transactions_block ON transactions (chain_id, block_number);

CREATE TABLE IF NOT EXISTS logs (
    chain_id      BIGINT  NOT NULL,
    tx_hash       TEXT    NOT NULL,
    log_index     INTEGER NOT NULL,
    block_number  BIGINT  NOT NULL,
    address       TEXT    NOT NULL,
    topic0        TEXT,
    topic1        TEXT,
    topic2        TEXT,
    topic3        TEXT,
    data          TEXT    NOT NULL,
    event_name    TEXT,
    event_args    TEXT,
    PRIMARY KEY (chain_id, tx_hash, log_index)
);
CREATE INDEX IF NOT EXISTS logs_address ON logs (chain_id, address, topic0);

CREATE TABLE IF NOT EXISTS coverage (
    chain_id    BIGINT NOT NULL,
    contract    TEXT   NOT NULL,
    method      TEXT   NOT NULL,
    from_block  BIGINT NOT NULL,
    to_block    BIGINT NOT NULL,
    scanned_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
    PRIMARY KEY (chain_id, contract, method, from_block, to_block)
);

CREATE TABLE IF NOT EXISTS failures (
    chain_id    BIGINT NOT NULL,
    tx_hash     TEXT   NOT NULL,
    contract    TEXT   NOT NULL,
    reason      TEXT   NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 1,
    last_error  TEXT   NOT NULL DEFAULT '',
    at          TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
    PRIMARY KEY (chain_id, tx_hash)
);

CREATE TABLE IF NOT EXISTS runs (
    run_id       INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at   REAL NOT NULL,
    finished_at  REAL,
    host         TEXT NOT NULL,
    mode         TEXT NOT NULL,
    workers      INTEGER NOT NULL,
    state        TEXT NOT NULL DEFAULT 'running',
    processed    BIGINT NOT NULL DEFAULT 0,
    failed       BIGINT NOT NULL DEFAULT 0,
    rpc_calls    BIGINT NOT NULL DEFAULT 0,
    note         TEXT NOT NULL DEFAULT ''
);

CREATE TABLE IF NOT EXISTS batches (
    batch_id          INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id            BIGINT NOT NULL,
    chain_id          BIGINT NOT NULL,
    contract          TEXT   NOT NULL,
    lo_block          BIGINT NOT NULL,
    lo_tx             TEXT   NOT NULL,
    hi_block          BIGINT NOT NULL,
    hi_tx             TEXT   NOT NULL,
    size              INTEGER NOT NULL,
    state             TEXT   NOT NULL DEFAULT 'pending',
    attempts          INTEGER NOT NULL DEFAULT 0,
    lease_owner       TEXT,
    lease_expires_at  REAL,
    succeeded         INTEGER NOT NULL DEFAULT 0,
    failed            INTEGER NOT NULL DEFAULT 0,
    last_error        TEXT NOT NULL DEFAULT '',
    last_owner        TEXT
);
CREATE INDEX IF NOT EXISTS batches_open ON batches (state, batch_id)
    WHERE state IN ('pending', 'leased');
CREATE INDEX IF NOT EXISTS batches_contract ON batches (chain_id, contract, state);

CREATE TABLE IF NOT EXISTS lease_events (
    event_id  INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id  BIGINT NOT NULL,
    owner     TEXT   NOT NULL,
    attempt   INTEGER NOT NULL,
    event     TEXT   NOT NULL,
    at        REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS lease_events_batch ON lease_events (batch_id, at);
