---- tern: disable-tx ----
-- Built without blocking writers, outside a transaction. If this file is interrupted, it runs
-- again from the top: a failed concurrent build leaves an INVALID index under the same name,
-- which "if not exists" would keep, so drop whatever is there first.
drop index concurrently if exists example_loaded_name_idx;
create index concurrently example_loaded_name_idx on example (name) where loaded;

---- create above / drop below ----

drop index concurrently if exists example_loaded_name_idx;
