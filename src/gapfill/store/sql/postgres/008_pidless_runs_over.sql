-- A run recorded by a gapfill older than 002_run_pid.sql has no pid: no process can tell
-- whether it still runs, so no later run marked it and `gapfill runs` listed it `running`
-- for good. Such a gapfill wrote a run's counts only as it ended: one still `running` is
-- taken as ended, at a time not known (no finished_at). Were it still running, its own end
-- would record its state and finished_at over these.
UPDATE runs SET state = 'interrupted',
    note = 'recorded by a gapfill too old to record its process, which no run can check: taken as ended, at a time not known'
WHERE state = 'running' AND pid IS NULL;
