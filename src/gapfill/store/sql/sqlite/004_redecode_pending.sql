-- Decoding stored rows again when a contract's ABI changes, made durable: a run killed
-- outright, or a `contract add --abi` cut short, no longer leaves rows decoded with the
-- old ABI for good (enrich/redecode.py).
-- abi_version: bumped each time the contract is given an ABI.
-- redecode_asked, redecode_done: the stored rows may not all be decoded with the current
-- ABI while asked > done. Asked is bumped in the transaction that gives the ABI, and when
-- a run whose decoders are older than the current ABI is settled; a finished re-decode
-- sets done to the asked it read with the ABI it decoded with.
ALTER TABLE contracts ADD COLUMN abi_version INTEGER NOT NULL DEFAULT 0;
ALTER TABLE contracts ADD COLUMN redecode_asked INTEGER NOT NULL DEFAULT 0;
ALTER TABLE contracts ADD COLUMN redecode_done INTEGER NOT NULL DEFAULT 0;
-- The abi_version of each contract of its chain when a run started (JSON), which its
-- processes' decoders are at least as new as; NULL once the run is settled (its end, or a
-- later run's or `contract add`'s once it is over, marked the contracts whose ABI changed
-- since for decoding again). Runs before this migration count as settled.
ALTER TABLE runs ADD COLUMN abi_versions TEXT;
