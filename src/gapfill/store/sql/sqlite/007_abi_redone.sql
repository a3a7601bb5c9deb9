-- The ABI a contract has already, given again (`contract add --abi`), asks for its rows to be
-- decoded again only for the runs not settled yet that began with another version of it
-- (their rows may be decoded the old way): the highest such run it asked for, so that the
-- same ABI given again asks nothing more for them (each time, every stored row was decoded
-- again, and the version bumped, for a run that is never settled: another host's, a
-- container gone). NULL: none since the contract was given this ABI.
ALTER TABLE contracts ADD COLUMN abi_redone_through BIGINT;
