-- A few rows the service can work with at once.
insert into example (name)
select 'seed-' || g from generate_series(1, 10) g;

---- create above / drop below ----

delete from example where not loaded;
