-- The table the service needs before it can serve anything.
create table if not exists example (
  id bigint generated always as identity primary key,
  name text not null,
  loaded boolean not null default false
);

---- create above / drop below ----

drop table example;
