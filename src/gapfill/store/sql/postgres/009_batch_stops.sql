-- The leases of a batch that a stop gave back (Ctrl+C, SIGTERM): `attempts` numbers the
-- leases (with the owner it is a lease's identity, for the writes' lease check and in
-- `lease_events`), and the 3-attempt rule counts `attempts - stops`. A batch in flight
-- through two stops had its third lease taken as its last attempt: its transient failures
-- stored at once, and the batch closed, though it never failed.
ALTER TABLE batches ADD COLUMN stops INTEGER NOT NULL DEFAULT 0;
