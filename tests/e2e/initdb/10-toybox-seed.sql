-- A small TOYBOX-like schema and data, loaded once when the (demo or test) database is created.
CREATE TABLE users (
    id      serial PRIMARY KEY,
    name    text NOT NULL UNIQUE,
    created date NOT NULL
);
CREATE TABLE orders (
    id      serial PRIMARY KEY,
    user_id int NOT NULL REFERENCES users(id),
    amount  numeric(10,2) NOT NULL,
    note    text
);
CREATE INDEX orders_user ON orders(user_id);
CREATE TABLE media_items (
    id    serial PRIMARY KEY,
    path  text NOT NULL,
    bytes bigint NOT NULL
);
INSERT INTO users(name, created)
  SELECT 'user' || i, date '2026-01-01' + i FROM generate_series(1, 50) i;
INSERT INTO orders(user_id, amount, note)
  SELECT 1 + (i % 50), i * 1.25, 'order ' || i || ' ☃' FROM generate_series(1, 300) i;
INSERT INTO media_items(path, bytes)
  SELECT 'uploads/2026-01-2' || (4 + i % 2) || '/photo-' || i || '.jpg', i * 1000
  FROM generate_series(1, 20) i;
