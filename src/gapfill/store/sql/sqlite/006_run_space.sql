-- Where the run's pid means something: machine (hashed), boot and PID namespace
-- (gapfill.store.liveness). A later run marks a `running` row interrupted only where it
-- can judge the pid: a host name alone is shared by containers and cloned VMs, which
-- then saw each other's live runs as dead. NULL: a run of an older gapfill, judged by
-- host name as before.
ALTER TABLE runs ADD COLUMN space TEXT;
