-- The process that runs a run: a later run on the same host marks the runs of dead
-- processes (SIGKILL, a crash, a power cut) as interrupted instead of 'running' forever.
ALTER TABLE runs ADD COLUMN pid INTEGER;
