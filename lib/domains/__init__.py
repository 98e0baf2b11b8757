"""Domain loaders: each turns a domain's sources into the canonical corpus (items, queries, relations, background)."""
