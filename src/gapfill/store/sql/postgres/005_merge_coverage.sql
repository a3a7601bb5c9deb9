-- Coverage kept merged: each (chain_id, contract, method) holds disjoint ranges that do not
-- touch ([0, 9] and [10, 19] are one row, [0, 19]); Store.add_refs_and_coverage keeps it so.
-- Discovery used to add a row per committed chunk (a 20M-block scan: ~400,000 rows, every
-- one read by each resume and each `gapfill status`): merged here once. A row follows one
-- before it in its key that reaches at least its from_block - 1, or starts a new range.
-- Writers (a discovery of an older gapfill, on another host) are locked out first: a row
-- committed between the merge's read and the DELETE would be deleted unmerged, its blocks
-- lost. SHARE ROW EXCLUSIVE waits for writes in progress and lets readers read.
LOCK TABLE coverage IN SHARE ROW EXCLUSIVE MODE;
CREATE TEMP TABLE coverage_merged AS
WITH ordered AS (
    SELECT chain_id, contract, method, from_block, to_block, scanned_at,
           max(to_block) OVER (PARTITION BY chain_id, contract, method
                               ORDER BY from_block, to_block
                               ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS reached
    FROM coverage WHERE from_block <= to_block
), ranges AS (
    SELECT chain_id, contract, method, from_block, to_block, scanned_at,
           sum(CASE WHEN reached IS NOT NULL AND from_block <= reached + 1 THEN 0 ELSE 1 END)
               OVER (PARTITION BY chain_id, contract, method ORDER BY from_block, to_block
                     ROWS UNBOUNDED PRECEDING) AS range_no
    FROM ordered
)
SELECT chain_id, contract, method, min(from_block) AS from_block, max(to_block) AS to_block,
       max(scanned_at) AS scanned_at
FROM ranges GROUP BY chain_id, contract, method, range_no;
DELETE FROM coverage;
INSERT INTO coverage (chain_id, contract, method, from_block, to_block, scanned_at)
SELECT chain_id, contract, method, from_block, to_block, scanned_at FROM coverage_merged;
DROP TABLE coverage_merged;
