-- Rows the service can work with at once; the slow lane backfills them in batches.
insert into example (name)
select 'seed-' || g from generate_series(1, 50000) g;
analyze example;

---- create above / drop below ----

delete from example where not loaded;
